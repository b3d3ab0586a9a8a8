"""Large objects are received straight to a file under the data directory."""

import threading
import time

from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from tests.conftest import CT_IMAGE_STORAGE, dataset_bytes, make_instance, send_files


def test_object_above_the_threshold_is_spooled_and_stored_byte_for_byte(server_factory, tmp_path):
    server = server_factory("--large-object-threshold", "1MiB")
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
    assert list((server.data_dir / ".incoming").iterdir()) == []


def test_aborted_transfer_of_a_large_object_leaves_nothing(server_factory, tmp_path):
    server = server_factory("--large-object-threshold", "1MiB", "--max-pdu", "16384")
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
    while not any(incoming.glob("spool-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any(incoming.glob("spool-*")), "the large object never went to a spool file"
    assoc.abort()
    sender.join(10)
    server.wait_for_event("association.end")
    deadline = time.monotonic() + 10
    while any(incoming.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(incoming.iterdir()) == []
    assert server.index().execute("SELECT count(*) FROM instances").fetchone()[0] == 0
