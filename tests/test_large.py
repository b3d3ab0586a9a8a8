"""Objects are received straight to a file under the data directory, whatever their size."""

import threading
import time
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from tests.conftest import CT_IMAGE_STORAGE, dataset_bytes, make_instance, send_files, temp_files


def test_large_object_is_stored_byte_for_byte(server, tmp_path):
    source = make_instance(
        tmp_path, study_uid=generate_uid(), series_uid=generate_uid(), pixels=1024
    )
    assert len(dataset_bytes(source)) > 2 * 2**20
    small = make_instance(tmp_path, study_uid=generate_uid(), series_uid=generate_uid())
    assert [s.status for s in send_files(server.port, [source, small])] == [0, 0]
    index = server.index()
    stored = [server.data_dir / r[0] for r in index.execute("SELECT path FROM instances")]
    assert sorted(dataset_bytes(p) for p in stored) == sorted(
        [dataset_bytes(source), dataset_bytes(small)]
    )
    assert temp_files(server.data_dir) == []


def test_aborted_transfer_of_a_large_object_leaves_nothing(server_factory, tmp_path):
    server = server_factory("--max-pdu", "16384")
    source = make_instance(
        tmp_path, study_uid=generate_uid(), series_uid=generate_uid(), pixels=3000
    )
    ae = AE("TESTSCU")
    ae.maximum_pdu_size = 16384
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="IMAGING_SCP")
    sender = threading.Thread(target=lambda: assoc.send_c_store(source), daemon=True)
    sender.start()
    incoming = server.data_dir / ".incoming"
    deadline = time.monotonic() + 20
    while not any(incoming.rglob("*.part")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any(incoming.rglob("*.part")), "the object was not received straight to a file"
    assoc.abort()
    sender.join(10)
    server.wait_for_event("association.end")
    deadline = time.monotonic() + 10
    while temp_files(server.data_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert temp_files(server.data_dir) == []
    assert server.index().execute("SELECT count(*) FROM instances").fetchone()[0] == 0


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_each_association_gives_back_its_memory(server, tmp_path):
    """Every association reads through a buffer of up to max(max_pdu, 1 MiB); one that
    ends must give it back at once, not when the garbage collector gets round to it
    (the soak saw 32 MB held that way)."""
    source = make_instance(tmp_path, study_uid=generate_uid(), series_uid=generate_uid(),
                           pixels=800)  # fmt: skip
    assert len(dataset_bytes(source)) > 1024 * 1024  # fills the whole read buffer
    for _ in range(3):  # warm up: allocator pools, SQLite's cache
        assert [s.status for s in send_files(server.port, [source])] == [0]
    before = _rss_mb(server.process.pid)
    for _ in range(20):
        assert [s.status for s in send_files(server.port, [source])] == [0]
    grown = _rss_mb(server.process.pid) - before
    assert grown < 8, f"RSS grew {grown:.1f} MB over 20 associations"
