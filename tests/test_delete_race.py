"""`delete` and `verify` beside a live ingest of the same study: index and files
always agree (no row without its file, no file outside `.incoming` without its
row), an instance answered Success while a deletion runs is removed whole by it
or kept whole, and one answered Success after it returned is stored.

The admin commands run as the CLI in processes of their own, with their file
operations slowed or cut short where the race needs a window (as on NFS, or a
crash): a `sitecustomize` on their PYTHONPATH wraps os.unlink / os.stat /
os.link of instance files, in that process only.
"""

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests.conftest import (
    IMAGING_SCP,
    Server,
    both_indexes,
    make_instance,
    send_files,
    temp_files,
)

pytestmark = both_indexes

# Imported by the Python of a process whose PYTHONPATH holds it: wraps the
# os functions named by SLOW_* / KILL_AT_UNLINK for the paths of instance files
# in the data directory SLOWED_UNDER (not, say, pydicom's own test files).
_SITECUSTOMIZE = """
import os, signal, time

def _wrap(name, before=None, after=None):
    real = getattr(os, name)
    def wrapped(*args, **kwargs):
        path = args[-1] if name == "link" else args[0]
        ours = isinstance(path, (str, os.PathLike)) and str(os.fspath(path)).endswith(".dcm")
        ours = ours and str(os.fspath(path)).startswith(os.environ["SLOWED_UNDER"])
        if ours and before:
            before()
        result = real(*args, **kwargs)
        if ours and after:
            after()
        return result
    setattr(os, name, wrapped)

def _mark():
    mark = os.environ.get("SLOW_MARK")
    if mark and not os.path.lexists(mark):
        open(mark, "w").close()

if os.environ.get("SLOW_UNLINK"):
    _wrap("unlink", before=lambda: time.sleep(float(os.environ["SLOW_UNLINK"])))
if os.environ.get("KILL_AT_UNLINK"):
    _wrap("unlink", before=lambda: os.kill(os.getpid(), signal.SIGKILL))
if os.environ.get("SLOW_STAT"):
    _wrap("stat", before=lambda: (_mark(), time.sleep(float(os.environ["SLOW_STAT"]))))
if os.environ.get("SLOW_AFTER_LINK"):
    _wrap("link", after=lambda: time.sleep(float(os.environ["SLOW_AFTER_LINK"])))
if os.environ.get("SLOW_TURN"):  # "N:seconds": a pause before the Nth writers' turn waited for
    import fcntl
    _real_flock, _turns = fcntl.flock, []
    def _flock(fd, operation):
        if operation == fcntl.LOCK_EX:  # a wait for SQLite's writers' turn (not a try)
            _turns.append(fd)
            nth, seconds = os.environ["SLOW_TURN"].split(":")
            if len(_turns) == int(nth):
                _mark()
                time.sleep(float(seconds))
        return _real_flock(fd, operation)
    fcntl.flock = _flock
"""


@pytest.fixture
def slowed(tmp_path):
    """`slowed(data_dir, SLOW_UNLINK="0.5", …)`: the environment of a process
    whose file operations on the instance files of `data_dir` are slowed (or
    killed) as named."""
    directory = tmp_path / "slowed"
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(_SITECUSTOMIZE)

    def environment(data_dir: Path, **settings: str) -> dict:
        under = str(data_dir.resolve())
        return {**os.environ, "PYTHONPATH": str(directory), "SLOWED_UNDER": under, **settings}

    return environment


def admin(server: Server, *args: str, env: dict | None = None) -> subprocess.Popen:
    """An admin command on the server's data dir and index, as its own process."""
    return subprocess.Popen(
        [IMAGING_SCP, *args, *server.index_flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finished(process: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    """Its exit code and its output (stdout; stderr after it, when any)."""
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + (f"\n{err}" if err else "")


def rows(server: Server, sql: str, params=()) -> list:
    db = server.index()
    try:
        return [tuple(row) for row in db.execute(sql, params)]
    finally:
        db.close()


def wait_until_forgotten(server: Server, column: str, uid: str, timeout: float = 20) -> None:
    """Until the deletion's rows are committed (its files not yet removed)."""
    deadline = time.monotonic() + timeout
    while rows(server, f"SELECT 1 FROM instances WHERE {column} = ?", (uid,)):
        assert time.monotonic() < deadline, f"the rows of {uid} were not deleted"
        time.sleep(0.02)


def assert_index_and_files_agree(server: Server) -> None:
    """Every row's file is there with its size; every file has its row; the
    counts of each study and series are those of their instance rows."""
    data = server.data_dir
    indexed = dict(rows(server, "SELECT path, size FROM instances"))
    on_disk = {
        str(path.relative_to(data)): path.stat().st_size
        for path in data.rglob("*.dcm")
        if path.relative_to(data).parts[0] != ".incoming"
    }
    assert {p: s for p, s in indexed.items() if on_disk.get(p) != s} == {}, "rows without files"
    assert {p for p in on_disk if p not in indexed} == set(), "files without rows"
    assert temp_files(data) == []
    for level, key in (("studies", "study_uid"), ("series", "series_uid")):
        counted = rows(
            server,
            f"SELECT {level}.{key}, {level}.number_of_instances, count(i.sop_instance_uid)"
            f" FROM {level} LEFT JOIN instances i ON i.{key} = {level}.{key}"
            f" GROUP BY {level}.{key}, {level}.number_of_instances",
        )
        assert [row for row in counted if row[1] != row[2]] == [], level


def stored(server: Server, sop_instance_uid: str) -> bool:
    found = rows(
        server, "SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
    )
    return bool(found) and (server.data_dir / found[0][0]).is_file()


def sop_uid(path: Path) -> str:
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


def all_success(statuses) -> bool:
    return [status.status for status in statuses] == [0] * len(statuses)


@pytest.mark.parametrize("level", ["study", "series"])
def test_an_instance_received_while_a_deletion_removes_its_files_is_kept_whole(
    server, tmp_path, slowed, level
):
    study, series, other_series = generate_uid(), generate_uid(), generate_uid()
    sent = [make_instance(tmp_path / "in", study_uid=study, series_uid=series) for _ in range(3)]
    beside = make_instance(tmp_path / "in", study_uid=study, series_uid=other_series)
    assert all_success(send_files(server.port, [*sent, beside]))
    deleted = study if level == "study" else series
    # 0.5 s before each unlink, as a slow network filesystem's: the resends
    # below come between the deletion's COMMIT and its unlinks.
    deleting = admin(
        server,
        "delete",
        f"--{level}",
        deleted,
        "--yes",
        env=slowed(server.data_dir, SLOW_UNLINK="0.5"),
    )
    wait_until_forgotten(server, f"{level}_uid", deleted)
    assert all_success(send_files(server.port, sent))
    code, output = finished(deleting)
    assert code == 0, output
    assert_index_and_files_agree(server)
    assert [uid for uid in map(sop_uid, sent) if not stored(server, uid)] == []
    assert stored(server, sop_uid(beside)) == (level == "series")


def test_a_resend_restoring_a_lost_file_during_its_deletion_is_kept_whole(server, tmp_path, slowed):
    """The resend's file is linked before its transaction, where the deletion
    then unlinks (the path its deleted row named): the transaction, in the
    study's turn after that unlink, links it again."""
    study, series = generate_uid(), generate_uid()
    source = make_instance(tmp_path / "in", study_uid=study, series_uid=series)
    assert all_success(send_files(server.port, [source]))
    uid = sop_uid(source)
    (server.data_dir / rows(server, "SELECT path FROM instances")[0][0]).unlink()  # lost
    deleting = admin(
        server, "delete", "--study", study, "--yes", env=slowed(server.data_dir, SLOW_UNLINK="2")
    )
    wait_until_forgotten(server, "study_uid", study)
    assert all_success(send_files(server.port, [source]))
    code, output = finished(deleting)
    assert code == 0, output
    assert_index_and_files_agree(server)
    assert stored(server, uid)


@pytest.mark.parametrize("level", ["study", "series"])
def test_a_sender_resending_a_study_while_it_is_deleted_loses_nothing(
    server, tmp_path, slowed, level
):
    """As the issue measured it (273 of 600 resends lost before the fix): a
    sender resends every instance of a study once, from the moment the
    deletion's rows are gone, while its unlinks take 30 ms each. When it
    returns, what it left must agree with the index; a resend then is stored."""
    study, series, other_series = generate_uid(), generate_uid(), generate_uid()
    sent = [make_instance(tmp_path / "in", study_uid=study, series_uid=series) for _ in range(100)]
    beside = [make_instance(tmp_path / "in", study_uid=study, series_uid=other_series)]
    assert all_success(send_files(server.port, [*sent, *beside]))
    deleted = study if level == "study" else series
    deleting = admin(
        server,
        "delete",
        f"--{level}",
        deleted,
        "--yes",
        env=slowed(server.data_dir, SLOW_UNLINK="0.03"),
    )
    wait_until_forgotten(server, f"{level}_uid", deleted)
    assert deleting.poll() is None, "the deletion ended before the resends began"
    assert all_success(send_files(server.port, sent))
    code, output = finished(deleting)
    assert code == 0, output
    assert_index_and_files_agree(server)
    assert all_success(send_files(server.port, sent))
    assert_index_and_files_agree(server)
    assert [path for path in sent if not stored(server, sop_uid(path))] == []


def test_verify_leaves_alone_a_file_an_ingest_is_placing(server_factory, tmp_path, slowed):
    """Linked at its final path, its transaction not yet committed: neither an
    unknown file (plain verify) nor one to index (--repair)."""
    data_dir = tmp_path / "data"
    server = server_factory(data_dir=data_dir, env=slowed(data_dir, SLOW_AFTER_LINK="4"))
    study, series = generate_uid(), generate_uid()
    source = make_instance(tmp_path / "in", study_uid=study, series_uid=series)
    placed = server.data_dir / study / series / f"{sop_uid(source)}.dcm"
    statuses: list = []
    sending = threading.Thread(target=lambda: statuses.extend(send_files(server.port, [source])))
    sending.start()
    deadline = time.monotonic() + 10
    while not placed.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    code, output = finished(admin(server, "verify", "--json"), timeout=30)
    report = json.loads(output)
    assert (code, report["unknownFiles"]) == (0, []), output
    code, output = finished(admin(server, "verify", "--repair", "--json"), timeout=30)
    assert placed.exists() and sending.is_alive(), "the ingest was not held long enough"
    report = json.loads(output)
    assert (code, report["unknownFiles"], report["repaired"]) == (0, [], []), output
    sending.join(30)
    assert all_success(statuses)
    assert_index_and_files_agree(server)
    assert rows(server, "SELECT calling_ae FROM instances") == [("TESTSCU",)]


def test_verify_does_not_call_files_missing_that_a_deletion_removed_meanwhile(
    server, tmp_path, slowed
):
    study, series = generate_uid(), generate_uid()
    sent = [make_instance(tmp_path / "in", study_uid=study, series_uid=series) for _ in range(4)]
    assert all_success(send_files(server.port, sent))
    mark = tmp_path / "verify-is-checking"
    verifying = admin(
        server,
        "verify",
        "--json",
        env=slowed(server.data_dir, SLOW_STAT="0.3", SLOW_MARK=str(mark)),
    )
    deadline = time.monotonic() + 20
    while not mark.exists():  # its rows read, its first file being looked at
        assert time.monotonic() < deadline
        time.sleep(0.02)
    code, output = finished(admin(server, "delete", "--study", study, "--yes"))
    assert code == 0, output
    code, output = finished(verifying)
    report = json.loads(output)
    assert (code, report["missing"], report["unavailableSeries"]) == (0, [], []), output
    assert_index_and_files_agree(server)


@pytest.mark.parametrize("finisher", ["serve", "delete"])
def test_a_deletion_cut_short_after_its_commit_is_finished_later(
    server_factory, tmp_path, slowed, finisher
):
    """Killed between the COMMIT that deleted its rows and its first unlink:
    the files left are no unknown files for verify (nor indexed again by
    --repair); the next start of serve, or the next delete, removes them — but
    one received again since, which it keeps."""
    server = server_factory()
    study, series = generate_uid(), generate_uid()
    sent = [make_instance(tmp_path / "in", study_uid=study, series_uid=series) for _ in range(3)]
    other_study = make_instance(
        tmp_path / "in", study_uid=generate_uid(), series_uid=generate_uid()
    )
    assert all_success(send_files(server.port, [*sent, other_study]))
    code, output = finished(
        admin(
            server,
            "delete",
            "--study",
            study,
            "--yes",
            env=slowed(server.data_dir, KILL_AT_UNLINK="1"),
        )
    )
    assert code == -9, output
    assert rows(server, "SELECT 1 FROM instances WHERE study_uid = ?", (study,)) == []
    assert len(list((server.data_dir / study).rglob("*.dcm"))) == 3
    for command in (["verify"], ["verify", "--repair"]):
        code, output = finished(admin(server, *command, "--json"))
        report = json.loads(output)
        assert (code, report["unknownFiles"], report["repaired"]) == (0, [], []), output
    assert rows(server, "SELECT 1 FROM instances WHERE study_uid = ?", (study,)) == []
    assert all_success(send_files(server.port, sent[:1]))  # received again
    if finisher == "serve":
        server.stop()
        server = server_factory(data_dir=server.data_dir)
        assert server.events("startup.recovered")[0]["finished_deletions"] == 1
    else:
        other = rows(server, "SELECT study_uid FROM instances WHERE study_uid != ?", (study,))
        code, output = finished(admin(server, "delete", "--study", other[0][0], "--yes"))
        assert code == 0, output
    assert_index_and_files_agree(server)
    assert [stored(server, sop_uid(path)) for path in sent] == [True, False, False]


def test_serve_starts_past_a_deletion_journal_cut_short(server_factory, tmp_path):
    """Cut short while it was written, so before its deletion's COMMIT: the
    rows are there, their files stay; the journal is dropped."""
    server = server_factory()
    study, series = generate_uid(), generate_uid()
    source = make_instance(tmp_path / "in", study_uid=study, series_uid=series)
    assert all_success(send_files(server.port, [source]))
    path = rows(server, "SELECT sop_instance_uid, path FROM instances")[0]
    server.stop()
    journals = server.data_dir / ".incoming" / ".deletions"
    journals.mkdir()
    whole = json.dumps({"study_uid": study, "instance_files": [path]})
    (journals / "1-1.json").write_text(whole[: len(whole) // 2])
    server = server_factory(data_dir=server.data_dir)
    assert server.events("startup.recovered")[0]["finished_deletions"] == 1
    assert list(journals.iterdir()) == []
    assert_index_and_files_agree(server)
    assert stored(server, sop_uid(source))


def test_an_admins_availability_set_while_verify_runs_stays(server, tmp_path, slowed):
    """verify gives a series it marked UNAVAILABLE its availability back once
    its files are back; an admin's `availability set` between verify's look at
    the marked series and its write is the admin's word, and stays. The pause
    is before verify's second writers' turn: its first opens the index, its
    second gives the availability back."""
    if server.index_url:
        pytest.skip("the pause is taken in SQLite's writers' turn (flock)")
    study, series = generate_uid(), generate_uid()
    sent = [make_instance(tmp_path / "in", study_uid=study, series_uid=series) for _ in range(2)]
    assert all_success(send_files(server.port, sent))
    stored = server.data_dir / study / series / f"{sop_uid(sent[0])}.dcm"
    saved = stored.read_bytes()
    stored.unlink()
    code, output = finished(admin(server, "verify"))
    assert code == 1 and "series now UNAVAILABLE: 1" in output, output
    stored.write_bytes(saved)  # back from a backup

    mark = tmp_path / "verify-looked"
    verifying = admin(
        server, "verify", env=slowed(server.data_dir, SLOW_TURN="2:4", SLOW_MARK=str(mark))
    )
    deadline = time.monotonic() + 30
    while not mark.exists():
        assert time.monotonic() < deadline and verifying.poll() is None, "verify never paused"
        time.sleep(0.05)
    code, output = finished(admin(server, "availability", "set", "--series", series, "nearline"))
    assert code == 0, output
    assert verifying.poll() is None, "verify wrote before the admin did"
    code, output = finished(verifying)
    assert code == 0, output
    assert "available again" not in output  # the admin gave it its availability
    row = (
        server.index()
        .execute(
            "SELECT availability, unavailable_by_verify FROM series WHERE series_uid = ?", (series,)
        )
        .fetchone()
    )
    assert (row[0], row[1]) == ("NEARLINE", None)
