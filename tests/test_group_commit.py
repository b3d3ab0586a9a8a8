"""Group commit: instances that reach the index together share one transaction,
each caller still returns only once the commit holding its row is done, and
one that fails takes nobody else down."""

import errno
import fcntl
import threading
import time

import pytest

from storage.catalog import Catalog
from storage.catalog.engines import IndexLocation, SQLiteDatabase
from storage.files import prepare_data_dir
from storage.policy import DuplicatePolicy
from storage.store import InstanceStore, Outcome, Refusal, StoreRefused
from tests.conftest import both_indexes, index_url_for, make_instance, receive_file

pytestmark = both_indexes


@pytest.fixture
def index(tmp_path):
    index = Catalog.open(IndexLocation(tmp_path, index_url_for(tmp_path)))
    yield index
    index.close()


def _row_writer(index: Catalog, key: str, seen_committed: list):
    def work():
        index.conn.execute(
            "INSERT INTO conflicts (sop_instance_uid, action) VALUES (?, 'test')", (key,)
        )
        time.sleep(0.02)  # as long as a file's fsync: others queue up meanwhile
        return key

    def run():
        result = index.commit_together(work)
        # Returned: the row must be visible to a connection of its own.
        reader = index.location.open()
        seen_committed.append(
            reader.execute(
                "SELECT count(*) FROM conflicts WHERE sop_instance_uid = ?", (result,)
            ).fetchone()[0]
        )
        reader.close()

    return run


def test_concurrent_writers_share_commits_and_each_returns_after_its_own(index):
    commits = []
    commit = index.conn.commit

    def counting_commit():  # a spy on the one writer connection
        commits.append(1)
        commit()

    index.conn.commit = counting_commit
    seen: list[int] = []
    threads = [threading.Thread(target=_row_writer(index, f"1.2.{n}", seen)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == [1] * 12
    assert len(commits) < 12, "every writer paid its own commit"


def test_a_failing_writer_is_rolled_back_alone(index):
    start = threading.Barrier(6)
    outcomes = {}

    def writer(n: int):
        def work():
            index.conn.execute(
                "INSERT INTO conflicts (sop_instance_uid, action) VALUES (?, 'test')", (f"2.{n}",)
            )
            time.sleep(0.01)
            if n == 3:
                raise ValueError("refused")
            return n

        start.wait()
        try:
            outcomes[n] = index.commit_together(work)
        except ValueError as exc:
            outcomes[n] = str(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert outcomes == {0: 0, 1: 1, 2: 2, 3: "refused", 4: 4, 5: 5}
    rows = {r[0] for r in index.conn.execute("SELECT sop_instance_uid FROM conflicts")}
    assert rows == {"2.0", "2.1", "2.2", "2.4", "2.5"}


def test_an_identical_resend_is_answered_while_another_commit_is_in_progress(tmp_path):
    """A sender resending what is stored is not held up by other associations'
    commits (a slow disk's WAL sync): on SQLite its check reads what is
    committed without waiting for the writer."""
    if index_url_for(tmp_path):
        pytest.skip("on PostgreSQL a resend is told apart inside the transaction")
    data_dir = tmp_path / "data"
    prepare_data_dir(data_dir, "test")
    index = Catalog.open(IndexLocation(data_dir))
    store = InstanceStore(data_dir, index, DuplicatePolicy.REJECT, node="test")
    path = make_instance(tmp_path / "src", study_uid="1.2.3", series_uid="1.2.3.4")

    def receive():
        return receive_file(store, path)

    assert receive().outcome is Outcome.STORED
    committing, release = threading.Event(), threading.Event()

    def slow_commit():
        committing.set()
        release.wait(30)

    other = threading.Thread(target=index.commit_together, args=(slow_commit,))
    resend: list = []
    sender = threading.Thread(target=lambda: resend.append(receive()))
    other.start()
    try:
        assert committing.wait(10)
        sender.start()
        sender.join(10)
        assert [result.outcome for result in resend] == [Outcome.IDENTICAL_RESEND]
    finally:
        release.set()
        other.join(10)
        if sender.ident is not None:  # started
            sender.join(10)
        index.close()


def test_a_series_of_another_study_is_refused_alone_inside_a_shared_commit(tmp_path):
    """Two instances reach the index together, one of them naming a series that
    belongs to another study: it is refused with nothing of it indexed, the
    other is stored, and the counts are those of the two stored instances."""
    data_dir = tmp_path / "data"
    prepare_data_dir(data_dir, "test")
    index = Catalog.open(IndexLocation(data_dir, index_url_for(tmp_path)))
    store = InstanceStore(data_dir, index, DuplicatePolicy.KEEP_FIRST, node="test")

    def receive(path):
        return receive_file(store, path)

    def instance(name, study_uid):
        return make_instance(tmp_path / name, study_uid=study_uid, series_uid="1.2.3.4")

    assert receive(instance("first", "1.2.3")).outcome is Outcome.STORED
    committing, release = threading.Event(), threading.Event()

    def slow_commit():
        committing.set()
        release.wait(30)

    other = threading.Thread(target=index.commit_together, args=(slow_commit,))
    other.start()
    results: dict = {}

    def send(name, study_uid):
        try:
            results[name] = receive(instance(name, study_uid)).outcome
        except StoreRefused as refused:
            results[name] = refused.refusal

    senders = [
        threading.Thread(target=send, args=("moved", "1.2.9")),
        threading.Thread(target=send, args=("second", "1.2.3")),
    ]
    try:
        assert committing.wait(10)
        for sender in senders:
            sender.start()
        time.sleep(0.5)  # both queue behind the slow commit, to share the next one
        assert results == {}
    finally:
        release.set()
        other.join(10)
        for sender in senders:
            sender.join(10)
    assert results == {"moved": Refusal.SERIES_IN_OTHER_STUDY, "second": Outcome.STORED}
    conn = index.conn
    assert conn.execute("SELECT count(*) FROM instances").fetchone()[0] == 2
    for table in ("series", "studies"):
        rows = conn.execute(f"SELECT study_uid, number_of_instances FROM {table}").fetchall()
        assert [tuple(row) for row in rows] == [("1.2.3", 2)], table
    index.close()


def _receiver(tmp_path):
    """A store on a fresh data dir, and a function that receives a new instance
    of a given study and series through it."""
    data_dir = tmp_path / "data"
    prepare_data_dir(data_dir, "test")
    location = IndexLocation(data_dir, index_url_for(tmp_path))
    store = InstanceStore(data_dir, Catalog.open(location), DuplicatePolicy.REJECT, node="test")
    names = iter(range(1_000_000))

    def receive(study_uid: str, series_uid: str):
        path = make_instance(
            tmp_path / f"src{next(names)}", study_uid=study_uid, series_uid=series_uid
        )
        return receive_file(store, path).outcome

    return location, store, receive


def _held_by_another_node(location: IndexLocation, study_uid: str, other: Catalog | None = None):
    """Another node's write transaction on the study (through `other`, by
    default an index of its own on `location`), open until the returned event
    is set; its thread. `other` is closed once the transaction ends."""
    holding, release = threading.Event(), threading.Event()
    other = other or Catalog.open(location)

    def hold():
        with other.writing(lock_keys=[study_uid]):
            other.conn.execute("SELECT count(*) FROM studies")  # the locks go with it
            holding.set()
            release.wait(30)
        other.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert holding.wait(10)
    return release, thread


def _received_while_held(
    location: IndexLocation, receive, other: Catalog | None = None, wait: float = 0.5
) -> tuple[list, list]:
    """A new instance of study 1.2.3 received while another node holds a write
    transaction on that study (`_held_by_another_node`): the outcome `wait`
    seconds in (empty: still waiting), and once the other node has committed."""
    release, holder = _held_by_another_node(location, "1.2.3", other)
    outcome: list = []
    sender = threading.Thread(target=lambda: outcome.append(receive("1.2.3", "1.2.3.4")))
    try:
        sender.start()
        sender.join(wait)
        early = list(outcome)
    finally:
        release.set()
        holder.join(10)
        sender.join(30)
    return early, outcome


def test_an_instance_waits_for_another_nodes_transaction_on_its_study(tmp_path):
    """Across nodes the instances of one study are indexed one transaction at a
    time: a new instance of a known series is not counted while another node
    changes its study, and is counted once that node commits."""
    location, store, receive = _receiver(tmp_path)
    assert receive("1.2.3", "1.2.3.4") is Outcome.STORED
    early, outcome = _received_while_held(location, receive)
    assert early == [], "indexed while another node held its study"
    assert outcome == [Outcome.STORED]
    counts = store.index.conn.execute(
        "SELECT number_of_instances FROM studies WHERE study_uid = '1.2.3'"
    ).fetchone()
    assert counts[0] == 2
    store.index.close()


def test_another_nodes_transaction_on_one_study_does_not_hold_up_another(tmp_path):
    """On PostgreSQL the nodes wait for each other per study, not for the whole
    index (SQLite has one writer at a time: nothing to test there)."""
    if not index_url_for(tmp_path):
        pytest.skip("SQLite serialises every writer")
    location, store, receive = _receiver(tmp_path)
    assert receive("1.2.7", "1.2.7.1") is Outcome.STORED
    release, holder = _held_by_another_node(location, "1.2.3")
    try:
        assert receive("1.2.7", "1.2.7.1") is Outcome.STORED
    finally:
        release.set()
        holder.join(10)
    store.index.close()


def test_a_writer_waits_its_turn_without_meeting_sqlites_busy_state(tmp_path):
    """SQLite: a process that writes while another one does waits in the kernel
    and goes the moment the other commits. It never meets SQLite's busy state,
    whose handler sleeps 1, 2, 5, 10 … ms per try: with `workers` > 1 that was
    most of an instance's wait for the index. So even with no busy timeout at
    all, the instance is stored, once the other writer is done."""
    if index_url_for(tmp_path):
        pytest.skip("PostgreSQL's transactions wait for each other on the server")
    location, store, receive = _receiver(tmp_path)
    store.index.conn.execute("PRAGMA busy_timeout = 0")
    early, outcome = _received_while_held(location, receive)
    assert early == [], "indexed while another process was writing"
    assert outcome == [Outcome.STORED]
    store.index.close()


def test_a_rebuilds_scratch_index_does_not_hold_up_the_live_one(tmp_path):
    """`rebuild` writes its scratch index beside the live one while `serve`
    ingests: each SQLite file has writers' turns of its own."""
    if index_url_for(tmp_path):
        pytest.skip("the scratch index of a rebuild is SQLite; the live one is here PostgreSQL")
    location, store, receive = _receiver(tmp_path)
    scratch = Catalog(SQLiteDatabase(location.data_dir / "index.sqlite.rebuild"))
    early, _ = _received_while_held(location, receive, scratch, wait=10)
    assert early == [Outcome.STORED], "waited for the scratch index's writer"
    store.index.close()


def test_a_filesystem_without_flock_still_takes_instances(tmp_path, monkeypatch):
    """Where the data directory's filesystem refuses flock(), the writers fall
    back to SQLite's own locking: instances are still stored."""
    if index_url_for(tmp_path):
        pytest.skip("PostgreSQL's index takes no file lock")

    def refused(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refused)
    _, store, receive = _receiver(tmp_path)
    assert receive("1.2.3", "1.2.3.4") is Outcome.STORED
    assert receive("1.2.3", "1.2.3.4") is Outcome.STORED
    count = store.index.conn.execute("SELECT number_of_instances FROM studies").fetchone()[0]
    assert count == 2
    store.index.close()
