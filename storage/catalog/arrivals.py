"""How each engine takes an arriving instance: chosen once, when a catalog
opens its index (`arrivals_for`).

In-process (SQLite) a statement costs no round trip: a new instance is indexed
by the ingest verbs in a group commit's work, and a resend is looked up on a
connection of its own beside the writer's. On PostgreSQL each statement is a
round trip to the server, whose data directory the nodes share: the likely
case, a new instance of an indexed series, is one statement
(`_NEW_IN_KNOWN_SERIES`), and a resend is looked up on the writer's connection.
"""

import threading
from collections.abc import Callable
from typing import TypeVar

from storage.catalog.engines import POSTGRES_KEY_LOCK, Database, database_errors, lock_number
from storage.catalog.ingest import (
    ARRIVED,
    INSTANCE_COLUMNS,
    IndexEntry,
    IndexOutcome,
    StoredDigest,
    first_values_win,
    instance_values,
    stored_digest_on,
    study_values,
)
from storage.catalog.schema import SERIES_FIELDS, STUDY_FIELDS
from storage.catalog.writer import Attempt, Ticket, Writer

T = TypeVar("T")


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
        attempt = Attempt(_new_in_known_series(entry), lambda row: _outcome_of(entry, row))
        return self._writer.commit_ticket(Ticket(otherwise, entry.header.study_uid, attempt))

    def digest_hint(self, sop_instance_uid: str) -> StoredDigest | None:
        writer = self._writer
        with writer.connection(writer.deadline(), write=False) as conn:
            return stored_digest_on(conn, sop_instance_uid)

    def close(self) -> None:
        pass


def arrivals_for(db: Database, writer: Writer) -> SQLiteArrivals | PostgresArrivals:
    """The strategy of the engine `db` is a connection to."""
    return PostgresArrivals(writer) if db.remote else SQLiteArrivals(writer)


def _fields_by_type(fields: dict[str, type]) -> list[tuple[type, list[str]]]:
    """A level's fields grouped by type, in their order: one array parameter
    each in `_NEW_IN_KNOWN_SERIES` (psycopg parses a statement of more than 50
    parameters again on every call: 0.2 ms)."""
    groups = [(kind, [name for name, k in fields.items() if k is kind]) for kind in (str, int)]
    return [(kind, names) for kind, names in groups if names]


def _fill_in_from_arrays(groups: list[tuple[type, list[str]]], level: str):
    """The columns of `v` (one array of received values per group) and the SET
    list that fills in the fields still NULL from them (first value wins)."""
    arrays, assignments = [], []
    for kind, names in groups:
        array = f"{level}_{kind.__name__}"
        arrays.append(f"?::{_ARRAY_TYPES[kind]} AS {array}")
        assignments += [
            f"{name} = coalesce({name}, v.{array}[{n}])" for n, name in enumerate(names, 1)
        ]
    return arrays, assignments


def _received_arrays(groups: list[tuple[type, list[str]]], received: dict) -> list[list]:
    """The parameters of `_fill_in_from_arrays`'s arrays."""
    return [[received.get(name) for name in names] for _, names in groups]


_ARRAY_TYPES = {str: "text[]", int: "bigint[]"}
_SERIES_GROUPS = _fields_by_type(SERIES_FIELDS)
_STUDY_GROUPS = _fields_by_type(STUDY_FIELDS)
_SERIES_ARRAYS, _SERIES_FILL = _fill_in_from_arrays(_SERIES_GROUPS, "series")
_STUDY_ARRAYS, _STUDY_FILL = _fill_in_from_arrays(_STUDY_GROUPS, "study")
# PostgreSQL: one statement that indexes an instance as a new one of an indexed
# series of its study (counts up, first values filled in), or writes nothing —
# the instance known, the series new or of another study, the series learning
# its modality (the study's list then changes: `index_instance` does that), or
# the instance naming another patient than its study's (the work refuses it). A
# row back (the series' values, then the study's) when it wrote. It takes the
# study's lock before it locks a row, so that it is a whole transaction alone.
# Its snapshot is older than that lock: what another node committed meanwhile
# reaches it through the rows it updates (which PostgreSQL reads again at their
# newest), and that node's insert of the same instance is a unique violation:
# the transaction runs again. A study's Patient ID and Issuer never change once
# its row is in (an instance naming others is refused, not filled in), so the
# snapshot's are as good as the newest.
_NEW_IN_KNOWN_SERIES = (
    f"WITH v AS (SELECT {', '.join(_SERIES_ARRAYS + _STUDY_ARRAYS)}),"
    " s AS (UPDATE series SET number_of_instances = number_of_instances + 1,"
    f" bytes = bytes + ?, {ARRIVED}, {', '.join(_SERIES_FILL)} FROM v"
    f" WHERE {POSTGRES_KEY_LOCK}"
    " AND series_uid = ? AND study_uid = ? AND (modality IS NOT NULL OR ?::text IS NULL)"
    " AND NOT EXISTS (SELECT 1 FROM instances WHERE sop_instance_uid = ?)"
    " AND EXISTS (SELECT 1 FROM studies WHERE study_uid = ?"
    " AND patient_id IS NOT DISTINCT FROM ?::text"
    " AND issuer_of_patient_id IS NOT DISTINCT FROM ?::text)"
    f" RETURNING {', '.join(f'series.{name}' for name in SERIES_FIELDS)}),"
    f" i AS (INSERT INTO instances ({', '.join(INSTANCE_COLUMNS)})"
    f" SELECT {', '.join('?' * len(INSTANCE_COLUMNS))} WHERE EXISTS (SELECT 1 FROM s)),"
    " t AS (UPDATE studies SET number_of_instances = number_of_instances + 1,"
    f" bytes = bytes + ?, last_received = ?, {', '.join(_STUDY_FILL)} FROM v"
    " WHERE study_uid = ? AND EXISTS (SELECT 1 FROM s)"
    f" RETURNING {', '.join(f'studies.{name}' for name in STUDY_FIELDS)})"
    " SELECT * FROM s, t"
)


def _new_in_known_series(entry: IndexEntry) -> tuple[str, tuple]:
    header = entry.header
    return _NEW_IN_KNOWN_SERIES, (
        *_received_arrays(_SERIES_GROUPS, header.series),
        *_received_arrays(_STUDY_GROUPS, study_values(header)),
        entry.size,
        entry.received_at,
        lock_number(header.study_uid),
        header.series_uid,
        header.study_uid,
        header.series.get("modality"),
        header.sop_instance_uid,
        header.study_uid,
        header.study.get("patient_id"),
        header.study.get("issuer_of_patient_id"),
        *instance_values(entry),
        entry.size,
        entry.received_at,
        header.study_uid,
    )


def _outcome_of(entry: IndexEntry, row) -> IndexOutcome:
    """What `_NEW_IN_KNOWN_SERIES` changed, from the values it left (the stored
    first ones, or the received where none was stored)."""
    outcome = IndexOutcome()
    values = list(row)  # the series' fields, then the study's: some names are the same
    series = dict(zip(SERIES_FIELDS, values[: len(SERIES_FIELDS)], strict=True))
    study = dict(zip(STUDY_FIELDS, values[len(SERIES_FIELDS) :], strict=True))
    first_values_win("series", series, entry.header.series, outcome)
    # The folded names need no comparing: they are never reported.
    first_values_win("study", study, entry.header.study, outcome)
    return outcome
