"""Disk faults by injection: a full disk, an I/O error, and too little free
space, made to happen inside a real `imaging-scp serve` process.

test_disk_space.py fills a real small filesystem, which needs a tmpfs mount
(root); where it cannot mount one, these tests still cover the same promises.
They also cover what a tmpfs cannot produce: EIO. The injection replaces, in
the server process before it starts, the calls storage writes and measures
through (os.write, os.writev, os.fsync, os.statvfs); a control file
the test writes says which fault is on. SQLite's own writes are not affected:
a full disk under the index is covered by test_disk_space.py only.
"""

import sys

import pytest
from pydicom.uid import generate_uid

from tests.conftest import (
    assert_nothing_half_written,
    assert_refused_below_the_floor,
    ct_association,
    make_instance,
    start_server,
)

# Runs `imaging-scp ...` (argv[2:]) in this interpreter after replacing the
# calls; argv[1] is the control file: "ENOSPC" or "EIO" fails writes and
# fsyncs, "free=N" makes the filesystem report N bytes available, no file
# (or an empty one) injects nothing.
_INJECT_FAULTS = """
import errno, os, sys
control = sys.argv[1]

def fault():
    try:
        with open(control) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""

def failing(call):
    def replacement(*args):
        name = fault()
        if name in ("ENOSPC", "EIO"):
            code = getattr(errno, name)
            raise OSError(code, os.strerror(code))
        return call(*args)
    return replacement

os.write = failing(os.write)
os.writev = failing(os.writev)
os.fsync = failing(os.fsync)
real_statvfs = os.statvfs

def statvfs(path):
    result = real_statvfs(path)
    name = fault()
    if not name.startswith("free="):
        return result
    blocks = int(name[5:]) // result.f_frsize
    fields = list(result)
    fields[3] = fields[4] = blocks  # f_bfree, f_bavail
    return os.statvfs_result(fields)

os.statvfs = statvfs
sys.argv = sys.argv[2:]
from scp.cli import run
run()
"""


@pytest.fixture
def faulty_server(tmp_path):
    control = tmp_path / "fault"
    servers = []

    def start(*flags: str):
        server = start_server(
            tmp_path / "data",
            *flags,
            launcher=(sys.executable, "-c", _INJECT_FAULTS, str(control)),
        )
        servers.append(server)
        return server, control

    yield start
    for server in servers:
        server.stop()


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("ENOSPC", "No space left on device"), ("EIO", "Input/output error")],
)
def test_a_write_error_is_answered_0xA700_and_the_service_goes_on(
    faulty_server, tmp_path, fault, reason
):
    server, control = faulty_server("--min-free-space", "0")
    study, series = generate_uid(), generate_uid()
    sources = [make_instance(tmp_path, study_uid=study, series_uid=series) for _ in range(3)]
    assoc = ct_association(server.port)
    assert assoc.send_c_store(sources[0]).Status == 0

    control.write_text(fault)
    response = assoc.send_c_store(sources[1])
    assert response.Status == 0xA700
    assert reason in response.ErrorComment
    refused = server.wait_for_event("instance.refused")
    assert reason in refused[0]["reason"]
    assert_nothing_half_written(server)
    assert len(server.indexed_paths()) == 1

    control.write_text("")  # the disk is back: the same association goes on
    assert assoc.send_c_store(sources[1]).Status == 0
    assert assoc.send_c_store(sources[2]).Status == 0
    assoc.release()
    assert_nothing_half_written(server)
    assert len(server.indexed_paths()) == 3
    assert server.process.poll() is None


def test_below_the_free_space_floor_ingest_stops_and_resumes_by_itself(faulty_server, tmp_path):
    server, control = faulty_server("--min-free-space", "6MiB")
    study, series = generate_uid(), generate_uid()
    sources = [make_instance(tmp_path, study_uid=study, series_uid=series) for _ in range(2)]
    open_assoc = ct_association(server.port)

    control.write_text(f"free={4 * 2**20}")
    assert_refused_below_the_floor(server, open_assoc, sources[0])

    control.write_text("")
    resumed = ct_association(server.port)
    assert resumed.is_established
    assert [resumed.send_c_store(source).Status for source in sources] == [0, 0]
    resumed.release()
    assert len(server.indexed_paths()) == 2
