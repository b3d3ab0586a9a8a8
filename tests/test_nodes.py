"""Several nodes, one PostgreSQL index: listener processes on different ports
share an index_url and a data dir, as hosts behind one load balancer do."""

import json
import signal
import subprocess
import threading
import time

import pytest
from click.testing import CliRunner
from pydicom.uid import generate_uid

from scp.cli import main
from storage.catalog.engines import IndexLocation
from tests.conftest import (
    IMAGING_SCP,
    STORESCU,
    free_port,
    make_instance,
    requires_dcmtk,
    send_files,
    start_server,
    stored_files,
    temp_files,
)
from tests.test_reliability import CrashSender

SENDERS = 8
PER_SENDER = 30


@pytest.fixture
def index_url(postgres_cluster):
    return postgres_cluster.new_database()


@pytest.fixture
def nodes(tmp_path, index_url):
    data = tmp_path / "data"
    started = [
        start_server(data, "--node-name", name, index_url=index_url)
        for name in ("node-a", "node-b")
    ]
    yield started
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


def _rows(index, sql: str, *params) -> list[tuple]:
    return [tuple(row) for row in index.execute(sql, params)]


@requires_dcmtk()
def test_eight_senders_on_two_nodes_into_two_studies_count_exactly(nodes, tmp_path):
    studies = [generate_uid(), generate_uid()]
    series = {study: [generate_uid(), generate_uid()] for study in studies}
    folders = []
    for sender in range(SENDERS):
        study = studies[sender % 2]
        folder = tmp_path / f"sender{sender}"
        for number in range(PER_SENDER):
            # Both nodes write into the same series at the same moment.
            make_instance(folder, study_uid=study, series_uid=series[study][number % 2],
                          modality=("CT", "PT")[number % 2], InstanceNumber=number)  # fmt: skip
        folders.append(folder)
    processes = [
        subprocess.Popen(
            [
                STORESCU,
                "+sd",
                "-aec",
                "IMAGING_SCP",
                "127.0.0.1",
                str(nodes[sender % 2].port),
                str(folder),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for sender, folder in enumerate(folders)
    ]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [p.returncode for p in processes] == [0] * SENDERS, outputs
    assert not any("Status" in out or "serializ" in out for out in outputs), outputs

    total = SENDERS * PER_SENDER
    index = nodes[0].index()
    assert _rows(index, "SELECT count(*) FROM instances") == [(total,)]
    per_study = total // 2
    assert sorted(
        _rows(index, "SELECT study_uid, number_of_series, number_of_instances FROM studies")
    ) == sorted((study, 2, per_study) for study in studies)
    assert sorted(_rows(index, "SELECT series_uid, number_of_instances FROM series")) == sorted(
        (uid, per_study // 2) for study in studies for uid in series[study]
    )
    modalities = _rows(index, "SELECT modalities FROM studies")
    assert all(sorted(json.loads(m)) == ["CT", "PT"] for (m,) in modalities)
    data = nodes[0].data_dir
    on_disk = {str(path.relative_to(data)) for path in stored_files(data)}
    assert on_disk == nodes[0].indexed_paths() and len(on_disk) == total
    assert temp_files(data) == []
    for server in nodes:
        stored = server.events("instance.stored")
        assert stored, f"{server.port} took nothing: the load was not split"
        assert not server.events("instance.refused")
    # Every admin command reads the one index, from any node.
    result = CliRunner().invoke(main, ["stats", "--json", *nodes[1].index_flags])
    assert json.loads(result.output)["instances"] == total


def test_sigkill_of_one_node_loses_nothing_and_its_restart_recovers_only_its_own(
    nodes, tmp_path, index_url
):
    node_a, node_b = nodes
    data = node_a.data_dir
    # Another node's file in flight: node A's recovery must leave it alone.
    theirs = data / ".incoming" / "node-b" / "in-flight-on-node-b.part"
    theirs.write_bytes(b"\x00" * 64)
    sender = CrashSender(tmp_path / "stream")
    sender.serve_on(node_a.port)
    thread = threading.Thread(target=sender.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while len(sender.succeeded) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    node_a.process.send_signal(signal.SIGKILL)
    node_a.process.wait(10)
    # Node B goes on serving the same archive meanwhile.
    other_study = generate_uid()
    on_b = [make_instance(tmp_path / "b", study_uid=other_study, series_uid=generate_uid())]
    assert [s.status for s in send_files(node_b.port, on_b)] == [0]

    restarted = start_server(data, "--node-name", "node-a", index_url=index_url)
    nodes.append(restarted)
    sender.serve_on(restarted.port)
    count = len(sender.succeeded)
    deadline = time.monotonic() + 30
    while len(sender.succeeded) < count + 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    sender.stop.set()
    thread.join(30)
    assert sender.error is None

    index = IndexLocation(data, index_url).open()
    indexed = dict(_rows(index, "SELECT sop_instance_uid, path FROM instances"))
    lost = [
        uid for uid in sender.succeeded if uid not in indexed or not (data / indexed[uid]).exists()
    ]
    assert lost == [], "answered Success but not both on disk and indexed"
    series = _rows(
        index, "SELECT number_of_instances FROM series WHERE series_uid = ?", sender.series_uid
    )
    stream_rows = [uid for uid in indexed if uid in sender.sent]
    assert series == [(len(stream_rows),)]  # counts exact after the kill
    assert theirs.exists(), "node A's restart removed node B's temp file"
    assert list((data / ".incoming" / "node-a").iterdir()) == []


TABLES = ("studies", "series", "instances", "conflicts", "commitments", "commitment_items")


def _table_rows(location: IndexLocation) -> dict[str, list[tuple]]:
    db = location.open()
    try:
        return {t: sorted(_rows(db, f"SELECT * FROM {t}"), key=repr) for t in TABLES}
    finally:
        db.close()


def test_migrate_index_copies_every_row_and_is_idempotent(server_factory, tmp_path, index_url):
    server = server_factory("--duplicates", "keep-first")
    study, series = generate_uid(), generate_uid()
    sources = [make_instance(tmp_path / "s", study_uid=study, series_uid=series) for _ in range(5)]
    sources += [make_instance(tmp_path / "s", study_uid=generate_uid(), series_uid=generate_uid())]
    send_files(server.port, sources)
    same_uid = make_instance(tmp_path / "c", study_uid=study, series_uid=series,
                             sop_instance_uid=generate_uid())  # fmt: skip
    send_files(server.port, [same_uid])
    changed = make_instance(tmp_path / "c2", study_uid=study, series_uid=series,
                            sop_instance_uid=_uid_of(same_uid))  # fmt: skip
    send_files(server.port, [changed])  # kept aside: a conflicts row
    assert server.stop() == 0
    data = server.data_dir
    sqlite_rows = _table_rows(IndexLocation(data))
    assert len(sqlite_rows["instances"]) == 7 and len(sqlite_rows["conflicts"]) == 1

    runner = CliRunner()
    for _ in range(2):  # the second run changes nothing
        result = runner.invoke(main, ["migrate-index", "--to", index_url, "--data-dir", str(data)])
        assert result.exit_code == 0, result.output
        assert "instances: 7 rows" in result.output
        assert _table_rows(IndexLocation(data, index_url)) == sqlite_rows

    # The migrated index serves: the same answers, and new instances on top.
    migrated = start_server(data, "--node-name", "after", index_url=index_url)
    try:
        assert _studies(migrated) == _studies_of(data, "")
        more = make_instance(tmp_path / "m", study_uid=study, series_uid=series)
        assert [s.status for s in send_files(migrated.port, [more])] == [0]
        counts = _rows(migrated.index(), "SELECT number_of_instances FROM studies WHERE"
                       " study_uid = ?", study)  # fmt: skip
        assert counts == [(7,)]
    finally:
        migrated.stop()
    # Now the target holds an instance the SQLite index does not: refused.
    result = runner.invoke(main, ["migrate-index", "--to", index_url, "--data-dir", str(data)])
    assert result.exit_code == 2 and "already holds instances" in result.output


def test_migrate_index_takes_a_nul_an_older_sqlite_index_holds(server_factory, tmp_path, index_url):
    """Before U+FFFD was indexed in its place, SQLite kept a NUL inside a value
    as sent; PostgreSQL refused the copy ("text fields cannot contain NUL")."""
    server = server_factory()
    study = generate_uid()
    source = make_instance(tmp_path / "s", study_uid=study, series_uid=generate_uid())
    assert [s.status for s in send_files(server.port, [source])] == [0]
    assert server.stop() == 0
    with server.index() as db:  # what an older version indexed
        db.execute("UPDATE studies SET patient_name = ? WHERE study_uid = ?", ("Doe\0J", study))
    data = server.data_dir
    result = CliRunner().invoke(main, ["migrate-index", "--to", index_url, "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    migrated = _rows(IndexLocation(data, index_url).open(), "SELECT patient_name FROM studies")
    assert migrated == [("Doe\ufffdJ",)]


def test_migrate_index_brings_a_schema_version_2_index_up_first(
    server_factory, tmp_path, index_url
):
    server = server_factory()
    source = make_instance(
        tmp_path / "s",
        study_uid=generate_uid(),
        series_uid=generate_uid(),
        SpecificCharacterSet="ISO_IR 192",
        PatientName="Σίσυφος^Κώστας",
    )
    assert [s.status for s in send_files(server.port, [source])] == [0]
    assert server.stop() == 0
    with server.index() as db:  # what schema version 2 held: no folded names
        db.execute("DROP INDEX idx_studies_patient_name_folded")
        for column in ("patient_name_folded", "referrer_folded"):
            db.execute(f"ALTER TABLE studies DROP COLUMN {column}")
        db.set_schema_version(2)
    data = server.data_dir
    result = CliRunner().invoke(main, ["migrate-index", "--to", index_url, "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    found = CliRunner().invoke(
        main, ["studies", "--json", "--data-dir", str(data), "--index-url", index_url,
               "--patient-name", "ΣΊΣΥΦΟΣ*"],
    )  # fmt: skip
    assert found.exit_code == 0, found.output
    assert [s["patient"]["name"] for s in json.loads(found.output)] == ["Σίσυφος^Κώστας"]


def _uid_of(path) -> str:
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


def _studies_of(data, index_url: str) -> list:
    flags = ["--data-dir", str(data), *(["--index-url", index_url] if index_url else [])]
    result = CliRunner().invoke(main, ["studies", "--json", *flags])
    assert result.exit_code == 0, result.output
    return [{k: v for k, v in s.items() if k != "state"} for s in json.loads(result.output)]


def _studies(server) -> list:
    return _studies_of(server.data_dir, server.index_url)


def test_a_pending_report_is_delivered_once_by_two_nodes_starting_together(tmp_path, index_url):
    """Both nodes' reporters owe every pending report at start: one of them
    takes it (commitment.claim), the modality hears it once."""
    from tests.test_commitment import MODALITY, Peer, a_series, references, request_commitment

    port = free_port()
    data = tmp_path / "data"
    flags = ("--peer", f"{MODALITY}=127.0.0.1:{port}", "--report-retry-interval", "600")
    first = start_server(data, "--node-name", "node-a", *flags, index_url=index_url)
    try:
        paths = a_series(tmp_path / "series", 2)
        send_files(first.port, paths, calling=MODALITY)
        transaction = generate_uid()
        request_commitment(first, transaction, references(paths), wait_for_report=False)
        first.wait_for_event("commitment.delivery_failed")  # the modality is down
    finally:
        first.stop()
    peer = Peer(port, answer_after=4).start()  # node A's delivery still in flight as B starts
    both = [
        start_server(data, "--node-name", name, *flags, index_url=index_url)
        for name in ("node-a", "node-b")
    ]
    try:
        [(_, info)] = peer.reports.wait()
        assert info.TransactionUID == transaction
        time.sleep(8)  # both reporters' next rounds: nothing more
        assert len(peer.reports.received) == 1
        reported = [e for server in both for e in server.events("commitment.reported")]
        assert len(reported) == 1
    finally:
        for server in both:
            server.stop()
        peer.stop()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_index_of_a_newer_schema_is_refused_at_start(tmp_path, postgres_cluster, backend):
    from storage.catalog import Catalog

    data = tmp_path / "data"
    data.mkdir()
    url = postgres_cluster.new_database() if backend == "postgresql" else ""
    index = Catalog.open(IndexLocation(data, url))
    index.conn.set_schema_version(99)  # as a later imaging-scp would leave it
    index.close()
    result = subprocess.run(
        [IMAGING_SCP, "serve", "--host", "127.0.0.1", "--port", str(free_port()),
         "--data-dir", str(data), *(["--index-url", url] if url else [])],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "schema version 99, written by a newer imaging-scp" in result.stderr


def test_an_index_url_that_cannot_be_used_is_one_clear_line(tmp_path):
    closed = free_port()
    url = f"postgresql://imaging:secret@127.0.0.1:{closed}/archive"
    serve = subprocess.run(
        [IMAGING_SCP, "serve", "--host", "127.0.0.1", "--port", str(free_port()),
         "--data-dir", str(tmp_path / "data"), "--index-url", url],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert serve.returncode == 2
    [line] = serve.stderr.splitlines()
    assert line.startswith("imaging-scp: error: cannot connect to the index at")
    assert f"127.0.0.1:{closed}" in line and "check index_url" in line
    assert "secret" not in line  # the password is never shown

    for given in (url, f"postgresql://imaging@127.0.0.1:{closed}/archive?password=secret"):
        admin = CliRunner().invoke(
            main, ["studies", "--data-dir", str(tmp_path), "--index-url", given]
        )
        assert admin.exit_code == 1
        assert "cannot connect to the index" in admin.output and "secret" not in admin.output

    config = tmp_path / "imaging-scp.toml"
    config.write_text('index_url = "mysql://db/archive"\n')
    wrong = CliRunner().invoke(main, ["check-config", str(config)])
    assert wrong.exit_code == 2
    assert "key 'index_url'" in wrong.output and "postgresql://" in wrong.output


def test_an_admin_command_beside_a_writer_in_its_transaction_neither_waits_nor_deadlocks(
    nodes, tmp_path, index_url
):
    """An admin command opens the index while ingest is inside a transaction on
    its tables (here one held open on purpose): opening must not ask for the
    tables' exclusive locks, or it waits behind that transaction and, when the
    writer then needs a table the command holds, one of them dies of a deadlock."""
    import psycopg

    node = nodes[0]
    study, series = generate_uid(), generate_uid()
    assert send_files(node.port, [make_instance(tmp_path, study_uid=study, series_uid=series)])
    with psycopg.connect(index_url, autocommit=True) as writer:
        writer.execute("BEGIN")
        writer.execute("LOCK TABLE studies, series, instances IN ROW EXCLUSIVE MODE")
        command = subprocess.run(
            [IMAGING_SCP, "availability", "set", "--series", series, "nearline",
             "--data-dir", str(node.data_dir), "--index-url", index_url],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        writer.execute("ROLLBACK")
    assert command.returncode == 0, command.stderr
    with IndexLocation(node.data_dir, index_url).open() as index:
        availability = _rows(index, "SELECT availability FROM series WHERE series_uid = ?", series)
    assert availability == [("NEARLINE",)]
