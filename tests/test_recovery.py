"""Startup recovery: what a crash between placing a file and committing its index
row leaves behind is finished at the next start."""

import io
import socket

import pydicom
from pydicom.uid import generate_uid

from storage import files
from storage.catalog import Provenance, utc_now
from storage.header import read_header
from tests.conftest import (
    both_indexes,
    dataset_bytes,
    make_instance,
    send_files,
    stored_files,
    temp_files,
)

pytestmark = both_indexes


def _place_without_indexing(data_dir, source) -> str:
    """Exactly what ingest does before its index commit, then "crash"."""
    dataset = dataset_bytes(source)
    header = read_header(io.BytesIO(dataset), "1.2.840.10008.1.2.1")
    receipt = Provenance("CRASHED", "IMAGING_SCP", "127.0.0.1:1", "x-1").receipt(utc_now())
    file_header = files.encode_file_header(
        header.sop_class_uid, header.sop_instance_uid, "1.2.840.10008.1.2.1", receipt
    )
    incoming = files.incoming_dir(data_dir, socket.gethostname())  # the server's own node
    writer = files.TempWriter(incoming, file_header)  # as ingest writes what arrives
    writer.write(dataset)
    temp = writer.durable()
    relpath = files.instance_relpath(header.study_uid, header.series_uid, header.sop_instance_uid)
    files.link_into_place(data_dir, temp, relpath)
    return header.sop_instance_uid


def test_placed_but_unindexed_file_is_indexed_at_start(server_factory, tmp_path):
    study, series = generate_uid(), generate_uid()
    server = server_factory()
    send_files(server.port, [make_instance(tmp_path, study_uid=study, series_uid=series)])
    assert server.stop() == 0

    data = server.data_dir
    crashed = _place_without_indexing(
        data, make_instance(tmp_path, study_uid=study, series_uid=series)
    )
    (data / ".incoming" / "half-written.part").write_bytes(b"\x00" * 100)

    restarted = server_factory(data_dir=data)
    recovered = restarted.wait_for_event("startup.recovered")[0]
    assert recovered["removed_temp_files"] == 1
    assert len(recovered["indexed_files"]) == 1
    assert temp_files(data) == []
    index = restarted.index()
    row = index.execute(
        "SELECT calling_ae FROM instances WHERE sop_instance_uid = ?", (crashed,)
    ).fetchone()
    assert row["calling_ae"] == "CRASHED"  # the receipt in the file, as ingest recorded it
    counts = index.execute(
        "SELECT number_of_instances FROM series WHERE series_uid = ?", (series,)
    ).fetchone()
    assert counts["number_of_instances"] == 2
    assert all(pydicom.dcmread(path) for path in stored_files(data))
