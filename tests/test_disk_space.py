"""Disk space: a free-space floor, and a really full filesystem (a small tmpfs the
test mounts; it needs root, as CI has). Where no tmpfs can be mounted these
tests are skipped, and test_disk_faults.py covers the same promises by fault
injection."""

import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import (
    IMAGING_SCP,
    assert_nothing_half_written,
    assert_refused_below_the_floor,
    ct_association,
    make_instance,
    stored_files,
)


@pytest.fixture
def small_filesystem(tmp_path):
    """Mount a tmpfs of the given size (MiB) and unmount it afterwards."""
    mounts = []

    def mount(mebibytes: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root; see test_disk_faults.py")
        point = tmp_path / f"fs{len(mounts)}"
        point.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={mebibytes}m", "tmpfs", str(point)],
            capture_output=True,
        )
        if result.returncode != 0:
            reason = result.stderr.decode().strip()
            pytest.skip(f"cannot mount a tmpfs here ({reason}); see test_disk_faults.py")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_below_the_free_space_floor_new_objects_are_refused_until_space_is_back(
    server_factory, small_filesystem, tmp_path
):
    fs = small_filesystem(16)
    server = server_factory("--min-free-space", "6MiB", data_dir=fs / "data")
    study, series = generate_uid(), generate_uid()
    sources = [make_instance(tmp_path, study_uid=study, series_uid=series) for _ in range(3)]

    open_assoc = ct_association(server.port)
    assert open_assoc.send_c_store(sources[0]).Status == 0

    filler = fs / "filler"
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    filler.write_bytes(b"\0" * (free - 4 * 2**20))  # leave 4 MiB: below the 6 MiB floor

    assert_refused_below_the_floor(server, open_assoc, sources[1])

    filler.unlink()  # an admin makes room: ingest resumes by itself
    resumed = ct_association(server.port)
    assert resumed.is_established
    assert resumed.send_c_store(sources[1]).Status == 0
    resumed.release()
    assert len(server.indexed_paths()) == 2


def test_a_full_disk_is_answered_0xA700_and_leaves_nothing_half_written(
    server_factory, small_filesystem, tmp_path
):
    fs = small_filesystem(3)
    ballast = fs / "ballast"  # something an admin can remove to make room
    ballast.write_bytes(b"\0" * 2**19)
    server = server_factory("--min-free-space", "0", data_dir=fs / "data")
    study, series = generate_uid(), generate_uid()
    assoc = ct_association(server.port)
    statuses = []
    for _ in range(40):  # ~130 KB each: the 3 MiB filesystem fills up
        source = make_instance(tmp_path, study_uid=study, series_uid=series, pixels=256)
        response = assoc.send_c_store(source)
        statuses.append((response.Status, response.get("ErrorComment")))
    assoc.release()

    codes = [code for code, _ in statuses]
    assert 0 in codes and 0xA700 in codes, statuses
    assert set(codes) <= {0, 0xA700}, statuses
    assert all("space" in comment for code, comment in statuses if code == 0xA700)
    assert_nothing_half_written(server)
    assert len(server.indexed_paths()) == codes.count(0)
    for path in stored_files(server.data_dir):
        pydicom.dcmread(path)

    # The service goes on: it answers C-ECHO, and stores again once there is room.
    echo = ct_association(server.port)
    assert echo.send_c_echo().Status == 0
    echo.release()
    full = subprocess.run(
        [IMAGING_SCP, "delete", "--series", series, "--yes", "--data-dir", str(server.data_dir)],
        capture_output=True,
        text=True,
    )
    # On a full disk even the index cannot log a deletion: one clear line says so.
    assert full.returncode == 1
    assert len(full.stderr.strip().splitlines()) == 1 and "full" in full.stderr
    ballast.unlink()
    again = ct_association(server.port)
    source = make_instance(tmp_path, study_uid=generate_uid(), series_uid=generate_uid())
    assert again.send_c_store(source).Status == 0
    again.release()


def test_min_free_space_is_parsed_once_into_numbers():
    from scp.config import ConfigError, load_config

    assert load_config(min_free_space="500MB").min_free_space.bytes == 500_000_000
    assert load_config(min_free_space="2GiB").min_free_space.bytes == 2 * 2**30
    floor = load_config(min_free_space="5%").min_free_space
    assert (floor.bytes, floor.percent, str(floor)) == (0, 5.0, "5%")
    with pytest.raises(ConfigError, match="key 'min_free_space': expected bytes"):
        load_config(min_free_space="lots")
