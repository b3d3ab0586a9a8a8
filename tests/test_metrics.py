"""The Prometheus endpoint (metrics_port), scraped around real associations:
dcmtk's storescu, echoscu, findscu, movescu and getscu, pynetdicom's C-MOVE and
C-GET, a storage commitment, and two workers."""

import os
import socket
import struct
import subprocess
import time
import urllib.request

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

from scp.config import ConfigError, load_config
from tests.conftest import (
    CT_IMAGE_STORAGE,
    ECHOSCU,
    IMAGING_SCP,
    STORESCU,
    association_rejection,
    both_indexes,
    free_port,
    make_instance,
    requires_dcmtk,
    send_files,
)
from tests.test_commitment import Reports, references, request_commitment
from tests.test_find import RAW_CONTEXTS, STUDY_ROOT_FIND, findscu, raw_find, requires_findscu
from tests.test_hostile import RawAssociation, _uid, command_set, p_data
from tests.test_retrieve import DEST, Storescp, getscu, move, movescu, study_identifier

pytestmark = [both_indexes, requires_dcmtk(), requires_findscu]


class Scrape(dict):
    """One scrape: (sample name, sorted labels) -> value."""

    def __call__(self, name: str, **labels) -> float:
        return self.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str) -> float:
        return sum(value for (sample, _), value in self.items() if sample == name)


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return Scrape(
        ((sample.name, tuple(sorted(sample.labels.items()))), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    )


def after(port: int, before: Scrape, associations: int, timeout: float = 10) -> Scrape:
    """The scrape once `associations` more have ended (a sender returns from its
    release before the server has counted it)."""
    deadline = time.monotonic() + timeout
    while True:
        now = scrape(port)
        ended = now.total("imaging_scp_associations_total")
        if ended - before.total("imaging_scp_associations_total") >= associations:
            return now
        assert time.monotonic() < deadline, f"{ended} associations ended"
        time.sleep(0.05)


def storescu(port: int, *paths) -> None:
    subprocess.run(
        [STORESCU, "-aec", "IMAGING_SCP", "127.0.0.1", str(port), *map(str, paths)],
        check=True,
        capture_output=True,
        timeout=60,
    )


def echoscu(port: int, called: str = "IMAGING_SCP") -> int:
    return subprocess.run(
        [ECHOSCU, "-aec", called, "127.0.0.1", str(port)], capture_output=True, timeout=30
    ).returncode


def without_identifier(assoc: RawAssociation, sop_class: str, field: int) -> int:
    """Send a request of `field` on context 1 announcing no data set; the status answered."""
    command = command_set({
        0x0002: _uid(sop_class),
        0x0100: struct.pack("<H", field),
        0x0110: struct.pack("<H", 8),
        0x0800: struct.pack("<H", 0x0101),  # no data set
    })  # fmt: skip
    assoc.sock.sendall(p_data(1, command, command=True))
    return assoc.next_response().status


def test_a_scrape_counts_what_the_associations_did_exactly(server_factory, tmp_path):
    metrics_port = free_port()
    server = server_factory(
        "--metrics-port", str(metrics_port), "--duplicates", "reject", "--min-free-space", "5MB"
    )
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = [
        make_instance(tmp_path / "files", study_uid=study_uid, series_uid=series_uid)
        for _ in range(3)
    ]
    resent_uid = pydicom.dcmread(paths[0]).SOPInstanceUID
    other_bytes = make_instance(
        tmp_path / "other",
        study_uid=study_uid,
        series_uid=series_uid,
        sop_instance_uid=resent_uid,
        pixels=32,
    )
    before = scrape(metrics_port)

    storescu(server.port, *paths)  # 3 stored
    assert [s.status for s in send_files(server.port, [paths[0], other_bytes])] == [0, 0xC004]
    assert echoscu(server.port) == 0
    assert association_rejection(server.port, called="SOMEONE_ELSE") is not None
    responses, _ = findscu(server.port, "STUDY", f"StudyInstanceUID={study_uid}")
    assert len(responses) == 1
    with RawAssociation(server.port, RAW_CONTEXTS) as assoc:  # two queries refused
        assoc.sock.sendall(raw_find(assoc, b"\x20\x00\x0d\x00UI\x00\x00"))  # no level
        assert assoc.next_response().status == 0xA900
        assert without_identifier(assoc, STUDY_ROOT_FIND, 0x0020) == 0xC000  # C-FIND-RQ
        assoc.release()
    now = after(metrics_port, before, associations=6)

    def moved(name: str, **labels) -> float:
        return now(name, **labels) - before(name, **labels)

    assert moved("imaging_scp_instances_stored_total", outcome="stored") == 3
    assert moved("imaging_scp_instances_stored_total", outcome="identical-resend") == 1
    assert now.total("imaging_scp_instances_stored_total") == 4
    assert moved("imaging_scp_instances_refused_total", status="0xC004") == 1
    assert now.total("imaging_scp_instances_refused_total") == 1
    stored = server.events("instance.stored")
    assert moved("imaging_scp_received_bytes_total") == sum(e["bytes"] for e in stored)
    for stage in ("receive", "check", "fsync", "place", "index"):
        timed = [e["timings"][stage] / 1000 for e in stored if stage in e["timings"]]
        assert moved("imaging_scp_store_stage_seconds_count", stage=stage) == len(timed), stage
        assert moved("imaging_scp_store_stage_seconds_sum", stage=stage) == pytest.approx(
            sum(timed)
        )
    # An identical resend is known before it is written: no stages timed.
    assert moved("imaging_scp_store_stage_seconds_count", stage="fsync") == 3
    assert moved("imaging_scp_associations_total", outcome="released") == 5
    assert moved("imaging_scp_associations_total", outcome="rejected") == 1
    assert (
        moved("imaging_scp_associations_rejected_total", reason="called-ae-title-not-recognized")
        == 1
    )
    assert now("imaging_scp_associations_active") == 0
    assert moved("imaging_scp_find_queries_total", outcome="success") == 1
    assert moved("imaging_scp_find_queries_total", outcome="refused") == 2
    assert moved("imaging_scp_find_matches_total") == 1
    # The index's size from its maintained counts; the disk against its floor.
    assert now("imaging_scp_index_studies") == 1
    assert now("imaging_scp_index_series") == 1
    assert now("imaging_scp_index_instances") == 3
    assert now("imaging_scp_index_bytes") == sum(
        e["bytes"] for e in stored if e["outcome"] == "stored"
    )
    assert now("imaging_scp_index_available") == 1
    assert now("imaging_scp_data_free_floor_bytes") == 5_000_000
    assert now("imaging_scp_data_free_bytes") > 0
    assert now("process_resident_memory_bytes") > 0  # the client's default collectors
    assert server.events("metrics.listening")[0]["port"] == metrics_port


def test_every_count_is_exported_at_zero_before_its_first_event(server_factory):
    """So that increase() and rate() see the first one: Prometheus takes a series
    that appears at 1 as having always been 1."""
    metrics_port = free_port()
    server_factory("--metrics-port", str(metrics_port))

    first = scrape(metrics_port)

    for sample, labels in [
        ("imaging_scp_instances_refused_total", {"status": "0xA700"}),
        ("imaging_scp_instances_refused_total", {"status": "0xC0FF"}),
        ("imaging_scp_associations_total", {"outcome": "aborted"}),
        ("imaging_scp_associations_rejected_total", {"reason": "local-limit-exceeded"}),
        ("imaging_scp_find_queries_total", {"outcome": "failed"}),
        ("imaging_scp_retrieve_requests_total", {"operation": "move", "outcome": "refused"}),
        ("imaging_scp_retrieve_requests_total", {"operation": "get", "outcome": "failed"}),
        ("imaging_scp_retrieve_suboperations_total", {"operation": "move", "result": "failed"}),
        ("imaging_scp_commitment_refused_total", {"status": "0x0131"}),
        ("imaging_scp_commitment_reports_ended_total", {"outcome": "given-up"}),
    ]:
        assert first.get((sample, tuple(sorted(labels.items())))) == 0, (sample, labels)


def test_a_storage_commitment_is_counted_by_result_and_report(server_factory, tmp_path):
    metrics_port = free_port()
    server = server_factory("--metrics-port", str(metrics_port))
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = [
        make_instance(tmp_path / "files", study_uid=study_uid, series_uid=series_uid)
        for _ in range(2)
    ]
    storescu(server.port, *paths)
    refs = [*references(paths), (CT_IMAGE_STORAGE, generate_uid())]  # one never sent

    status = request_commitment(server, generate_uid(), refs, reports=Reports())
    now = after(metrics_port, Scrape(), associations=2)  # storescu's, the commitment's

    assert status == 0x0000
    assert now("imaging_scp_commitment_requests_total") == 1
    assert now("imaging_scp_commitment_instances_total", result="committed") == 2
    assert now("imaging_scp_commitment_instances_total", result="failed") == 1
    assert now("imaging_scp_commitment_reports_ended_total", outcome="delivered") == 1
    assert now("imaging_scp_commitment_report_failures_total") == 0
    assert now("imaging_scp_commitment_reports", state="delivered") == 1
    assert now("imaging_scp_commitment_reports", state="pending") == 0


def get_answering_warnings(port: int, study_uid: str) -> int:
    """A pynetdicom C-GET of a study whose every C-STORE it answers with a
    warning (0xB000, coercion of data elements); the final status."""
    ae = AE("GETTER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="IMAGING_SCP",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xB000)],
    )  # fmt: skip
    assert assoc.is_established
    try:
        responses = list(
            assoc.send_c_get(study_identifier(study_uid), StudyRootQueryRetrieveInformationModelGet)
        )
    finally:
        assoc.release()
    return responses[-1][0].Status


def test_retrieves_and_their_sub_operations_are_counted_exactly(server_factory, tmp_path):
    destination = Storescp(tmp_path / "dest")
    try:
        metrics_port = free_port()
        server = server_factory(
            "--metrics-port", str(metrics_port), "--peer", f"{DEST}=127.0.0.1:{destination.port}"
        )
        study_uid, series_uid = generate_uid(), generate_uid()
        paths = [
            make_instance(tmp_path / "files", study_uid=study_uid, series_uid=series_uid)
            for _ in range(3)
        ]
        storescu(server.port, *paths)
        before = after(metrics_port, Scrape(), associations=1)
        study = f"StudyInstanceUID={study_uid}"

        assert movescu(server.port, "STUDY", study).returncode == 0  # 3 completed
        assert getscu(server.port, tmp_path / "got", "STUDY", study).returncode == 0  # 3 completed
        assert get_answering_warnings(server.port, study_uid) == 0xB000  # 3 warnings
        gone = pydicom.dcmread(paths[0]).SOPInstanceUID
        next(server.data_dir.rglob(f"{gone}.dcm")).unlink()  # deleted behind the index
        status, identifier = move(server.port, study_identifier(study_uid), DEST)[-1]
        assert (status.Status, identifier.FailedSOPInstanceUIDList) == (0xB000, gone)
        assert move(server.port, study_identifier(study_uid), "NOBODY")[-1][0].Status == 0xA801
        get_context = [(1, StudyRootQueryRetrieveInformationModelGet, [ExplicitVRLittleEndian])]
        with RawAssociation(server.port, get_context) as assoc:
            get = StudyRootQueryRetrieveInformationModelGet
            assert without_identifier(assoc, get, 0x0010) == 0xC000  # C-GET-RQ
            assoc.release()
        now = after(metrics_port, before, associations=6)
    finally:
        destination.stop()

    def moved(name: str, **labels) -> float:
        return now(name, **labels) - before(name, **labels)

    requests = "imaging_scp_retrieve_requests_total"
    assert moved(requests, operation="move", outcome="success") == 1
    assert moved(requests, operation="move", outcome="warning") == 1  # one failed of three
    assert moved(requests, operation="move", outcome="refused") == 1  # no such destination
    assert moved(requests, operation="get", outcome="success") == 1
    assert moved(requests, operation="get", outcome="warning") == 1  # all three warned
    assert moved(requests, operation="get", outcome="refused") == 1  # no identifier
    assert now.total(requests) == 6
    sub_operations = "imaging_scp_retrieve_suboperations_total"
    assert moved(sub_operations, operation="move", result="completed") == 5
    assert moved(sub_operations, operation="move", result="failed") == 1
    assert moved(sub_operations, operation="get", result="completed") == 3
    assert moved(sub_operations, operation="get", result="warning") == 3
    assert now.total(sub_operations) == 12
    # The same numbers as the log's end events and failures.
    ends = server.events("move.end") + server.events("get.end")
    for result in ("completed", "failed", "warning"):
        assert sum(e[result] for e in ends) == sum(
            now(sub_operations, operation=operation, result=result) for operation in ("move", "get")
        )
    assert len(server.events("retrieve.failed")) == 1
    assert now("imaging_scp_associations_active") == 0


def test_two_workers_are_summed_on_one_endpoint(server_factory, tmp_path):
    metrics_port = free_port()
    server = server_factory("--workers", "2", "--metrics-port", str(metrics_port))
    before = scrape(metrics_port)
    study_uid = generate_uid()
    sent = 0
    for _ in range(6):  # each on its own association: the kernel spreads them
        path = make_instance(tmp_path / "files", study_uid=study_uid, series_uid=generate_uid())
        storescu(server.port, path)
        sent += 1
    for _ in range(16):
        assert echoscu(server.port) == 0
    now = after(metrics_port, before, associations=22)

    # 22 connections spread by the kernel: both workers served some (all on
    # one: a chance of 2 in 4 million).
    assert len({event["assoc"].split("-")[0] for event in server.events("association.end")}) == 2
    assert now("imaging_scp_instances_stored_total", outcome="stored") == sent
    assert now("imaging_scp_associations_total", outcome="released") == 22
    assert now("imaging_scp_associations_active") == 0
    assert now("imaging_scp_store_stage_seconds_count", stage="fsync") == sent
    assert now("imaging_scp_index_instances") == sent
    assert now("imaging_scp_index_series") == sent
    assert now("process_cpu_seconds_total") > 0


def test_the_metrics_port_is_off_by_default_and_checked():
    config = load_config()
    assert (config.metrics_port, config.metrics_host) == (0, "127.0.0.1")
    with pytest.raises(ConfigError, match="key 'metrics_port'"):
        load_config(port=11112, metrics_port=11112)
    with pytest.raises(ConfigError, match="key 'metrics_port'"):
        load_config(metrics_port=70000)


@pytest.mark.parametrize("taken", ["metrics", "dicom"])
def test_a_port_in_use_stops_the_start_and_leaves_no_metrics_directory(tmp_path, taken):
    temp = tmp_path / "tmp"  # where the multiprocess directory is made (two workers)
    temp.mkdir()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        ports = {"metrics": free_port(), "dicom": free_port(), taken: busy}
        result = subprocess.run(
            [IMAGING_SCP, "serve", "--host", "127.0.0.1", "--port", str(ports["dicom"]),
             "--data-dir", str(tmp_path / "data"), "--metrics-port", str(ports["metrics"]),
             "--workers", "2"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "TMPDIR": str(temp)},
        )  # fmt: skip
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{busy}" in result.stderr
    assert list(temp.iterdir()) == []
