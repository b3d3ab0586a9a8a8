"""A damaged SQLite index, damaged as disks and people damage it (pages
overwritten with garbage, the file cut short): every command notices it, says
which file and what to do, and `rebuild` brings every instance back from the
files, with what the old index can still tell."""

import json
import sqlite3
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import (
    IMAGING_SCP,
    Server,
    association_rejection,
    free_port,
    make_instance,
    send_files,
    start_server,
    stored_files,
    temp_files,
)
from tests.test_systemd import NotifySocket

ADVICE = "run `imaging-scp rebuild`"
DB_SUFFIXES = ("-wal", "-shm")


def imaging_scp(*args: str, data_dir: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [IMAGING_SCP, *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def overwrite_root_page(index: Path, table: str) -> None:
    """Garbage over the root page of `table`, found as SQLite finds it."""
    with sqlite3.connect(index) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the file itself
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        root = db.execute("SELECT rootpage FROM sqlite_schema WHERE name = ?", (table,)).fetchone()
    db.close()
    with open(index, "r+b") as handle:
        handle.seek((root[0] - 1) * page_size)
        handle.write(b"\xa5" * page_size)


def cut_short(index: Path, size: int) -> None:
    with open(index, "r+b") as handle:
        handle.truncate(size)


DAMAGE = {
    "studies page overwritten": lambda index: overwrite_root_page(index, "studies"),
    "cut to half its size": lambda index: cut_short(index, index.stat().st_size // 2),
    "cut inside its header": lambda index: cut_short(index, 60),
}


@pytest.fixture
def stopped_archive(tmp_path) -> tuple[Path, list[Path], str]:
    """A data dir filled by real C-STOREs (two studies), its server stopped,
    one study set OFFLINE by an admin: (data dir, the files sent, that study)."""
    data = tmp_path / "data"
    server = start_server(data)
    offline_study = generate_uid()
    sent = [
        make_instance(tmp_path / "src", study_uid=study, series_uid=series)
        for study in (offline_study, generate_uid())
        for series in (generate_uid(), generate_uid())
        for _ in range(3)
    ]
    assert [s.status for s in send_files(server.port, sent)] == [0] * len(sent)
    assert server.stop() == 0
    result = imaging_scp("availability", "set", "--study", offline_study, "offline", data_dir=data)
    assert result.returncode == 0, result.stderr
    return data, sent, offline_study


def indexed(data: Path) -> dict[str, str]:
    """sop instance uid -> path, as the index holds them."""
    with sqlite3.connect(data / "index.sqlite") as db:
        return dict(db.execute("SELECT sop_instance_uid, path FROM instances"))


def study_json(data: Path, study_uid: str) -> dict:
    result = imaging_scp("study", study_uid, "--json", data_dir=data)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_index_is_refused_named_and_rebuilt_from_the_files(stopped_archive, damage):
    data, sent, offline_study = stopped_archive
    index = data / "index.sqlite"
    DAMAGE[damage](index)

    # serve refuses to start rather than store into it: a one-line error and an
    # event, both naming the file and what to do
    serve = imaging_scp(
        "serve", "--host", "127.0.0.1", "--port", str(free_port()), data_dir=data, timeout=20
    )
    assert serve.returncode != 0
    assert f"the index {index} is damaged" in serve.stderr and ADVICE in serve.stderr
    assert "write access" not in serve.stderr
    events = [json.loads(line) for line in serve.stdout.splitlines() if line.startswith("{")]
    damaged = [e for e in events if e["event"] == "index.corrupt"]
    assert damaged and damaged[0]["path"] == str(index)

    # verify never says OK on it
    verify = imaging_scp("verify", data_dir=data)
    assert verify.returncode == 1
    assert "OK" not in verify.stdout
    assert f"the index {index} is damaged" in verify.stderr and ADVICE in verify.stderr

    # rebuild: every instance back from the files, the damaged file kept aside
    rebuild = imaging_scp("rebuild", data_dir=data)
    assert rebuild.returncode == 0, rebuild.stderr
    [kept_aside] = [
        p for p in data.glob("index.sqlite.corrupt-*") if p.name[-4:] not in DB_SUFFIXES
    ]
    assert f"kept aside as {kept_aside}" in rebuild.stdout
    on_disk = {str(p.relative_to(data)) for p in stored_files(data)}
    assert len(on_disk) == len(sent)
    assert set(indexed(data).values()) == on_disk
    assert imaging_scp("verify", "--checksum", data_dir=data).returncode == 0
    if damage == "studies page overwritten":  # the series table was still readable
        assert study_json(data, offline_study)["availability"] == "OFFLINE"
    else:  # what could not be read is said
        assert "not carried over" in rebuild.stderr

    # and the node works again
    server = start_server(data)
    try:
        again = make_instance(
            data.parent / "src", study_uid=generate_uid(), series_uid=generate_uid()
        )
        assert [s.status for s in send_files(server.port, [again])] == [0]
    finally:
        server.stop()


def test_rebuild_says_what_the_damaged_index_could_not_give(stopped_archive):
    data, sent, offline_study = stopped_archive
    overwrite_root_page(data / "index.sqlite", "series")
    rebuild = imaging_scp("rebuild", data_dir=data)
    assert rebuild.returncode == 0, rebuild.stderr
    assert "not carried over: series" in rebuild.stderr
    assert "availability set by an admin" in rebuild.stderr
    assert len(indexed(data)) == len(sent)
    assert study_json(data, offline_study)["availability"] == "ONLINE"


def test_rebuild_creates_a_missing_index_from_the_files(stopped_archive):
    data, sent, _ = stopped_archive
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (data / name).unlink(missing_ok=True)
    rebuild = imaging_scp("rebuild", data_dir=data)
    assert rebuild.returncode == 0, rebuild.stderr
    assert len(indexed(data)) == len(sent)
    assert "not carried over" in rebuild.stderr


def test_rebuild_leaves_a_damaged_index_alone_while_serve_has_it_open(tmp_path):
    data = tmp_path / "data"
    server = start_server(data)
    try:
        sent = [make_instance(tmp_path, study_uid=generate_uid(), series_uid=generate_uid())]
        assert [s.status for s in send_files(server.port, sent)] == [0]
        overwrite_root_page(data / "index.sqlite", "studies")
        rebuild = imaging_scp("rebuild", data_dir=data)
        assert rebuild.returncode == 1
        assert "open in another process" in rebuild.stderr
        assert not list(data.glob("index.sqlite.corrupt-*"))
    finally:
        server.stop()


def test_a_c_store_that_meets_a_damaged_index_is_refused_0xA700(tmp_path):
    data = tmp_path / "data"
    server: Server = start_server(data)
    try:
        first = make_instance(tmp_path, study_uid=generate_uid(), series_uid=generate_uid())
        assert [s.status for s in send_files(server.port, [first])] == [0]
        overwrite_root_page(data / "index.sqlite", "instances")
        second = make_instance(tmp_path, study_uid=generate_uid(), series_uid=generate_uid())
        [status] = send_files(server.port, [second])
        assert status.status == 0xA700
        assert "index is damaged" in status.comment and "rebuild" in status.comment
        event = server.wait_for_event("index.corrupt")[0]
        assert str(data / "index.sqlite") in event["reason"] and ADVICE in event["reason"]
        # nothing of it stays: no file without its row
        assert temp_files(data) == []
        assert len(stored_files(data)) == 1
    finally:
        server.stop()


def test_a_c_find_that_meets_a_damaged_index_fails_with_the_reason(tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    data = tmp_path / "data"
    server: Server = start_server(data)
    try:
        sent = make_instance(tmp_path, study_uid=generate_uid(), series_uid=generate_uid())
        assert [s.status for s in send_files(server.port, [sent])] == [0]
        overwrite_root_page(data / "index.sqlite", "studies")
        ae = AE("TESTSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="IMAGING_SCP")
        try:
            query = pydicom.Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = ""
            answers = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
        finally:
            assoc.release()
        final = answers[-1][0]
        assert final.Status == 0xC000
        assert "index is damaged" in final.ErrorComment
        event = server.wait_for_event("index.corrupt")[0]
        assert str(data / "index.sqlite") in event["reason"] and ADVICE in event["reason"]
    finally:
        server.stop()


@pytest.mark.parametrize("loss", ["cut to nothing", "removed"])
def test_serve_refuses_an_empty_index_beside_an_archive(stopped_archive, loss):
    """SQLite takes an empty file (or none) for an empty database: serve would
    store into it and every earlier instance would be gone from every query."""
    data, sent, _ = stopped_archive
    index = data / "index.sqlite"
    if loss == "removed":
        index.unlink()
    else:
        cut_short(index, 0)
    serve = imaging_scp(
        "serve", "--host", "127.0.0.1", "--port", str(free_port()), data_dir=data, timeout=20
    )
    assert serve.returncode != 0
    assert f"the index {index} holds no instances" in serve.stderr
    assert "run `imaging-scp rebuild`" in serve.stderr
    rebuild = imaging_scp("rebuild", data_dir=data)
    assert rebuild.returncode == 0, rebuild.stderr
    assert len(indexed(data)) == len(sent)


def study_level_find(port: int) -> pydicom.Dataset:
    """The final response of a universal STUDY-level C-FIND by pynetdicom."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    ae = AE("TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGING_SCP")
    try:
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        answers = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    return answers[-1][0]


def echo_cli(port: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [IMAGING_SCP, "echo", "--timeout", "10", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )


DAMAGED = "index damaged: run imaging-scp rebuild with serve stopped"


@pytest.mark.parametrize("met_by", ["C-STORE", "C-STORE of a resend", "C-FIND"])
def test_a_node_whose_index_turns_out_damaged_takes_itself_out(tmp_path, met_by):
    """Damage found under a running serve: the node says so where a load
    balancer and an admin look, as for an unavailable index, and keeps saying
    it (no probe heals a damaged file: the admin rebuilds it, serve stopped)."""
    data = tmp_path / "data"
    notify = NotifySocket(tmp_path)
    server: Server = start_server(data, env={"NOTIFY_SOCKET": notify.env_value})
    try:
        first = make_instance(tmp_path, study_uid=generate_uid(), series_uid=generate_uid())
        assert [s.status for s in send_files(server.port, [first])] == [0]
        assert echo_cli(server.port).returncode == 0
        if met_by == "C-STORE":
            overwrite_root_page(data / "index.sqlite", "instances")
            second = make_instance(tmp_path, study_uid=generate_uid(), series_uid=generate_uid())
            assert [s.status for s in send_files(server.port, [second])] == [0xA700]
        elif met_by == "C-STORE of a resend":  # looked up before its transaction
            overwrite_root_page(data / "index.sqlite", "instances")
            assert [s.status for s in send_files(server.port, [first])] == [0xA700]
        else:
            overwrite_root_page(data / "index.sqlite", "studies")
            assert study_level_find(server.port).Status == 0xC000
        server.wait_for_event("index.corrupt")
        echo = echo_cli(server.port)
        assert echo.returncode == 1
        assert f"status 0x0110: {DAMAGED}" in echo.stderr
        rejection = association_rejection(server.port)
        assert rejection is not None and rejection[0] == 0x02  # transient
        reason = server.wait_for_event("association.rejected")[-1]["reason"]
        assert reason.startswith("index damaged") and ADVICE in reason
        notify.receive(lambda m: m.get("STATUS", "").startswith("index damaged"))
        out = server.wait_for_event("index.unavailable")[0]
        assert out["reason"].startswith("index damaged")
        assert str(data / "index.sqlite") in out["reason"] and "rebuild" in out["advice"]
        # Several probe intervals later, it still says so.
        time.sleep(3)
        assert echo_cli(server.port).returncode == 1
        assert association_rejection(server.port) is not None
        assert server.events("index.available") == []
    finally:
        server.stop()
        notify.close()
