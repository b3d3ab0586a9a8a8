"""The index going away under a live node: PostgreSQL restarted, stopped or
frozen (SIGSTOP), SQLite's write lock held by another process. Every C-STORE
is answered within index_timeout, a Success always has its row and its file,
the node says it is out where a load balancer and an admin look, and it stores
again on its own once the index is back."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from storage.catalog.engines import IndexLocation
from storage.catalog.index import Catalog
from storage.files import prepare_data_dir
from tests.conftest import (
    CT_IMAGE_STORAGE,
    IMAGING_SCP,
    assert_nothing_half_written,
    association_rejection,
    dataset_bytes,
    make_instance,
    start_server,
)
from tests.test_hostile import EXPLICIT_LE, AssociationRefused, RawAssociation
from tests.test_systemd import NotifySocket
from tests.test_web import start_web

ROOT = Path(__file__).resolve().parent.parent
INDEX_TIMEOUT = 3  # seconds; the default is 10
# What an answer may take beyond index_timeout: the deadline is looked at every
# 0.1 s, and the machine running the tests is shared.
MARGIN = 2.5


@pytest.fixture(scope="module")
def cluster():
    """A PostgreSQL of this module's own: its tests stop, restart and freeze it."""
    from tests.postgres import Cluster, find_binaries

    binaries = find_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL not installed (apt-get install postgresql)")
    started = Cluster.start(binaries)
    yield started
    started.thaw()
    started.stop()


@pytest.fixture
def servers():
    started = []
    yield started
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


def serve(servers, data_dir: Path, index_url: str = "", env: dict | None = None):
    server = start_server(
        data_dir, "--index-timeout", str(INDEX_TIMEOUT), index_url=index_url, env=env
    )
    servers.append(server)
    return server


class Sender:
    """One association proposing CT Image Storage and Verification, kept open."""

    def __init__(self, port: int):
        self.assoc = RawAssociation(
            port, [(1, CT_IMAGE_STORAGE, [EXPLICIT_LE]), (3, "1.2.840.10008.1.1", [EXPLICIT_LE])]
        )

    def store(self, path: Path):
        """(status, ErrorComment, seconds until the answer)."""
        started = time.monotonic()
        uid = path.stem.split("_", 1)[1]
        response = self.assoc.store(1, CT_IMAGE_STORAGE, uid, dataset_bytes(path))
        return response.status, response.comment, time.monotonic() - started

    def release(self) -> None:
        self.assoc.release()


def instances(directory: Path, count: int) -> list[Path]:
    """New CT instances of one series, named <n>_<SOP Instance UID>.dcm."""
    study, series = generate_uid(), generate_uid()
    paths = []
    for number in range(count):
        uid = generate_uid()
        made = make_instance(directory, study_uid=study, series_uid=series, sop_instance_uid=uid)
        paths.append(made.rename(directory / f"{number:04d}_{uid}.dcm"))
    return paths


def indexed_uids(server) -> set[str]:
    return {row[0] for row in server.index().execute("SELECT sop_instance_uid FROM instances")}


def echo_cli(port: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [IMAGING_SCP, "echo", "--timeout", "10", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def assert_rejected_transient(server) -> None:
    rejection = association_rejection(server.port)
    assert rejection is not None, "a new association was accepted while the index is out"
    assert rejection[0] == 0x02  # transient: the sender (or the load balancer) tries later
    reason = server.wait_for_event("association.rejected")[-1]["reason"]
    assert reason.startswith("index unavailable since")


def test_postgresql_restart_under_ingest(tmp_path, cluster, servers):
    """pg_ctl restart while a sender sends: the node stores again on its own,
    and every instance answered Success has its row and its file."""
    server = serve(servers, tmp_path / "data", cluster.new_database())
    paths = instances(tmp_path / "in", 150)
    statuses: dict[str, int] = {}
    failures: list[BaseException] = []

    def send() -> None:
        try:
            sender = Sender(server.port)
            for path in paths:
                status, _comment, _ = sender.store(path)
                statuses[path.stem.split("_", 1)[1]] = status
                time.sleep(0.02)
            sender.release()
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    while len(statuses) < 30 and thread.is_alive():
        time.sleep(0.02)
    cluster.restart()
    thread.join(120)
    assert not failures, failures
    assert len(statuses) == len(paths)
    # Storing resumed by itself: the last instances, sent after the restart, are stored.
    assert all(status == 0x0000 for status in list(statuses.values())[-40:]), statuses
    refused = [uid for uid, status in statuses.items() if status != 0x0000]
    assert all(statuses[uid] == 0xA700 for uid in refused)
    if refused:  # the restart met an instance on its way: the outage was said, then its end
        server.wait_for_event("index.unavailable")
        server.wait_for_event("index.available", timeout=15)
    indexed = indexed_uids(server)
    assert {uid for uid, status in statuses.items() if status == 0x0000} <= indexed
    assert_nothing_half_written(server)
    # And a new association stores, without restarting imaging-scp.
    sender = Sender(server.port)
    assert sender.store(instances(tmp_path / "after", 1)[0])[0] == 0x0000
    sender.release()


def test_postgresql_down_the_node_says_so_and_stores_again_when_it_is_back(
    tmp_path, cluster, servers
):
    notify = NotifySocket(tmp_path)
    server = serve(
        servers, tmp_path / "data", cluster.new_database(), env={"NOTIFY_SOCKET": notify.env_value}
    )
    first, during, after = instances(tmp_path / "in", 3)
    sender = Sender(server.port)
    assert sender.store(first)[0] == 0x0000
    cluster.stop_server()
    try:
        status, comment, seconds = sender.store(during)
        assert status == 0xA700
        assert seconds < INDEX_TIMEOUT + MARGIN
        assert comment.startswith("index")
        sender.release()
        event = server.wait_for_event("index.unavailable")[0]
        assert "connection" in event["reason"] or "connect" in event["reason"]
        # Where a load balancer and an admin look: associations, C-ECHO, systemd.
        assert_rejected_transient(server)
        echo = echo_cli(server.port)
        assert echo.returncode == 1
        assert "status 0x0110: index unavailable since" in echo.stderr
        notify.receive(lambda m: m.get("STATUS", "").startswith("index unavailable since"))
    finally:
        cluster.start_server()
    server.wait_for_event("index.available", timeout=15)
    assert echo_cli(server.port).returncode == 0
    notify.receive(lambda m: m.get("STATUS", "").startswith("listening on"))
    sender = Sender(server.port)
    assert sender.store(after)[0] == 0x0000
    sender.release()
    indexed = indexed_uids(server)
    uid = lambda path: path.stem.split("_", 1)[1]  # noqa: E731
    assert uid(first) in indexed and uid(after) in indexed and uid(during) not in indexed
    assert_nothing_half_written(server)
    notify.close()


def test_connection_lost_mid_transaction_is_read_back_before_the_answer(tmp_path, cluster, servers):
    """The writer's session ends while its statement waits on the server (here
    for a study lock the test holds): the instance's row is read back on a new
    connection before the sender is answered, and the node stores again."""
    import psycopg

    from storage.catalog.engines import lock_number

    url = cluster.new_database()
    server = serve(servers, tmp_path / "data", url)
    first, lost = instances(tmp_path / "in", 2)
    sender = Sender(server.port)
    assert sender.store(first)[0] == 0x0000
    study = server.index().execute("SELECT study_uid FROM studies").fetchone()[0]
    answer: list = []
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_advisory_lock(%s)", (lock_number(study),))
        thread = threading.Thread(target=lambda: answer.append(sender.store(lost)))
        thread.start()
        deadline = time.monotonic() + INDEX_TIMEOUT
        waiting = []
        while not waiting and time.monotonic() < deadline:
            waiting = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
        assert len(waiting) == 1, "the writer never waited for the study's lock"
        admin.execute("SELECT pg_terminate_backend(%s)", (waiting[0][0],))
        thread.join(INDEX_TIMEOUT + MARGIN)
    status, comment, _ = answer[0]
    assert status == 0xA700
    assert comment == "index connection lost: send again"
    refused = server.wait_for_event("instance.refused")[0]["reason"]
    assert refused.startswith("connection to the index lost")
    assert "not indexed and nothing of it was kept" in refused
    server.wait_for_event("index.unavailable")
    server.wait_for_event("index.available", timeout=5)
    assert_nothing_half_written(server)
    # The sender's resend is stored, on the node's new connection.
    assert sender.store(lost)[0] == 0x0000
    sender.release()
    assert indexed_uids(server) == {p.stem.split("_", 1)[1] for p in (first, lost)}
    assert_nothing_half_written(server)


def test_frozen_postgresql_every_sender_answered_within_index_timeout(tmp_path, cluster, servers):
    """SIGSTOP on the whole server: three senders at once (one group commit's
    leader and its followers) are each refused 0xA700 within the bound; after
    SIGCONT nothing is half-written and the next instance is stored."""
    server = serve(servers, tmp_path / "data", cluster.new_database())
    paths = instances(tmp_path / "in", 7)
    senders = [Sender(server.port) for _ in range(3)]
    for sender, path in zip(senders, paths[:3], strict=True):
        assert sender.store(path)[0] == 0x0000
    answers: list = [None] * 3
    cluster.freeze()
    try:

        def send(number: int) -> None:
            try:
                answers[number] = senders[number].store(paths[3 + number])
            except (OSError, AssociationRefused) as exc:  # no answer within 10 s
                answers[number] = exc

        threads = [threading.Thread(target=send, args=(n,)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        for answer in answers:
            assert isinstance(answer, tuple), f"no C-STORE-RSP: {answer!r}"
            status, comment, seconds = answer
            assert status == 0xA700
            assert comment == f"index did not answer within {INDEX_TIMEOUT} s"
            assert seconds < INDEX_TIMEOUT + MARGIN
        reason = server.wait_for_event("index.unavailable")[0]["reason"]
        assert f"index did not answer within {INDEX_TIMEOUT} s" in reason
        assert_rejected_transient(server)
    finally:
        cluster.thaw()
    server.wait_for_event("index.available", timeout=20)
    status, _, _ = senders[0].store(paths[6])
    assert status == 0x0000
    for sender in senders:
        sender.release()
    # An instance refused while the server was frozen is either indexed with its
    # file (its COMMIT landed when the server woke) or gone whole.
    assert_nothing_half_written(server)


# Another process holding the SQLite index's write lock, for `argv[2]` seconds:
# an admin command writing (its turn taken as every writer takes it), or a
# `sqlite3` shell inside BEGIN EXCLUSIVE (SQLite's own lock only).
_HOLDERS = {
    "writers-turn": """
import sys, time
from storage.catalog.engines import SQLiteDatabase
db = SQLiteDatabase(sys.argv[1])
db.prepare_writer()
with db.writers_turn():
    db.begin()
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
""",
    "begin-exclusive": """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
""",
}


@pytest.mark.parametrize("holder", sorted(_HOLDERS))
def test_sqlite_write_lock_held_by_another_process(tmp_path, servers, holder):
    server = serve(servers, tmp_path / "data")
    first, during, after = instances(tmp_path / "in", 3)
    sender = Sender(server.port)
    assert sender.store(first)[0] == 0x0000
    holding = subprocess.Popen(
        [sys.executable, "-c", _HOLDERS[holder], str(server.data_dir / "index.sqlite"), "60"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holding.stdout.readline() == "held\n"
        status, comment, seconds = sender.store(during)
        assert status == 0xA700
        assert comment == f"index did not answer within {INDEX_TIMEOUT} s"
        assert seconds < INDEX_TIMEOUT + MARGIN
        reason = server.wait_for_event("index.unavailable")[0]["reason"]
        assert "write lock" in reason
    finally:
        holding.kill()
        holding.wait(10)
    server.wait_for_event("index.available", timeout=INDEX_TIMEOUT + 5)
    assert sender.store(after)[0] == 0x0000
    sender.release()
    uid = lambda path: path.stem.split("_", 1)[1]  # noqa: E731
    assert indexed_uids(server) == {uid(first), uid(after)}
    assert_nothing_half_written(server)


def study_level_find(port: int) -> tuple[int, list[str]]:
    """A universal STUDY-level C-FIND by pynetdicom: (final status, the
    StudyInstanceUIDs of its matches)."""
    from pydicom import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    ae = AE("FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGING_SCP")
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        answers = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    matches = [str(identifier.StudyInstanceUID) for _, identifier in answers[:-1]]
    return answers[-1][0].Status, matches


def test_readers_after_a_postgresql_restart_get_a_live_connection(tmp_path, cluster, servers):
    """The reader pool's idle connections die with a restart: the first C-FIND
    after it, and a storage commitment requested right after it, are served
    (each lent connection is checked, a dead one replaced), not failed once."""
    from tests.test_commitment import Reports, references, request_commitment

    server = serve(servers, tmp_path / "data", cluster.new_database())
    paths = instances(tmp_path / "in", 3)
    sender = Sender(server.port)
    assert [sender.store(path)[0] for path in paths] == [0x0000] * 3
    sender.release()
    study = server.index().execute("SELECT study_uid FROM studies").fetchone()[0]
    assert study_level_find(server.port) == (0x0000, [study])  # the pool holds a connection

    cluster.restart()
    assert study_level_find(server.port) == (0x0000, [study])

    cluster.restart()
    reports = Reports()
    transaction = generate_uid()
    status = request_commitment(server, transaction, references(paths), reports=reports)
    assert status == 0x0000
    [(event_type, _info)] = reports.received
    assert event_type == 1  # all committed
    assert server.wait_for_event("commitment.checked")[-1]["transaction_uid"] == transaction
    # The reporter looks for owed reports every 5 s, on a lent connection too.
    time.sleep(6)
    assert server.events("commitment.reporter_failed") == []
    assert server.events("commitment.check_failed") == []


def test_postgresql_down_the_web_answers_503_with_the_reason_and_its_health_says_so(
    tmp_path, cluster
):
    """Was: each request waited 30 s (the pool's own timeout), then a bare 500."""
    url = cluster.new_database()
    data_dir = tmp_path / "data"
    prepare_data_dir(data_dir, "test")
    Catalog.open(IndexLocation(data_dir, url)).close()  # what the listener's start makes
    web = start_web(tmp_path, "--index-url", url, "--index-timeout", str(INDEX_TIMEOUT))
    try:
        assert httpx.get(web.url + "/health").json() == {"index": "available"}
        cluster.stop_server()
        try:
            for path in ("/health", "/dicomweb/studies", "/fhir/r4/ImagingStudy"):
                started = time.monotonic()
                answer = httpx.get(web.url + path, timeout=60)
                assert time.monotonic() - started < INDEX_TIMEOUT + MARGIN, path
                assert answer.status_code == 503, (path, answer.text)
                assert answer.headers["retry-after"] == "10"
                assert "index unavailable: cannot connect to the index at" in answer.text
            fhir = httpx.get(web.url + "/fhir/r4/ImagingStudy/1.2.3", timeout=60).json()
            assert fhir["resourceType"] == "OperationOutcome"
            assert fhir["issue"][0]["code"] == "transient"
        finally:
            cluster.start_server()
        deadline = time.monotonic() + 15
        while httpx.get(web.url + "/health", timeout=60).status_code != 200:
            assert time.monotonic() < deadline, "the web did not see the index come back"
            time.sleep(0.2)
        assert httpx.get(web.url + "/dicomweb/studies").status_code == 200
    finally:
        web.process.terminate()
        web.process.wait(10)
    assert '"web.index_unavailable"' in web.log_path.read_text()


def test_postgresql_down_a_query_and_a_scrape_are_answered_within_the_index_timeout(
    tmp_path, cluster, servers
):
    """Both read through the reader pool, which waited 30 s of its own: longer
    than a C-FIND's requester and Prometheus's scrape (10 s) wait."""
    from pydicom import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    from tests.conftest import free_port
    from tests.test_metrics import scrape

    metrics_port = free_port()
    server = start_server(
        tmp_path / "data", "--index-timeout", str(INDEX_TIMEOUT),
        "--metrics-port", str(metrics_port), index_url=cluster.new_database(),
    )  # fmt: skip
    servers.append(server)
    first, during = instances(tmp_path / "in", 2)
    sender = Sender(server.port)
    assert sender.store(first)[0] == 0x0000
    ae = AE("FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    finder = ae.associate("127.0.0.1", server.port, ae_title="IMAGING_SCP")
    assert finder.is_established  # before the outage
    cluster.stop_server()
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        started = time.monotonic()
        answers = list(finder.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
        assert time.monotonic() - started < INDEX_TIMEOUT + MARGIN
        assert answers[-1][0].Status == 0xC000
        finder.release()

        assert sender.store(during)[0] == 0xA700  # the node now knows
        sender.release()
        started = time.monotonic()
        scraped = scrape(metrics_port)
        assert time.monotonic() - started < MARGIN
        assert scraped("imaging_scp_index_available") == 0
        assert ("imaging_scp_index_studies", ()) not in scraped
    finally:
        cluster.start_server()
    server.wait_for_event("index.available", timeout=15)
    scraped = scrape(metrics_port)
    assert (scraped("imaging_scp_index_available"), scraped("imaging_scp_index_studies")) == (1, 1)


def test_a_web_on_an_index_no_listener_has_set_up_says_so(tmp_path, cluster):
    """Was a 500 and a traceback (PostgreSQL's UndefinedTable)."""
    url = cluster.new_database()  # empty: the listener's start makes the tables
    web = start_web(tmp_path, "--index-url", url)
    try:
        for path in ("/health", "/dicomweb/studies", "/fhir/r4/ImagingStudy"):
            answer = httpx.get(web.url + path, timeout=60)
            assert answer.status_code == 503, (path, answer.text)
            assert "no `imaging-scp serve` has set this index up yet" in answer.text
    finally:
        web.process.terminate()
        web.process.wait(10)
