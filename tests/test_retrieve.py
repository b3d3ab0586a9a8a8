"""C-MOVE and C-GET from the index: dcmtk's movescu and getscu (and pynetdicom)
retrieve what real C-STOREs stored, into a dcmtk storescp the test starts (or
back on their own association); every data set arrives byte-exact."""

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from scp.sub_operations import Matches, Unsendable
from storage.catalog.find import StoredInstance
from storage.codec.datasets import reencode_dataset
from tests.conftest import (
    IMAGING_SCP,
    both_indexes,
    bundled_test_files,
    dataset_bytes,
    free_port,
    make_instance,
    send_files,
    start_server,
)
from tests.test_interop import Orthanc, requires_orthanc

STORESCP = shutil.which("storescp") or "/usr/bin/storescp"
MOVESCU = shutil.which("movescu") or "/usr/bin/movescu"
GETSCU = shutil.which("getscu") or "/usr/bin/getscu"
pytestmark = [
    pytest.mark.skipif(shutil.which("movescu") is None, reason="dcmtk not installed"),
    both_indexes,
]
DEST = "DEST"


class Storescp:
    """A dcmtk storescp: the move destination, writing data sets exactly as received."""

    def __init__(
        self, directory: Path, *flags: str, env: dict | None = None, parsing: bool = False
    ):
        """`parsing`: it reads each data set, and writes it again (not +B)."""
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        mode = [] if parsing else ["+B"]
        self.process = subprocess.Popen(
            [STORESCP, "-aet", DEST, *mode, "-od", str(directory), *flags, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        time.sleep(0.3)

    def received(self) -> dict[str, bytes]:
        """SOP Instance UID -> the data set bytes of each file it wrote."""
        found = {}
        for path in self.directory.iterdir():
            meta, _ = split_dataset(path)
            found[meta.MediaStorageSOPInstanceUID] = dataset_bytes(path)
        return found

    def clear(self) -> None:
        for path in self.directory.iterdir():
            path.unlink()

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


@pytest.fixture(scope="module")
def archive(tmp_path_factory, index_backend):
    """A server holding two patients' studies, a storescp destination in its peers,
    and the dataset bytes of every instance sent: study -> series -> {sop: bytes}."""
    root = tmp_path_factory.mktemp("retrieve")
    destination = Storescp(root / "dest")
    implicit_only = Storescp(root / "implicit", "+xi")
    down = free_port()
    server = start_server(
        root / "data", "--peer", f"{DEST}=127.0.0.1:{destination.port}",
        "--peer", f"DOWN=127.0.0.1:{down}", "--peer", f"IMPLICIT=127.0.0.1:{implicit_only.port}",
    )  # fmt: skip
    server.implicit_only = implicit_only
    sent: dict = {}
    paths = []
    for patient_id, series_counts in (("PAT-1", (3, 2)), ("PAT-2", (2,))):
        study_uid = generate_uid()
        sent[study_uid] = {"patient_id": patient_id, "series": {}, "implicit": set()}
        for number, count in enumerate(series_counts, 1):
            series_uid = generate_uid()
            instances = sent[study_uid]["series"][series_uid] = {}
            for n in range(count):
                syntax = ImplicitVRLittleEndian if n % 2 else ExplicitVRLittleEndian
                path = make_instance(
                    root / "files", study_uid=study_uid, series_uid=series_uid,
                    PatientID=patient_id, SeriesNumber=number, InstanceNumber=n + 1,
                    transfer_syntax=syntax,
                )  # fmt: skip
                paths.append(path)
                uid = pydicom.dcmread(path).SOPInstanceUID
                instances[uid] = dataset_bytes(path)
                if syntax == ImplicitVRLittleEndian:
                    sent[study_uid]["implicit"].add(uid)
    assert {s.status for s in send_files(server.port, paths)} == {0}
    yield server, destination, sent
    server.stop()
    destination.stop()
    implicit_only.stop()


def instances_of(sent: dict, study_uid: str, series_uid: str | None = None) -> dict:
    found = {}
    for uid, instances in sent[study_uid]["series"].items():
        if series_uid in (None, uid):
            found.update(instances)
    return found


def movescu(port: int, level: str, *keys: str, root: str = "-S") -> subprocess.CompletedProcess:
    return subprocess.run(
        [MOVESCU, root, "-aet", "MOVER", "-aec", "IMAGING_SCP", "-aem", DEST,
         "-k", f"QueryRetrieveLevel={level}", *(a for k in keys for a in ("-k", k)),
         "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def move_cases(sent: dict):
    (study, first), (_, second) = sent.items()
    series = next(iter(first["series"]))
    sop = next(iter(first["series"][series]))
    return [
        ("-S", "STUDY", [f"StudyInstanceUID={study}"], instances_of(sent, study)),
        ("-S", "SERIES", [f"StudyInstanceUID={study}", f"SeriesInstanceUID={series}"],
         instances_of(sent, study, series)),
        ("-S", "IMAGE", [f"StudyInstanceUID={study}", f"SeriesInstanceUID={series}",
                         f"SOPInstanceUID={sop}"], {sop: first["series"][series][sop]}),
        ("-P", "PATIENT", ["PatientID=PAT-1"], instances_of(sent, study)),
        ("-P", "STUDY", ["PatientID=PAT-1", f"StudyInstanceUID={study}"],
         instances_of(sent, study)),
        ("-P", "SERIES", ["PatientID=PAT-1", f"StudyInstanceUID={study}",
                          f"SeriesInstanceUID={series}"], instances_of(sent, study, series)),
    ]  # fmt: skip


def test_movescu_at_every_level_of_both_roots_delivers_byte_exact(archive):
    server, destination, sent = archive
    for number, (root, level, keys, expected) in enumerate(move_cases(sent), 1):
        destination.clear()
        done = movescu(server.port, level, *keys, root=root)
        assert done.returncode == 0, done.stderr
        assert destination.received() == expected, (root, level)
        end = server.wait_for_event("move.end", number)[-1]
        assert (end["status"], end["matches"], end["completed"], end["failed"]) == (
            "0x0000",
            len(expected),
            len(expected),
            0,
        ), (root, level)
        assert end["destination"] == DEST


def move(port: int, identifier: Dataset, destination: str, model=None, msg_id: int = 1) -> list:
    ae = AE("MOVER")
    model = model or StudyRootQueryRetrieveInformationModelMove
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGING_SCP")
    assert assoc.is_established
    try:
        moving = assoc.send_c_move(identifier, destination, model, msg_id=msg_id)
        return [(status, ds) for status, ds in moving]
    finally:
        assoc.release()


def study_identifier(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    return ds


def test_pynetdicom_move_counts_and_the_unknown_and_the_unreachable_destination(archive):
    server, destination, sent = archive
    study = next(iter(sent))
    expected = instances_of(sent, study)
    destination.clear()
    responses = move(server.port, study_identifier(study), DEST)
    final = responses[-1][0]
    assert final.Status == 0x0000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (
        len(expected),
        0,
    )
    assert "NumberOfRemainingSuboperations" not in final
    assert destination.received() == expected

    unknown = move(server.port, study_identifier(study), "NOBODY")[-1][0]
    assert unknown.Status == 0xA801
    assert "NOBODY" in unknown.ErrorComment and "peers" in unknown.ErrorComment

    down = move(server.port, study_identifier(study), "DOWN")
    status, identifier = down[-1]
    assert status.Status == 0xA702
    assert status.NumberOfFailedSuboperations == len(expected)
    assert set(identifier.FailedSOPInstanceUIDList) == set(expected)
    failed = server.wait_for_event("retrieve.failed", len(expected))
    assert "cannot connect to 127.0.0.1" in failed[-1]["reason"]


def test_a_file_deleted_behind_the_index_fails_alone(archive):
    server, destination, sent = archive
    study = list(sent)[1]
    expected = instances_of(sent, study)
    gone = next(iter(expected))
    path = next(server.data_dir.rglob(f"{gone}.dcm"))
    kept = path.read_bytes()
    path.unlink()
    try:
        destination.clear()
        status, identifier = move(server.port, study_identifier(study), DEST)[-1]
    finally:
        path.write_bytes(kept)
    assert status.Status == 0xB000
    assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations) == (
        len(expected) - 1,
        1,
    )
    assert identifier.FailedSOPInstanceUIDList == gone
    assert destination.received() == {k: v for k, v in expected.items() if k != gone}
    reasons = [e["reason"] for e in server.events("retrieve.failed")]
    assert any("missing" in reason for reason in reasons)


def getscu(port: int, directory: Path, level: str, *keys: str) -> subprocess.CompletedProcess:
    directory.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [GETSCU, "-S", "-aet", "GETTER", "-aec", "IMAGING_SCP", "+B", "-od", str(directory),
         "-k", f"QueryRetrieveLevel={level}", *(a for k in keys for a in ("-k", k)),
         "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_getscu_retrieves_a_study_byte_exact(archive, tmp_path):
    server, _, sent = archive
    study = next(iter(sent))
    expected = instances_of(sent, study)
    done = getscu(server.port, tmp_path / "got", "STUDY", f"StudyInstanceUID={study}")
    assert done.returncode == 0, done.stderr
    got = {}
    for path in (tmp_path / "got").iterdir():
        got[split_dataset(path)[0].MediaStorageSOPInstanceUID] = dataset_bytes(path)
    # getscu takes each storage class in Explicit VR Little Endian: the
    # instances stored in implicit VR arrive converted, the others as stored.
    implicit = sent[study]["implicit"]
    assert got == {
        uid: reencode_dataset(data, ImplicitVRLittleEndian, ExplicitVRLittleEndian)
        if uid in implicit else data
        for uid, data in expected.items()
    }  # fmt: skip
    assert implicit and got[next(iter(implicit))] != expected[next(iter(implicit))]
    end = server.wait_for_event("get.end")[-1]
    assert (end["status"], end["completed"], end["failed"]) == ("0x0000", len(expected), 0)


def get(port: int, identifier: Dataset, storage_syntaxes: list[list[str]]):
    """A pynetdicom C-GET with a CT Image Storage context per list of syntaxes:
    its responses, and the data sets it received (SOP Instance UID -> bytes)."""
    received = {}

    def on_store(event):
        received[event.request.AffectedSOPInstanceUID] = bytes(event.request.DataSet.getvalue())
        return 0x0000

    ae = AE("GETTER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelGet)
    for syntaxes in storage_syntaxes:
        ae.add_requested_context(CTImageStorage, syntaxes)
    role = build_role(CTImageStorage, scp_role=True)
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="IMAGING_SCP", ext_neg=[role],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )  # fmt: skip
    assert assoc.is_established
    try:
        model = StudyRootQueryRetrieveInformationModelGet
        return list(assoc.send_c_get(identifier, model)), received
    finally:
        assoc.release()


def test_pynetdicom_get_on_several_contexts_and_on_none_that_fits(archive):
    server, _, sent = archive
    study = next(iter(sent))
    expected = instances_of(sent, study)
    # One context per syntax: each instance goes back as it is stored.
    responses, received = get(
        server.port, study_identifier(study), [[ExplicitVRLittleEndian], [ImplicitVRLittleEndian]]
    )
    status = responses[-1][0]
    assert status.Status == 0x0000
    assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations) == (
        len(expected),
        0,
    )
    assert received == expected
    # Only a compressed syntax: nothing can go (never encoded lossy on the way).
    responses, received = get(server.port, study_identifier(study), [[JPEGBaseline8Bit]])
    status, identifier = responses[-1]
    assert status.Status == 0xA702
    assert status.NumberOfFailedSuboperations == len(expected)
    assert set(identifier.FailedSOPInstanceUIDList) == set(expected)
    assert received == {}


def test_a_get_context_in_pynetdicoms_default_syntaxes_takes_every_stored_object(archive):
    # One context for the class, in pynetdicom's default syntaxes (Deflated and
    # Explicit VR Big Endian among them): the syntax accepted is one that every
    # uncompressed stored object can be sent in, not the one we prefer to receive.
    server, _, sent = archive
    study = next(iter(sent))
    expected = instances_of(sent, study)
    responses, received = get(server.port, study_identifier(study), [None])
    status = responses[-1][0]
    assert status.Status == 0x0000
    assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations) == (
        len(expected),
        0,
    )
    assert set(received) == set(expected)


def test_patient_root_models_are_accepted(archive):
    # Patient Root MOVE at PATIENT level without a PatientID is refused (0xA900).
    server, _, sent = archive
    ds = Dataset()
    ds.QueryRetrieveLevel = "PATIENT"
    status = move(server.port, ds, DEST, PatientRootQueryRetrieveInformationModelMove)[-1][0]
    assert status.Status == 0xA900


def test_an_implicit_vr_destination_gets_conversions_and_no_compressed_object(archive, tmp_path):
    server, _, _ = archive
    destination = server.implicit_only
    compressed = next(p for p in bundled_test_files() if p.name == "MR_small_jp2klossless.dcm")
    mr = pydicom.dcmread(compressed, stop_before_pixels=True)
    study = mr.StudyInstanceUID
    plain = make_instance(
        tmp_path, study_uid=study, series_uid=generate_uid(), PatientID=mr.PatientID,
        PatientName=mr.PatientName,
    )  # fmt: skip
    assert {s.status for s in send_files(server.port, [compressed, plain])} == {0}
    status, identifier = move(server.port, study_identifier(study), "IMPLICIT")[-1]
    assert status.Status == 0xB000
    assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations) == (1, 1)
    assert (
        identifier.FailedSOPInstanceUIDList
        == split_dataset(compressed)[0].MediaStorageSOPInstanceUID
    )
    assert destination.received() == {
        pydicom.dcmread(plain).SOPInstanceUID: reencode_dataset(
            dataset_bytes(plain), ExplicitVRLittleEndian, ImplicitVRLittleEndian
        )
    }
    reasons = [e["reason"] for e in server.events("retrieve.failed")]
    assert any("accepts no JPEG 2000 Image Compression (Lossless Only)" in r for r in reasons)


@pytest.mark.parametrize("kind", ["move", "get"])
def test_a_cancel_in_the_middle_of_a_500_instance_retrieve_ends_it_with_the_counts(
    server_factory, tmp_path, kind
):
    got = []

    def store_slowly(event):
        # 10 ms a sub-operation: the retrieve is still going when the cancel comes
        time.sleep(0.01)
        got.append(1)
        return 0x0000

    dest_port = free_port()
    destination = AE(DEST)
    destination.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    listener = destination.start_server(
        ("127.0.0.1", dest_port), block=False, evt_handlers=[(evt.EVT_C_STORE, store_slowly)]
    )
    try:
        server = server_factory("--peer", f"{DEST}=127.0.0.1:{dest_port}")
        study = generate_uid()
        series = generate_uid()
        paths = [make_instance(tmp_path / "files", study_uid=study, series_uid=series,
                               InstanceNumber=n) for n in range(500)]  # fmt: skip
        assert {s.status for s in send_files(server.port, paths)} == {0}
        ae = AE("MOVER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate(
            "127.0.0.1", server.port, ae_title="IMAGING_SCP",
            ext_neg=[build_role(CTImageStorage, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, store_slowly)],
        )  # fmt: skip
        assert assoc.is_established
        if kind == "move":
            model = StudyRootQueryRetrieveInformationModelMove
            retrieving = assoc.send_c_move(study_identifier(study), DEST, model, msg_id=9)
        else:
            model = StudyRootQueryRetrieveInformationModelGet
            retrieving = assoc.send_c_get(study_identifier(study), model, msg_id=9)
        context_id = next(
            cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == model
        )
        responses = []
        try:
            for status, identifier in retrieving:
                responses.append((status, identifier))
                if status.Status == 0xFF00 and len(responses) == 1:
                    assoc.send_c_cancel(9, context_id)
        finally:
            assoc.release()
    finally:
        listener.shutdown()
    pending = [status for status, _ in responses[:-1]]
    final, identifier = responses[-1]
    assert final.Status == 0xFE00
    assert {status.Status for status in pending} == {0xFF00}
    done = final.NumberOfCompletedSuboperations
    assert 0 < done < 500
    assert final.NumberOfFailedSuboperations == 0
    assert final.NumberOfRemainingSuboperations == 500 - done
    assert len(got) == done
    # One Pending at most per sub-operation, each with the counts so far.
    assert len(pending) <= done
    for status in pending:
        assert status.NumberOfRemainingSuboperations + status.NumberOfCompletedSuboperations == 500
    end = server.wait_for_event(f"{kind}.end")[-1]
    assert (end["cancelled"], end["completed"], end["matches"]) == (True, done, 500)


def imaging_scp_send(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [IMAGING_SCP, "send", *server.index_flags, *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def send_study(server, study: str, port: int, *flags: str) -> tuple[int, dict]:
    """`imaging-scp send --study` to DEST at `port`: its exit status and summary."""
    done = imaging_scp_send(
        server, "--study", study, "--to", DEST, "--host", "127.0.0.1", "--port", str(port),
        "--json", *flags,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def test_send_pushes_a_study_or_a_series_and_exits_1_when_one_fails(archive, tmp_path):
    server, destination, sent = archive
    study = next(iter(sent))
    expected = instances_of(sent, study)
    destination.clear()
    returncode, summary = send_study(server, study, destination.port)
    assert returncode == 0
    assert (summary["matches"], summary["sent"], summary["failed"]) == (
        len(expected),
        len(expected),
        [],
    )
    assert destination.received() == expected

    # A series, the peer from `peers` in the config file, one file gone.
    series = next(iter(sent[study]["series"]))
    gone = next(iter(sent[study]["series"][series]))
    path = next(server.data_dir.rglob(f"{gone}.dcm"))
    kept = path.read_bytes()
    path.unlink()
    config = tmp_path / "scp.toml"
    config.write_text(f'[peers]\n{DEST} = "127.0.0.1:{destination.port}"\n')
    destination.clear()
    try:
        done = imaging_scp_send(
            server, "--config", str(config), "--series", series, "--to", DEST, "--json"
        )
    finally:
        path.write_bytes(kept)
    assert done.returncode == 1
    summary = json.loads(done.stdout)
    assert summary["sent"] == len(sent[study]["series"][series]) - 1
    assert [f["sopInstanceUid"] for f in summary["failed"]] == [gone]
    assert "missing" in summary["failed"][0]["reason"]
    assert set(destination.received()) == set(sent[study]["series"][series]) - {gone}

    unknown = imaging_scp_send(server, "--study", study, "--to", "NOBODY")
    assert unknown.returncode == 2 and "peers" in unknown.stderr


@requires_orthanc
def unparsable_by_dcmtk(directory: Path, **attributes) -> Path:
    """An instance with an element longer than its sequence item (explicit lengths):
    stored as sent, as a modality's odd file is; dcmtk's storescp aborts the
    association on it ("DIMSE Failed to receive message")."""
    path = make_instance(directory, **attributes)
    dataset = pydicom.dcmread(path)
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    item.ReferencedSOPInstanceUID = generate_uid()
    dataset.ReferencedStudySequence = [item]
    dataset.save_as(path, enforce_file_format=True)
    data = bytearray(path.read_bytes())
    at = data.index(b"\x08\x00\x50\x11UI")  # (0008,1150) in the item
    data[at + 6 : at + 8] = (0x100).to_bytes(2, "little")
    path.write_bytes(data)
    return path


def test_a_destination_that_aborts_on_one_instance_gets_every_other(server_factory, tmp_path):
    """Was: the rest of the retrieve failed with the abort's reason, unsent."""
    destination = Storescp(tmp_path / "dest", parsing=True)
    server = server_factory("--peer", f"{DEST}=127.0.0.1:{destination.port}")
    study, series = generate_uid(), generate_uid()
    ids = {"study_uid": study, "series_uid": series}
    first, *rest = [make_instance(tmp_path / "files", **ids, InstanceNumber=n) for n in (1, 3, 4)]
    bad = unparsable_by_dcmtk(tmp_path / "bad", **ids, InstanceNumber=2)
    assert [s.status for s in send_files(server.port, [first, bad, *rest])] == [0] * 4
    good = {pydicom.dcmread(p).SOPInstanceUID for p in [first, *rest]}
    bad_uid = pydicom.dcmread(bad, stop_before_pixels=True).SOPInstanceUID
    try:
        responses = move(server.port, study_identifier(study), DEST)
        final = responses[-1][0]
        assert final.Status == 0xB000
        counts = (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations)
        assert counts == (3, 1)
        assert responses[-1][1].FailedSOPInstanceUIDList == bad_uid
        assert set(destination.received()) == good
        (failed,) = server.events("retrieve.failed")
        assert failed["sop_instance_uid"] == bad_uid
        assert "aborted the association" in failed["reason"]

        destination.clear()
        returncode, summary = send_study(server, study, destination.port)
        assert returncode == 1
        assert (summary["sent"], [f["sopInstanceUid"] for f in summary["failed"]]) == (
            3,
            [bad_uid],
        )
        assert set(destination.received()) == good
    finally:
        destination.stop()


def test_a_destination_that_stops_answering_is_not_associated_with_again(server, tmp_path):
    """Each new association would wait out the timeout again: the rest fail at once."""
    study, series = generate_uid(), generate_uid()
    paths = [
        make_instance(tmp_path, study_uid=study, series_uid=series, InstanceNumber=n)
        for n in range(1, 5)
    ]
    assert [s.status for s in send_files(server.port, paths)] == [0] * 4
    associations = []
    ae = AE(DEST)
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

    def silent(event):
        time.sleep(3)  # past send's --timeout
        return 0x0000

    port = free_port()
    listener = ae.start_server(
        ("127.0.0.1", port), block=False,
        evt_handlers=[(evt.EVT_C_STORE, silent), (evt.EVT_ACCEPTED, associations.append)],
    )  # fmt: skip
    try:
        returncode, summary = send_study(server, study, port, "--timeout", "1")
    finally:
        listener.shutdown()
    assert returncode == 1
    assert summary["sent"] == 0 and len(summary["failed"]) == 4
    assert {f["reason"] for f in summary["failed"]} == {
        f"{DEST}@127.0.0.1:{port} did not answer within 1 s"
    }
    assert len(associations) == 1


def test_orthanc_pulls_a_study_into_itself_byte_exact(server_factory, tmp_path):
    """Orthanc's REST `POST /modalities/{us}/move` with itself as the target."""
    orthanc = Orthanc(tmp_path / "orthanc")
    try:
        orthanc.wait_ready()
        server = server_factory("--peer", f"ORTHANC=127.0.0.1:{orthanc.dicom_port}")
        orthanc.use_scp(server.port)
        study, series = generate_uid(), generate_uid()
        syntaxes = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        paths = [
            make_instance(tmp_path / "files", study_uid=study, series_uid=series,
                          InstanceNumber=n + 1, transfer_syntax=syntaxes[n % 2])
            for n in range(6)
        ]  # fmt: skip
        assert {s.status for s in send_files(server.port, paths)} == {0}
        orthanc.request(
            "/modalities/scp/move",
            {"Level": "Study", "Resources": [{"StudyInstanceUID": study}],
             "TargetAet": "ORTHANC", "Synchronous": True},
        )  # fmt: skip
        held = {}
        for orthanc_id in orthanc.request("/instances"):
            url = f"http://127.0.0.1:{orthanc.http_port}/instances/{orthanc_id}/file"
            with urllib.request.urlopen(url, timeout=30) as reply:
                held_file = tmp_path / f"{orthanc_id}.dcm"
                held_file.write_bytes(reply.read())
            held[split_dataset(held_file)[0].MediaStorageSOPInstanceUID] = dataset_bytes(held_file)
        assert held == {pydicom.dcmread(p).SOPInstanceUID: dataset_bytes(p) for p in paths}
        end = server.wait_for_event("move.end")[-1]
        assert (end["destination"], end["completed"], end["failed"]) == ("ORTHANC", 6, 0)
    finally:
        orthanc.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.slow
def test_a_1000_instance_move_beside_a_live_sender_keeps_the_server_rss_flat(
    server_factory, tmp_path
):
    destination = Storescp(tmp_path / "dest")
    try:
        server = server_factory("--peer", f"{DEST}=127.0.0.1:{destination.port}")
        study, warm_up, series = generate_uid(), generate_uid(), generate_uid()
        paths = {
            s: [make_instance(tmp_path / s, study_uid=study, series_uid=s, InstanceNumber=n)
                for n in range(count)]
            for s, count in ((warm_up, 100), (series, 1000))
        }  # fmt: skip
        assert {s.status for s in send_files(server.port, sum(paths.values(), []))} == {0}
        # A first move of 100 takes what any move takes once (buffers, threads):
        # the RSS after it is what the 1,000 are measured against.
        final = move(server.port, series_identifier(study, warm_up), DEST)[-1][0]
        assert final.NumberOfCompletedSuboperations == 100
        warm = rss_kib(server.process.pid)
        other = [make_instance(tmp_path / "other", study_uid=generate_uid(),
                               series_uid=generate_uid()) for _ in range(300)]  # fmt: skip
        samples: list[tuple[int, int]] = []  # (files at the destination, server RSS KiB)
        results: dict = {}
        sender = threading.Thread(
            target=lambda: results.update(sent=send_files(server.port, other))
        )
        moving = threading.Thread(
            target=lambda: results.update(
                moved=move(server.port, series_identifier(study, series), DEST)
            )
        )
        sender.start()
        moving.start()
        while moving.is_alive():
            samples.append(
                (len(list(destination.directory.iterdir())), rss_kib(server.process.pid))
            )
            time.sleep(0.02)
        moving.join()
        sender.join(120)
        samples.append((len(list(destination.directory.iterdir())), rss_kib(server.process.pid)))
    finally:
        destination.stop()
    final = results["moved"][-1][0]
    assert (final.Status, final.NumberOfCompletedSuboperations) == (0x0000, 1000)
    assert {s.status for s in results["sent"]} == {0}
    assert len(list(destination.directory.iterdir())) == 1100
    # No growth with the series: during the move and after it (the last sample,
    # taken once it has ended, holds whatever it kept), against the warm server.
    assert max(rss for _, rss in samples) - warm < 10 * 1024, (warm, samples)


def series_identifier(study_uid: str, series_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    return ds


def test_a_damaged_file_and_an_offline_series_are_failed_sub_operations(server_factory, tmp_path):
    """Sent to a pynetdicom destination, which also sees the Move Originator fields."""
    originators = []
    received = {}

    def on_store(event):
        request = event.request
        originators.append(
            (request.MoveOriginatorApplicationEntityTitle, request.MoveOriginatorMessageID)
        )
        received[request.AffectedSOPInstanceUID] = bytes(request.DataSet.getvalue())
        return 0x0000

    dest_port = free_port()
    scp = AE("PYDEST")
    scp.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    listener = scp.start_server(
        ("127.0.0.1", dest_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        server = server_factory("--peer", f"PYDEST=127.0.0.1:{dest_port}")
        study, kept_series, offline_series = generate_uid(), generate_uid(), generate_uid()
        paths = {
            series: [make_instance(tmp_path / series, study_uid=study, series_uid=series)
                     for _ in range(3)]
            for series in (kept_series, offline_series)
        }  # fmt: skip
        assert {s.status for s in send_files(server.port, sum(paths.values(), []))} == {0}
        uid_of = {p: pydicom.dcmread(p).SOPInstanceUID for p in sum(paths.values(), [])}
        damaged = uid_of[paths[kept_series][0]]
        stored = next(server.data_dir.rglob(f"{damaged}.dcm"))
        data = bytearray(stored.read_bytes())
        data[-1] ^= 0xFF  # same size, another data set
        stored.write_bytes(data)
        offline = subprocess.run(
            [IMAGING_SCP, "availability", "set", "--series", offline_series, "offline",
             *server.index_flags], capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert offline.returncode == 0, offline.stderr
        status, identifier = move(server.port, study_identifier(study), "PYDEST", msg_id=77)[-1]
    finally:
        listener.shutdown()
    failed = {damaged} | {uid_of[p] for p in paths[offline_series]}
    assert status.Status == 0xB000
    assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations) == (2, 4)
    assert set(identifier.FailedSOPInstanceUIDList) == failed
    assert received == {
        uid_of[p]: dataset_bytes(p) for p in paths[kept_series] if uid_of[p] not in failed
    }
    assert set(originators) == {("MOVER", 77)}
    reasons = {e["sop_instance_uid"]: e["reason"] for e in server.events("retrieve.failed")}
    assert "no longer holds the data set received" in reasons[damaged]
    assert reasons[uid_of[paths[offline_series][0]]] == "its series is OFFLINE"


def test_large_files_checked_ahead_are_sent_whole_and_a_damaged_one_fails_alone(
    server_factory, tmp_path
):
    """Data sets from 128 KiB up are checked one match ahead in the retrieve's
    checker thread; from 1 MiB up (more than the read buffer) they are read
    again to be sent. Each arrives byte-exact; one damaged of each size fails
    in its turn, and the match after it is still sent."""
    received = {}

    def on_store(event):
        received[event.request.AffectedSOPInstanceUID] = bytes(event.request.DataSet.getvalue())
        return 0x0000

    dest_port = free_port()
    scp = AE("PYDEST")
    scp.maximum_pdu_size = 16384  # as dcmtk's: many PDUs per data set
    scp.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    listener = scp.start_server(
        ("127.0.0.1", dest_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        server = server_factory("--peer", f"PYDEST=127.0.0.1:{dest_port}")
        study, series = generate_uid(), generate_uid()
        # 320 KB (held in the read buffer) and 1.3 MB (streamed), alternating
        paths = [
            make_instance(tmp_path, study_uid=study, series_uid=series, pixels=pixels,
                          InstanceNumber=number)
            for number, pixels in enumerate((400, 800) * 4, start=1)
        ]  # fmt: skip
        assert {s.status for s in send_files(server.port, paths)} == {0}
        uid_of = {p: pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
        damaged = {uid_of[paths[2]], uid_of[paths[5]]}
        for uid in damaged:
            stored = next(server.data_dir.rglob(f"{uid}.dcm"))
            data = bytearray(stored.read_bytes())
            data[-1] ^= 0xFF  # same size, another data set
            stored.write_bytes(data)
        status, identifier = move(server.port, study_identifier(study), "PYDEST")[-1]
    finally:
        listener.shutdown()
    assert status.Status == 0xB000
    assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations) == (6, 2)
    assert set(identifier.FailedSOPInstanceUIDList) == damaged
    assert received == {uid_of[p]: dataset_bytes(p) for p in paths if uid_of[p] not in damaged}
    reasons = {e["sop_instance_uid"]: e["reason"] for e in server.events("retrieve.failed")}
    assert all("no longer holds the data set received" in reasons[uid] for uid in damaged)


def test_an_index_failure_comes_in_its_turn_after_the_matches_checked_ahead(tmp_path):
    """The cursor is read one match ahead: its failure is raised when the
    match after the last one read is asked for, as without the look-ahead."""

    def rows():
        for size in (100, 1 << 20):  # checked here, and in the checker thread
            yield StoredInstance(f"{size}.dcm", size, "0" * 64, "1.2.840.10008.1.2.1",
                                 CTImageStorage, generate_uid(), "ONLINE")  # fmt: skip
        raise RuntimeError("database disk image is malformed")

    matches = Matches(tmp_path, rows())
    try:
        for _ in range(2):
            with pytest.raises(Unsendable, match="is missing"):
                next(matches).dataset()
        with pytest.raises(RuntimeError, match="malformed"):
            next(matches)
    finally:
        matches.close()


def test_a_nagle_on_destination_does_not_stall_each_sub_operation(server_factory, tmp_path):
    # dcmtk's storescp leaves Nagle on (as many destinations do) and writes each
    # C-STORE-RSP in two pieces: the second waits for our ACK of the first. Our
    # requestor ACKs at once; before, it left that to the delayed ACK, ~40 ms
    # per sub-operation (2,000 small instances took 88 s instead of 1.7 s).
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    destination = Storescp(tmp_path / "nagle", env=env)
    try:
        server = server_factory("--peer", f"{DEST}=127.0.0.1:{destination.port}")
        study, series = generate_uid(), generate_uid()
        paths = [
            make_instance(tmp_path / "files", study_uid=study, series_uid=series) for _ in range(30)
        ]
        assert {s.status for s in send_files(server.port, paths)} == {0}
        started = time.monotonic()
        result = movescu(server.port, "STUDY", f"StudyInstanceUID={study}")
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert len(destination.received()) == 30
    finally:
        destination.stop()
    # 0.1-0.3 s here; a delayed ACK per sub-operation makes it 1.2 s or more.
    assert elapsed < 1.0, f"30 sub-operations took {elapsed:.2f} s"
