"""The catalog: the ImagingStudy-shaped index of one archive (studies, series
and instances), in SQLite (WAL) or PostgreSQL (storage.catalog.engines), with
the same schema and semantics on both.

`Catalog` is the door. It composes the schema (storage.catalog.schema, brought
up to date when it opens), the writer (storage.catalog.writer: one write
connection, group commit, deadlines and read-back), the ingest verbs
(storage.catalog.ingest) and the engine's way of taking an arriving instance
(`SQLiteArrivals`, `PostgresArrivals`), chosen once, here. Readers (the admin
CLI) open their own connection and never block the writer.

How each engine takes an arriving instance: in-process (SQLite) a statement
costs no round trip: a new instance is indexed by the ingest verbs in a group
commit's work, and a resend is looked up on a connection of its own beside the
writer's. On PostgreSQL each statement is a round trip to the server, whose
data directory the nodes share: the likely case, a new instance of an indexed
series, is one statement (`new_in_known_series`), and a resend is looked up on
the writer's connection.
"""

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from storage.catalog.engines import (
    Database,
    IndexFailed,
    IndexLocation,
    database_errors,
    engine_failures,
)
from storage.catalog.ingest import (
    IndexEntry,
    IndexOutcome,
    Ingest,
    StoredDigest,
    new_in_known_series,
    outcome_of,
    stored_digest_on,
)
from storage.catalog.schema import create_schema
from storage.catalog.writer import Attempt, Ticket, Writer

T = TypeVar("T")


class Catalog(Ingest):
    """The index database of one archive, as its writers use it."""

    def __init__(
        self, db: Database, location: IndexLocation | None = None, timeout: float | None = None
    ):
        self.conn = db
        self.location = location  # None: a scratch index (rebuild)
        self._writer = Writer(db, location, timeout)
        self.health = self._writer.health
        self._arrivals = (PostgresArrivals if db.remote else SQLiteArrivals)(self._writer)
        # Whether the index is shared by several listener nodes, as the data
        # directory is then (shared storage, where a stat is a round trip).
        self.shared_by_nodes = self._arrivals.shared_by_nodes
        with self._writer.alone():
            create_schema(db)

    @classmethod
    def open(cls, location: IndexLocation, timeout: float | None = None) -> "Catalog":
        return cls(location.open(create=True, timeout=timeout), location, timeout)

    def start_monitor(self) -> None:
        """Bound every write by index_timeout, and probe the index while it is
        unavailable (the listener's index; the admin commands wait instead)."""
        self._writer.start_monitor()

    def close(self) -> None:
        self._arrivals.close()
        self._writer.close()

    @contextmanager
    def writing(self, lock_keys: Iterable[str] = ()) -> Iterator["Catalog"]:
        """One write transaction (storage.catalog.writer.Writer.writing): the
        ingest verbs and the other changes run inside it."""
        with self._writer.writing(lock_keys):
            yield self

    def commit_together(self, work: Callable[[], T], *, lock_key: str | None = None) -> T:
        """`work` in a group commit (storage.catalog.writer.Writer.commit_together);
        an error of the engine is raised as IndexFailed."""
        try:  # costs nothing until something is raised: this is every instance's path
            return self._writer.commit_together(work, lock_key=lock_key)
        except database_errors() as exc:
            raise IndexFailed(exc) from exc

    def index_new_instance(
        self, entry: IndexEntry, otherwise: Callable[[], T]
    ) -> "IndexOutcome | T":
        """Index `entry`, most likely a new instance of an indexed series, in a
        group commit (as `commit_together`); when it is not — a resend, its
        series' first instance, a series of another study, a series learning its
        modality — run the work `otherwise` instead, and return what it returns.
        How is the engine's (`SQLiteArrivals`, `PostgresArrivals`); an error of the engine
        is raised as IndexFailed."""
        try:
            return self._arrivals.index_new_instance(entry, otherwise)
        except database_errors() as exc:
            raise IndexFailed(exc) from exc

    def digest_hint(self, sop_instance_uid: str) -> StoredDigest | None:
        """`stored_digest` outside a transaction, of what is committed: lets an
        identical resend be answered without writing anything. Decisions are
        re-checked in `writing()`. It does not wait for a commit in progress."""
        with engine_failures():
            return self._arrivals.digest_hint(sop_instance_uid)

    def read_back(self, uid: str, deadline: float) -> StoredDigest | None:
        """What the index holds for `uid`, on a connection that replaced a lost
        one: whether a transaction whose answer was lost committed."""
        with engine_failures():
            return self._writer.read_back(uid, deadline)

    def holds_instances(self) -> bool:
        """Whether the index holds any instance (one row read)."""
        return self.conn.execute("SELECT 1 FROM instances LIMIT 1").fetchone() is not None

    def settle_later(self, uid: str, settle: Callable[[StoredDigest | None], object]) -> None:
        """`settle(what the index holds for uid)` once the index answers again."""
        self._writer.settle_later(uid, settle)


def count_instances(location: IndexLocation) -> int:
    """How many instances the index at `location` holds (for a progress bar)."""
    db = location.open_reader()
    try:
        return db.execute("SELECT count(*) FROM instances").fetchone()[0]
    finally:
        db.close()


class SQLiteArrivals:
    """The index in-process, its files on this machine's disk."""

    shared_by_nodes = False

    def __init__(self, writer: Writer):
        self._writer = writer
        # Hints are read on a connection of their own: WAL readers do not wait
        # for the writer, and the writer's lock is held through a group's
        # COMMIT and its WAL sync.
        self._hints: Database | None = None
        self._hints_lock = threading.Lock()

    def index_new_instance(self, entry: IndexEntry, otherwise: Callable[[], T]) -> T:
        # A round trip costs nothing: `otherwise` does it all.
        return self._writer.commit_together(otherwise, lock_key=entry.header.study_uid)

    def digest_hint(self, sop_instance_uid: str) -> StoredDigest | None:
        with self._hints_lock:
            if self._hints is None:
                self._hints = self._writer.conn.another()
            try:
                return stored_digest_on(self._hints, sop_instance_uid)
            except database_errors() as exc:
                self._writer.note_damage(exc)
                raise

    def close(self) -> None:
        if self._hints is not None:
            self._hints.close()


class PostgresArrivals:
    """The index on a server that several listener nodes share, as they share
    the data directory."""

    shared_by_nodes = True

    def __init__(self, writer: Writer):
        self._writer = writer

    def index_new_instance(
        self, entry: IndexEntry, otherwise: Callable[[], T]
    ) -> "IndexOutcome | T":
        # One statement that takes the study's lock and writes everything or
        # nothing: alone, a transaction of its own, committed before its row
        # comes back; with other threads' in one group, inside their BEGIN …
        # COMMIT. One round trip either way.
        attempt = Attempt(new_in_known_series(entry), lambda row: outcome_of(entry, row))
        return self._writer.commit_ticket(Ticket(otherwise, entry.header.study_uid, attempt))

    def digest_hint(self, sop_instance_uid: str) -> StoredDigest | None:
        writer = self._writer
        with writer.connection(writer.deadline(), write=False) as conn:
            return stored_digest_on(conn, sop_instance_uid)

    def close(self) -> None:
        pass
