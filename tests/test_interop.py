"""Interoperability: senders nobody here wrote (Orthanc, dcmtk, pynetdicom as an SCU)
against a real `imaging-scp serve`. Every object must arrive byte for byte as it was
sent, and the index must count exactly what was sent."""

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    SCP_SCU_RoleSelectionNegotiation,
)

from tests.conftest import (
    CT_IMAGE_STORAGE,
    ECHOSCU,
    STORESCU,
    VERIFICATION,
    bundled_test_files,
    dataset_bytes,
    free_port,
    make_instance,
    requires_dcmtk,
    stored_files,
)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PRIVATE_SOP_CLASS = "1.2.3.4.5.6.7"
SERVER_MAX_PDU = 262144  # the server's default `max_pdu`
ORTHANC = shutil.which("Orthanc")

# Bundled compressed files that Orthanc 1.10 sends exactly as they are on disk. Orthanc
# (DCMTK) re-serialises what it sends: undefined-length sequences get explicit lengths,
# group lengths are recalculated, trailing padding and value padding are dropped
# (JPEG2000.dcm, JPEG-lossy.dcm, MR_small_RLE.dcm, 693_J2KI.dcm ...), so for those the
# bytes on the wire are not the file's and a byte comparison would test Orthanc.
ORTHANC_VERBATIM = (
    "GDCMJ2K_TextGBR.dcm",  # JPEG 2000 lossless, Secondary Capture
    "J2K_pixelrep_mismatch.dcm",  # JPEG 2000 lossless, CT
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
)

requires_orthanc = pytest.mark.skipif(
    ORTHANC is None, reason="Orthanc not installed (apt-get install orthanc)"
)


def assert_stored_exactly(server, sent: list[Path]) -> None:
    """Each sent file is in the index once, its stored file holds the dataset bytes as
    sent, nothing else was stored, and every study and series counts what was sent."""
    index = server.index()
    per_series, per_study, series_of_study = Counter(), Counter(), {}
    for path in sent:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        rows = index.execute(
            "SELECT path, transfer_syntax FROM instances WHERE sop_instance_uid = ?",
            (ds.SOPInstanceUID,),
        ).fetchall()
        assert len(rows) == 1, f"{path.name}: {len(rows)} index rows"
        stored = server.data_dir / rows[0]["path"]
        assert dataset_bytes(stored) == dataset_bytes(path), f"{path.name}: bytes differ"
        assert rows[0]["transfer_syntax"] == ds.file_meta.TransferSyntaxUID, path.name
        per_series[ds.SeriesInstanceUID] += 1
        per_study[ds.StudyInstanceUID] += 1
        series_of_study.setdefault(ds.StudyInstanceUID, set()).add(ds.SeriesInstanceUID)
    assert index.execute("SELECT count(*) FROM instances").fetchone()[0] == len(sent)
    assert len(stored_files(server.data_dir)) == len(sent)
    series = {
        r["series_uid"]: r["number_of_instances"] for r in index.execute("SELECT * FROM series")
    }
    assert series == dict(per_series)
    studies = {
        r["study_uid"]: (r["number_of_instances"], r["number_of_series"])
        for r in index.execute("SELECT * FROM studies")
    }
    assert studies == {uid: (n, len(series_of_study[uid])) for uid, n in per_study.items()}


def two_series_study(directory: Path, count: int) -> list[Path]:
    study = generate_uid()
    series = [generate_uid(), generate_uid()]
    return [
        make_instance(directory, study_uid=study, series_uid=series[n % 2], InstanceNumber=n + 1)
        for n in range(count)
    ]


# --- Orthanc as a sender ---------------------------------------------------------


class Orthanc:
    """An Orthanc process on free ports; `use_scp` points its modality "scp" at a server."""

    def __init__(self, directory: Path, **settings):
        """`settings` join Orthanc's configuration (plugins, DICOMweb servers)."""
        self.http_port = free_port()
        self.dicom_port = free_port()
        config = {
            "Name": "interop",
            "StorageDirectory": str(directory / "storage"),
            "IndexDirectory": str(directory / "index"),
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "DicomModalities": {},
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
        } | settings
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "orthanc.json").write_text(json.dumps(config))
        self.log_path = directory / "orthanc.log"
        self.process = subprocess.Popen(
            [ORTHANC, str(directory / "orthanc.json")],
            stdout=self.log_path.open("w"),
            stderr=subprocess.STDOUT,
        )

    def request(self, path: str, body: bytes | dict | None = None, method: str | None = None):
        """GET (no body) or POST to Orthanc's REST API; the JSON answer."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        url = f"http://127.0.0.1:{self.http_port}{path}"
        request = urllib.request.Request(url, data=data, method=method)
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read() or b"null")

    def upload(self, paths: list[Path]) -> list[str]:
        """Store files in Orthanc; the Orthanc IDs of their studies."""
        studies = set()
        for path in paths:
            uploaded = self.request("/instances", path.read_bytes())
            assert uploaded["Status"] == "Success", (path.name, uploaded)
            studies.add(uploaded["ParentStudy"])
        return sorted(studies)

    def push(self, studies: list[str], *, commitment: bool = False) -> dict:
        """C-STORE studies to the modality "scp" (with storage commitment); the job."""
        body = {"Resources": studies, "Synchronous": True}
        if commitment:
            body["StorageCommitment"] = True
        return self.request("/modalities/scp/store", body)

    def use_scp(self, port: int) -> None:
        modality = {"AET": "IMAGING_SCP", "Host": "127.0.0.1", "Port": port}
        self.request("/modalities/scp", modality, method="PUT")

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"Orthanc exited: {self.log_path.read_text()}"
            try:
                self.request("/system")
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"Orthanc did not answer /system: {self.log_path.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="module")
def orthanc_process(tmp_path_factory):
    instance = Orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        instance.wait_ready()
        yield instance
    finally:
        instance.stop()  # takes Orthanc ~3 s: one process for the module


@pytest.fixture
def orthanc(orthanc_process, server):
    """Orthanc, with the server under test as its modality "scp"."""
    orthanc_process.use_scp(server.port)
    return orthanc_process


@requires_orthanc
def test_orthanc_sends_a_study_and_compressed_files_byte_for_byte(server, orthanc, tmp_path):
    root = bundled_test_files()[0].parent
    compressed = [root / name for name in ORTHANC_VERBATIM]
    sent = two_series_study(tmp_path / "study", 20) + compressed

    job = orthanc.push(orthanc.upload(sent))

    assert (job["InstancesCount"], job["FailedInstancesCount"]) == (len(sent), 0), job
    assert_stored_exactly(server, sent)  # compressed ones included: nothing transcoded
    ends = server.wait_for_event("association.end")
    assert ends[-1]["calling_ae"] == "ORTHANC"


@pytest.fixture
def committing_server(orthanc_process, server_factory):
    """A server that knows where Orthanc listens for storage commitment reports,
    as Orthanc's modality "scp"."""
    server = server_factory("--peer", f"ORTHANC=127.0.0.1:{orthanc_process.dicom_port}")
    orthanc_process.use_scp(server.port)
    return server


def orthanc_commitment(orthanc, transaction_uid: str, timeout: float = 20) -> dict:
    """Orthanc's own record of a storage commitment report, once it has one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = orthanc.request(f"/storage-commitment/{transaction_uid}")
        if report["Status"] != "Pending":
            return report
        time.sleep(0.1)
    raise AssertionError(f"Orthanc got no report for {transaction_uid}")


@requires_orthanc
def test_orthanc_push_with_storage_commitment_succeeds_end_to_end(
    committing_server, orthanc_process, tmp_path
):
    orthanc = orthanc_process
    sent = two_series_study(tmp_path / "study", 10)

    job = orthanc.push(orthanc.upload(sent), commitment=True)

    assert (job["InstancesCount"], job["FailedInstancesCount"]) == (10, 0), job
    report = orthanc_commitment(orthanc, job["StorageCommitmentTransactionUID"])
    assert report["Status"] == "Success", report
    sent_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in sent}
    assert {item["SOPInstanceUID"] for item in report["Success"]} == sent_uids
    assert report["Failures"] == []
    assert_stored_exactly(committing_server, sent)
    states = {r[0] for r in committing_server.index().execute("SELECT committed_at FROM series")}
    assert None not in states  # both series complete


@requires_orthanc
def test_orthanc_is_told_which_instance_is_no_longer_on_our_disk_and_can_resend_it(
    committing_server, orthanc_process, tmp_path
):
    orthanc = orthanc_process
    sent = two_series_study(tmp_path / "study", 4)
    study = orthanc.upload(sent)
    orthanc.push(study)
    lost = pydicom.dcmread(sent[2], stop_before_pixels=True)
    stored = (
        committing_server.index()
        .execute("SELECT path FROM instances WHERE sop_instance_uid = ?", (lost.SOPInstanceUID,))
        .fetchone()[0]
    )
    (committing_server.data_dir / stored).unlink()
    instances = [
        {"SOPClassUID": ds.SOPClassUID, "SOPInstanceUID": ds.SOPInstanceUID}
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in sent)
    ]

    asked = orthanc.request("/modalities/scp/storage-commitment", {"DicomInstances": instances})

    report = orthanc_commitment(orthanc, asked["ID"])
    assert report["Status"] == "Failure", report
    assert [f["SOPInstanceUID"] for f in report["Failures"]] == [lost.SOPInstanceUID]
    assert report["Failures"][0]["FailureReason"] == 0x0110
    assert len(report["Success"]) == 3

    # What a modality does next: it sends the study again, and asks again.
    job = orthanc.push(study, commitment=True)
    again = orthanc_commitment(orthanc, job["StorageCommitmentTransactionUID"])
    assert again["Status"] == "Success", again
    assert_stored_exactly(committing_server, sent)  # the lost file is back, byte for byte
    assert "restored" in {e["outcome"] for e in committing_server.events("instance.stored")}


@requires_orthanc
def test_orthanc_echo_is_answered(server, orthanc):
    assert orthanc.request("/modalities/scp/echo", {}) == {}
    assert server.wait_for_event("echo")


# --- dcmtk storescu / echoscu ----------------------------------------------------


@requires_dcmtk()
@requires_dcmtk(ECHOSCU)
@pytest.mark.parametrize("nodelay", [False, True], ids=["nagle-on", "tcp-nodelay"])
def test_dcmtk_sends_a_folder_byte_for_byte_without_stalling(server, tmp_path, nodelay):
    folder = tmp_path / "folder"
    sent = two_series_study(folder, 30)
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    target = ["-aec", "IMAGING_SCP", "127.0.0.1", str(server.port)]
    echo = subprocess.run([ECHOSCU, *target], capture_output=True, timeout=30, env=env)
    assert echo.returncode == 0, echo.stderr.decode()

    started = time.monotonic()
    result = subprocess.run(
        [STORESCU, "+sd", "+r", *target, str(folder)], capture_output=True, timeout=60, env=env
    )
    elapsed = time.monotonic() - started

    assert result.returncode == 0, result.stderr.decode()
    assert_stored_exactly(server, sent)
    ends = server.wait_for_event("association.end", count=2)
    assert [e["instances"] for e in ends] == [0, 30]  # the echo, then one association
    # 0.04-0.3 s here. A receiver that lets Nagle meet delayed ACKs stalls ~40 ms
    # per object: pynetdicom's own storescp took 1.36 s for these 30 (0.11 s with
    # TCP_NODELAY), so 1.2 s catches the stall and leaves a loaded box 4x headroom.
    assert elapsed < 1.2, f"30 instances took {elapsed:.2f} s"


# --- pynetdicom as the SCU -------------------------------------------------------


def _associate(port: int, contexts: list[tuple[str, str]], *, max_pdu=None, ext_neg=None):
    ae = AE("INTEROP")
    if max_pdu is not None:
        ae.maximum_pdu_size = max_pdu
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGING_SCP", ext_neg=ext_neg)
    assert assoc.is_established, "association was not accepted"
    return assoc


def _store_all(assoc, paths: list[Path]) -> list[int]:
    return [assoc.send_c_store(path).Status for path in paths]


def test_storage_contexts_get_the_syntax_we_prefer_and_others_are_rejected(server):
    # Any storage-like SOP class (private ones too) in whichever syntax is
    # proposed: a compressed one as sent, else Explicit VR Little Endian; a
    # service we do not offer (Composite Instance Root Retrieve - MOVE) is
    # rejected, "abstract syntax not supported".
    move = "1.2.840.10008.5.1.4.1.2.4.2"
    assoc = _associate(
        server.port,
        [
            (PRIVATE_SOP_CLASS, [ImplicitVRLittleEndian, JPEGBaseline8Bit, ExplicitVRLittleEndian]),
            (
                CT_IMAGE_STORAGE,
                [ImplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian],
            ),
            (move, [ImplicitVRLittleEndian]),
        ],
    )
    try:
        accepted = {cx.abstract_syntax: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
    finally:
        assoc.release()
    assert accepted == {
        PRIVATE_SOP_CLASS: JPEGBaseline8Bit,
        CT_IMAGE_STORAGE: ExplicitVRLittleEndian,
    }
    assert rejected == {move: 0x03}


def test_a_worklist_query_context_is_rejected_not_taken_for_storage(server):
    # pynetdicom's keyword for it differs from pydicom's: it was once accepted
    # as an unknown (so storage-like) SOP class, though we serve no worklist.
    worklist = "1.2.840.10008.5.1.4.31"
    assoc = _associate(
        server.port,
        [(CT_IMAGE_STORAGE, ExplicitVRLittleEndian), (worklist, ImplicitVRLittleEndian)],
    )
    try:
        rejected = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
    finally:
        assoc.release()
    assert rejected == {worklist: 0x03}


def test_one_association_with_many_sop_classes_and_an_echo(server, tmp_path):
    study, series = generate_uid(), generate_uid()
    classes = [CT_IMAGE_STORAGE, MR_IMAGE_STORAGE, SECONDARY_CAPTURE, PRIVATE_SOP_CLASS]
    sent = [
        make_instance(tmp_path, study_uid=study, series_uid=series, sop_class_uid=sop_class)
        for sop_class in classes
        for _ in range(2)
    ]
    contexts = [(c, ExplicitVRLittleEndian) for c in classes]
    assoc = _associate(server.port, [*contexts, (VERIFICATION, ImplicitVRLittleEndian)])
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert accepted == {*classes, VERIFICATION}
        statuses = _store_all(assoc, sent)
        echo = assoc.send_c_echo()
    finally:
        assoc.release()
    assert statuses == [0x0000] * len(sent)
    assert echo.Status == 0x0000
    assert_stored_exactly(server, sent)


@pytest.mark.parametrize("requested_max_pdu", [0, 16384, 1048576], ids=["unlimited", "16k", "1M"])
def test_maximum_pdu_negotiation_and_a_600_kb_instance(server, tmp_path, requested_max_pdu):
    big = make_instance(tmp_path, study_uid=generate_uid(), series_uid=generate_uid(), pixels=550)
    assert big.stat().st_size > 600_000
    assoc = _associate(
        server.port, [(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)], max_pdu=requested_max_pdu
    )
    try:
        # Whatever the requestor offers, the server announces its own bounded limit.
        assert assoc.acceptor.maximum_length == SERVER_MAX_PDU
        statuses = _store_all(assoc, [big])
    finally:
        assoc.release()
    assert statuses == [0x0000]
    assert_stored_exactly(server, [big])


def test_asynchronous_operations_window_is_answered_one_one(server, tmp_path):
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 5
    sent = two_series_study(tmp_path, 3)
    assoc = _associate(server.port, [(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)], ext_neg=[window])
    try:
        # pynetdicom's `asynchronous_operations` says (1, 1) when the reply has no item at
        # all, so look for the item itself: the A-ASSOCIATE-AC must answer the proposal.
        replies = [
            (item.maximum_number_operations_invoked, item.maximum_number_operations_performed)
            for item in assoc.acceptor.user_information
            if isinstance(item, AsynchronousOperationsWindowNegotiation)
        ]
        statuses = _store_all(assoc, sent)
    finally:
        assoc.release()
    assert statuses == [0x0000] * len(sent)
    assert_stored_exactly(server, sent)
    assert replies == [(1, 1)], "no Asynchronous Operations Window reply of 1/1"


def test_scu_role_selection_is_accepted(server, tmp_path):
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = CT_IMAGE_STORAGE
    role.scu_role = True
    role.scp_role = False
    sent = two_series_study(tmp_path, 2)
    assoc = _associate(server.port, [(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)], ext_neg=[role])
    try:
        (context,) = assoc.accepted_contexts
        assert (context.as_scu, context.as_scp) == (True, False)  # we send, they receive
        statuses = _store_all(assoc, sent)
    finally:
        assoc.release()
    assert statuses == [0x0000] * len(sent)
    assert_stored_exactly(server, sent)
