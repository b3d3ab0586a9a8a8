"""The catalog: the ImagingStudy-shaped index of one archive (studies, series
and instances), in SQLite (WAL) or PostgreSQL (storage.catalog.engines), with
the same schema and semantics on both.

`Catalog` is the door. It composes the schema (storage.catalog.schema, brought
up to date when it opens), the writer (storage.catalog.writer: one write
connection, group commit, deadlines and read-back), the ingest verbs
(storage.catalog.ingest) and the engine's way of taking an arriving instance
(storage.catalog.arrivals), chosen once, here. Readers (the admin CLI) open
their own connection and never block the writer.
"""

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from storage.catalog.arrivals import arrivals_for
from storage.catalog.engines import (
    Database,
    IndexFailed,
    IndexLocation,
    database_errors,
    engine_failures,
)
from storage.catalog.ingest import IndexEntry, IndexOutcome, Ingest, StoredDigest
from storage.catalog.schema import create_schema
from storage.catalog.writer import Writer

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
        self._arrivals = arrivals_for(db, self._writer)
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
        How is the engine's (storage.catalog.arrivals); an error of the engine
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
