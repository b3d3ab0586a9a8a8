"""Storage commitment: a modality (pynetdicom's requestor, and Orthanc in
test_interop) pushes instances, asks for commitment, and gets a report that
says what is really on our disk — on its association, or on a new one to the
address `peers` gives for it."""

import json
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from scp.cli import main
from scp.config import ConfigError, load_config, peer_address
from storage.fhir import STATE_EXTENSION_URL
from tests.conftest import (
    CT_IMAGE_STORAGE,
    IMAGING_SCP,
    STORESCU,
    both_indexes,
    dataset_bytes,
    free_port,
    make_instance,
    requires_dcmtk,
    send_files,
    start_server,
)

pytestmark = both_indexes

COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
MODALITY = "MODALITY"


def a_series(directory: Path, count: int, study_uid: str | None = None) -> list[Path]:
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    return [
        make_instance(directory, study_uid=study_uid, series_uid=series_uid, InstanceNumber=n)
        for n in range(1, count + 1)
    ]


def references(paths: list[Path], sop_class: str = CT_IMAGE_STORAGE) -> list[tuple[str, str]]:
    return [(sop_class, pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            for path in paths]  # fmt: skip


def action_information(transaction_uid: str, refs: list[tuple[str, str]]) -> Dataset:
    info = Dataset()
    info.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    info.ReferencedSOPSequence = items
    return info


class Reports:
    """N-EVENT-REPORTs a modality receives, on whichever association."""

    def __init__(self, answer_after: float = 0.0):
        self.received: list[tuple[int, Dataset]] = []
        self._arrived = threading.Condition()
        self.answer_after = answer_after  # a slow modality: seconds before its RSP

    def handle(self, event):
        with self._arrived:
            self.received.append((event.event_type, event.event_information))
            self._arrived.notify_all()
        time.sleep(self.answer_after)
        return 0x0000, None

    def wait(self, count: int = 1, timeout: float = 15) -> list[tuple[int, Dataset]]:
        with self._arrived:
            self._arrived.wait_for(lambda: len(self.received) >= count, timeout)
        assert len(self.received) >= count, f"{len(self.received)} reports, not {count}"
        return self.received


def request_commitment(
    server,
    transaction_uid: str,
    refs: list[tuple[str, str]],
    *,
    reports: Reports | None = None,
    wait_for_report: bool = True,
    tls_args=None,
) -> int:
    """N-ACTION as MODALITY; the N-ACTION-RSP status. With `wait_for_report`,
    the association stays open until the report has come on it and been
    answered (the server logs it then)."""
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(StorageCommitmentPushModel, ExplicitVRLittleEndian)
    handlers = [(evt.EVT_N_EVENT_REPORT, reports.handle)] if reports else []
    assoc = ae.associate(
        "127.0.0.1", server.port, ae_title="IMAGING_SCP", evt_handlers=handlers, tls_args=tls_args
    )
    assert assoc.is_established
    reported_before = len(reported(server, transaction_uid))
    try:
        status, _ = assoc.send_n_action(
            action_information(transaction_uid, refs),
            1,
            StorageCommitmentPushModel,
            COMMITMENT_INSTANCE,
        )
        if wait_for_report:
            reports.wait()
            deadline = time.monotonic() + 10
            while len(reported(server, transaction_uid)) == reported_before:
                assert time.monotonic() < deadline, "the report was not answered"
                time.sleep(0.02)
    finally:
        assoc.release()
    return status.Status


def reported(server, transaction_uid: str) -> list[dict]:
    return [
        e for e in server.events("commitment.reported") if e["transaction_uid"] == transaction_uid
    ]


class Peer:
    """The modality's own listener, where reports on a new association arrive."""

    def __init__(self, port: int | None = None, answer_after: float = 0.0):
        self.port = port or free_port()
        self.reports = Reports(answer_after)
        self.ae = AE(ae_title=MODALITY)
        self.ae.add_supported_context(
            StorageCommitmentPushModel, ExplicitVRLittleEndian, scu_role=True, scp_role=True
        )
        self.server = None

    def start(self) -> "Peer":
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, self.reports.handle)],
        )
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def committed_uids(info: Dataset) -> list[str]:
    return [item.ReferencedSOPInstanceUID for item in info.get("ReferencedSOPSequence", [])]


def failures(info: Dataset) -> dict[str, int]:
    return {
        item.ReferencedSOPInstanceUID: item.FailureReason
        for item in info.get("FailedSOPSequence", [])
    }


def cli(*args: str) -> dict | list:
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_report_on_the_same_association_commits_every_stored_instance(server, tmp_path):
    paths = a_series(tmp_path / "series", 3)
    send_files(server.port, paths, calling=MODALITY)
    transaction = generate_uid()
    reports = Reports()

    status = request_commitment(server, transaction, references(paths), reports=reports)

    assert status == 0x0000
    [(event_type, info)] = reports.received
    assert event_type == 1  # all committed
    assert info.TransactionUID == transaction
    assert info.RetrieveAETitle == "IMAGING_SCP"
    assert sorted(committed_uids(info)) == sorted(uid for _, uid in references(paths))
    assert "FailedSOPSequence" not in info
    reported = server.wait_for_event("commitment.reported")[0]
    assert reported["delivery"] == "same association"
    checked = server.events("commitment.checked")[0]
    assert (checked["committed"], checked["failed"]) == (3, 0)
    # The request was durable before its Success: recorded, then delivered.
    [row] = cli("commitments", *server.index_flags)
    assert (row["transactionUid"], row["committed"], row["failed"]) == (transaction, 3, 0)
    assert row["delivery"] == "delivered"
    study = cli("study", *server.index_flags, row["studies"][0])
    assert study["state"] == "complete"
    assert [s["state"] for s in study["series"]] == ["complete"]
    resource = json.loads(
        CliRunner().invoke(main, ["fhir", *server.index_flags, row["studies"][0]]).output
    )
    assert {"url": STATE_EXTENSION_URL, "valueCode": "complete"} in resource["extension"]


def test_failures_are_reported_each_with_its_reason(server, tmp_path):
    good, damaged, other_class = a_series(tmp_path / "series", 3)
    send_files(server.port, [good, damaged, other_class], calling=MODALITY)
    [(_, damaged_uid), (_, class_uid)] = references([damaged, other_class])
    stored = (
        server.index()
        .execute("SELECT path FROM instances WHERE sop_instance_uid = ?", (damaged_uid,))
        .fetchone()[0]
    )
    file = server.data_dir / stored
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF  # one bit of pixel data flipped on disk
    file.write_bytes(data)
    never_sent = generate_uid()
    refs = [
        *references([good, damaged]),
        (MR_IMAGE_STORAGE, class_uid),  # stored as CT
        (CT_IMAGE_STORAGE, never_sent),
    ]
    reports = Reports()

    request_commitment(server, generate_uid(), refs, reports=reports)

    [(event_type, info)] = reports.received
    assert event_type == 2  # failures exist
    assert committed_uids(info) == [refs[0][1]]
    assert failures(info) == {damaged_uid: 0x0110, class_uid: 0x0119, never_sent: 0x0112}
    checked = server.wait_for_event("commitment.checked")[0]
    assert checked["by_reason"] == {"damaged": 1, "class conflict": 1, "missing": 1}
    study_uid = server.index().execute("SELECT study_uid FROM studies").fetchone()[0]
    study = cli("study", *server.index_flags, study_uid)
    assert study["state"] == "incomplete"
    assert "3 of 4 not committed" in study["series"][0]["incompleteReason"]


def test_a_copy_kept_aside_does_not_commit_a_damaged_indexed_one(server, tmp_path):
    [first] = a_series(tmp_path / "first", 1)
    send_files(server.port, [first], calling=MODALITY)
    ds = pydicom.dcmread(first)
    ds.PatientName = "Other^Bytes"  # the same SOP Instance UID, other bytes: kept aside
    resent = tmp_path / "resent.dcm"
    ds.save_as(resent)
    send_files(server.port, [resent], calling=MODALITY)
    assert server.index().execute("SELECT count(*) FROM conflicts").fetchone()[0] == 1
    (stored,) = server.index().execute("SELECT path FROM instances").fetchone()
    (server.data_dir / stored).unlink()
    reports = Reports()

    request_commitment(server, generate_uid(), references([first]), reports=reports)

    [(event_type, info)] = reports.received
    assert event_type == 2
    assert failures(info) == {ds.SOPInstanceUID: 0x0110}


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """A group-0002 element, explicit VR little endian (OB in the long form)."""
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _with_elements_outside_the_meta_group_length(source: Path) -> tuple[Path, bytes]:
    """A copy of `source` shaped like the OsiriX-exported GE ultrasound file of
    issue 29: group-0002 elements after its meta group that the group length
    (0002,0000) leaves out. dcmtk reads them as the dataset's first elements,
    and sends them so. Returns the file and the dataset bytes storescu sends."""
    creator = generate_uid().encode()
    stray = _meta_element(0x0100, b"UI", creator + b"\x00" * (len(creator) % 2))
    stray += _meta_element(0x0102, b"OB", b"OSIRIX")
    data = source.read_bytes()
    dataset = dataset_bytes(source)
    shaped = source.with_name("outside-group-length.dcm")
    shaped.write_bytes(data[: len(data) - len(dataset)] + stray + dataset)
    return shaped, stray + dataset


def _stored_dataset(path: Path) -> bytes:
    """A stored file's bytes after the meta group its group length delimits."""
    data = path.read_bytes()
    (group_length,) = struct.unpack_from("<I", data, 128 + 4 + 8)
    return data[128 + 4 + 12 + group_length :]


@requires_dcmtk()
def test_a_file_with_meta_elements_outside_its_group_length_is_intact_for_every_reader(
    server, tmp_path
):
    """Issue 29 #5: ingest hashed the dataset as sent, with the stray group-0002
    elements first; every later read took them for our meta group, so `verify
    --checksum` exited 1, a commitment failed 0x0110 (study incomplete), an
    identical resend was taken for a repair, and a rebuild recorded another
    checksum and lost the receipt (the stray elements' (0002,0102) read as ours)."""
    [source] = a_series(tmp_path / "series", 1)
    shaped, sent = _with_elements_outside_the_meta_group_length(source)
    storescu = [STORESCU, "-R", "-aet", MODALITY, "-aec", "IMAGING_SCP"]
    storescu += ["127.0.0.1", str(server.port), str(shaped)]
    subprocess.run(storescu, check=True, capture_output=True, timeout=30)
    (stored,) = server.index().execute("SELECT path FROM instances").fetchone()
    assert _stored_dataset(server.data_dir / stored) == sent  # what dcmtk sent, kept whole

    verify = [IMAGING_SCP, "verify", "--checksum", *server.index_flags]
    checked = subprocess.run(verify, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    reports = Reports()
    request_commitment(server, generate_uid(), references([source]), reports=reports)
    [(event_type, info)] = reports.received
    assert (event_type, failures(info)) == (1, {})
    assert committed_uids(info) == [uid for _, uid in references([source])]
    study_uid = server.index().execute("SELECT study_uid FROM studies").fetchone()[0]
    assert cli("study", *server.index_flags, study_uid)["state"] == "complete"

    subprocess.run(storescu, check=True, capture_output=True, timeout=30)
    outcomes = [e["outcome"] for e in server.wait_for_event("instance.stored", count=2)]
    assert outcomes == ["stored", "identical-resend"]

    # Rebuilt from the file, the row is the one ingest made (checksum, receipt).
    indexed = [tuple(row) for row in server.index().execute("SELECT * FROM instances")]
    rebuild = [IMAGING_SCP, "rebuild", *server.index_flags]
    subprocess.run(rebuild, check=True, capture_output=True, timeout=60)
    assert [tuple(row) for row in server.index().execute("SELECT * FROM instances")] == indexed


def test_a_later_successful_commitment_makes_the_series_complete(server, tmp_path):
    paths = a_series(tmp_path / "series", 2)
    send_files(server.port, paths[:1], calling=MODALITY)
    first = Reports()
    request_commitment(server, generate_uid(), references(paths), reports=first)
    assert first.received[0][0] == 2
    send_files(server.port, paths[1:], calling=MODALITY)  # the missing one, sent again
    second = Reports()

    request_commitment(server, generate_uid(), references(paths), reports=second)

    assert second.received[0][0] == 1
    study_uid = server.index().execute("SELECT study_uid FROM studies").fetchone()[0]
    assert cli("study", *server.index_flags, study_uid)["state"] == "complete"


def test_an_abort_after_a_successful_commitment_leaves_the_series_complete(server, tmp_path):
    """Some modalities end with an A-ABORT instead of a release. After their own
    list was committed, that says nothing about completeness."""
    paths = a_series(tmp_path / "series", 2)
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    ae.add_requested_context(StorageCommitmentPushModel, ExplicitVRLittleEndian)
    reports = Reports()
    assoc = ae.associate(
        "127.0.0.1",
        server.port,
        ae_title="IMAGING_SCP",
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handle)],
    )
    for path in paths:
        assert assoc.send_c_store(path).Status == 0x0000
    assoc.send_n_action(
        action_information(generate_uid(), references(paths)),
        1,
        StorageCommitmentPushModel,
        COMMITMENT_INSTANCE,
    )
    reports.wait()
    server.wait_for_event("commitment.reported")
    assoc.abort()
    server.wait_for_event("association.end")

    study_uid = server.index().execute("SELECT study_uid FROM studies").fetchone()[0]
    assert cli("study", *server.index_flags, study_uid)["state"] == "complete"
    assert server.events("series.incomplete") == []


def test_a_repeated_transaction_uid(server, tmp_path):
    """The same request again (a lost N-ACTION-RSP): Success and the same report.
    The same UID for other instances: 0x0131, and no report."""
    paths = a_series(tmp_path / "series", 2)
    send_files(server.port, paths, calling=MODALITY)
    transaction = generate_uid()
    refs = references(paths)
    first, again = Reports(), Reports()
    request_commitment(server, transaction, refs, reports=first)

    assert request_commitment(server, transaction, refs, reports=again) == 0x0000
    assert committed_uids(again.received[0][1]) == committed_uids(first.received[0][1])

    other = Reports()
    status = request_commitment(server, transaction, refs[:1], reports=other, wait_for_report=False)
    assert status == 0x0131
    time.sleep(0.5)
    assert other.received == []
    refused = server.wait_for_event("commitment.refused")[0]
    assert transaction in refused["reason"]


def test_report_on_a_new_association_when_the_modality_released(server_factory, tmp_path):
    peer = Peer().start()
    try:
        server = server_factory("--peer", f"{MODALITY}=127.0.0.1:{peer.port}")
        paths = a_series(tmp_path / "series", 3)
        send_files(server.port, paths, calling=MODALITY)
        transaction = generate_uid()

        status = request_commitment(server, transaction, references(paths), wait_for_report=False)

        assert status == 0x0000
        [(event_type, info)] = peer.reports.wait()
        assert (event_type, info.TransactionUID) == (1, transaction)
        assert len(committed_uids(info)) == 3
        reported = server.wait_for_event("commitment.reported")[0]
        assert reported["delivery"] == "new association"
    finally:
        peer.stop()


def test_a_modality_with_no_known_address_is_told_in_the_log(server, tmp_path):
    paths = a_series(tmp_path / "series", 1)
    send_files(server.port, paths, calling=MODALITY)

    request_commitment(server, generate_uid(), references(paths), wait_for_report=False)

    failed = server.wait_for_event("commitment.delivery_failed")[0]
    assert "no address for AE 'MODALITY' in peers" in failed["reason"]
    [row] = cli("commitments", *server.index_flags)
    assert row["delivery"] == "failed"


def test_a_peer_down_at_report_time_gets_the_report_by_a_retry(server_factory, tmp_path):
    port = free_port()
    server = server_factory(
        "--peer", f"{MODALITY}=127.0.0.1:{port}", "--report-retry-interval", "1"
    )
    paths = a_series(tmp_path / "series", 2)
    send_files(server.port, paths, calling=MODALITY)
    transaction = generate_uid()
    request_commitment(server, transaction, references(paths), wait_for_report=False)
    server.wait_for_event("commitment.delivery_failed")
    assert cli("commitments", "--pending", *server.index_flags)

    time.sleep(5)
    peer = Peer(port).start()
    try:
        [(event_type, info)] = peer.reports.wait(timeout=30)
        assert (event_type, info.TransactionUID) == (1, transaction)
        assert server.wait_for_event("commitment.reported")[0]["attempts"] >= 2
        assert cli("commitments", "--pending", *server.index_flags) == []
    finally:
        peer.stop()


def test_a_pending_report_survives_a_kill_and_is_delivered_once(tmp_path):
    port = free_port()
    data_dir = tmp_path / "data"
    flags = ("--peer", f"{MODALITY}=127.0.0.1:{port}", "--report-retry-interval", "600")
    server = start_server(data_dir, *flags)
    try:
        paths = a_series(tmp_path / "series", 2)
        send_files(server.port, paths, calling=MODALITY)
        transaction = generate_uid()
        request_commitment(server, transaction, references(paths), wait_for_report=False)
        server.wait_for_event("commitment.delivery_failed")
    finally:
        server.stop(signal.SIGKILL)
    peer = Peer(port).start()
    restarted = start_server(data_dir, *flags)
    try:
        [(_, info)] = peer.reports.wait()
        assert info.TransactionUID == transaction
        restarted.wait_for_event("commitment.reported")
        time.sleep(6)  # the Reporter's next rounds send nothing more
        assert len(peer.reports.received) == 1
    finally:
        restarted.stop()
        peer.stop()


@pytest.mark.parametrize(
    "change, status",
    [
        ({"action_type": 2}, 0x0123),
        ({"instance": "1.2.3.4"}, 0x0117),
        ({"refs": []}, 0x0115),
        ({"transaction": "not a uid"}, 0x0115),
    ],
)
def test_a_malformed_request_gets_a_failure_status_and_the_association_goes_on(
    server, change, status
):
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(StorageCommitmentPushModel, ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", server.port, ae_title="IMAGING_SCP")
    try:
        info = action_information(
            change.get("transaction", generate_uid()),
            change.get("refs", [(CT_IMAGE_STORAGE, generate_uid())]),
        )
        response, _ = assoc.send_n_action(
            info,
            change.get("action_type", 1),
            StorageCommitmentPushModel,
            change.get("instance", COMMITMENT_INSTANCE),
        )
        assert response.Status == status
        assert response.ErrorComment
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert server.wait_for_event("commitment.refused")[0]["status"] == f"0x{status:04X}"


def test_peers_from_a_toml_table_and_from_flags(tmp_path):
    config_file = tmp_path / "config.toml"
    config_file.write_text('[peers]\nORTHANC = "127.0.0.1:4242"\n"CT 1" = "[::1]:104"\n')
    config = load_config(config_file, peers=("PACS=pacs.example:11112",))
    assert peer_address(config, "PACS") == ("pacs.example", 11112)  # the flag wins
    assert peer_address(config, "ORTHANC") is None
    config = load_config(config_file)
    assert peer_address(config, "ORTHANC") == ("127.0.0.1", 4242)
    assert peer_address(config, "CT 1") == ("::1", 104)
    assert peer_address(config, "NOBODY") is None
    for bad in ("PACS", "PACS=host", "PACS=host:0", "=host:104"):
        with pytest.raises(ConfigError, match="key 'peers'"):
            load_config(peers=(bad,))


def test_with_two_workers_every_report_reaches_the_modality_once(server_factory, tmp_path):
    """A worker process that took the request hands the report over through the
    index; the main process delivers it (within 5 s), once."""
    peer = Peer().start()
    try:
        server = server_factory("--workers", "2", "--peer", f"{MODALITY}=127.0.0.1:{peer.port}")
        paths = a_series(tmp_path / "series", 1)
        send_files(server.port, paths, calling=MODALITY)
        transactions: list[str] = []

        def processes() -> set[str]:  # the pid part of the association ids
            return {e["assoc"].split("-")[0] for e in server.events("commitment.requested")}

        # SO_REUSEPORT spreads associations over both processes by their ports:
        # ask until each process has taken a request.
        while len(transactions) < 4 or len(processes()) < 2:
            assert len(transactions) < 40, "every request went to one process"
            transactions.append(generate_uid())
            request_commitment(server, transactions[-1], references(paths), wait_for_report=False)
            server.wait_for_event("commitment.requested", count=len(transactions))
        received = peer.reports.wait(count=len(transactions), timeout=30)
        time.sleep(6)  # a Reporter round more: nothing is sent twice
        assert sorted(info.TransactionUID for _, info in peer.reports.received) == sorted(
            transactions
        )
        assert len(received) == len(transactions)
    finally:
        peer.stop()
