"""The ImagingStudy-shaped index: studies, series and instances, in SQLite (WAL)
or PostgreSQL (storage.catalog.engines), with the same schema and semantics on both.

Live ingest updates it incrementally: one transaction per instance inserts the
instance and updates its series and study through primary-key reads and writes
only, so the cost of indexing an instance does not depend on how large the study
or the index already is. Counts and the modality list are maintained here, never
read from DICOM tags.

Writes go through one connection guarded by one lock per process
(`Catalog.writing`); across processes SQLite's writers take turns in the kernel
(`Database.writers_turn`) before they take its write lock, and on PostgreSQL a
lock per study (`Database.lock_keys`) serialises the nodes'
transactions on the same study while other studies' go on at once.
Live ingest commits in groups (`Catalog.commit_together`): the instances that
reach the index at the same moment share one transaction and one WAL sync.
Readers (the admin CLI) open their own connection and never block the writer.

The listener's writes are bounded by index_timeout (`Catalog.start_monitor`,
storage.catalog.health): a write still waiting at its deadline has its connection cut,
a lost connection is replaced on the next write or by the probe, and what a
transaction cut short may have committed is read back before its sender is
answered.
"""

import dataclasses
import json
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from storage.attributes import ATTRIBUTES, INSTANCE, PATIENT, SERIES, STUDY, columns
from storage.catalog.engines import (
    POSTGRES_KEY_LOCK,
    SQLITE_FILENAME,
    Database,
    IndexLocation,
    IndexTimedOut,
    IndexUnreachable,
    SchemaTooNew,
    database_errors,
    is_locked,
    is_retryable,
    lock_number,
)
from storage.catalog.health import (
    Deadlines,
    IndexHealth,
    IndexInterrupted,
    IndexMonitor,
    IndexUnavailable,
)
from storage.catalog.lifecycle import ONLINE, TRANSITIONS, Event
from storage.names import fold_name

if TYPE_CHECKING:
    from storage.header import InstanceHeader

INDEX_FILENAME = SQLITE_FILENAME
# 2: storage commitment (commitments, commitment_items, series.committed_at),
# series.unavailable_by_verify, dates and times normalised with *_raw beside them
# 3: studies.patient_name_folded and referrer_folded (storage.names.fold_name)
SCHEMA_VERSION = 3

# The columns the indexed attributes fill in (storage.attributes), per table:
# first values win (`_first_values_win`). The folded names are derived from the
# names beside them, so never reported as disagreeing.
STUDY_FIELDS = columns(PATIENT, STUDY)
SERIES_FIELDS = columns(SERIES)
INSTANCE_FIELDS = columns(INSTANCE)
# Each folded name and the name it is derived from.
FOLDED_NAMES = {f"{a.column}_folded": a.column for a in ATTRIBUTES if a.folded}

# The schema, the same on SQLite and PostgreSQL: table -> (columns, primary key).
TABLES = {
    "studies": (
        {
            "study_uid": str,
            **STUDY_FIELDS,
            "modalities": str,
            "number_of_series": int,
            "number_of_instances": int,
            "bytes": int,
            "availability": str,
            "first_received": str,
            "last_received": str,
        },
        "study_uid",
    ),
    "series": (
        {
            "series_uid": str,
            "study_uid": str,
            **SERIES_FIELDS,
            "number_of_instances": int,
            "bytes": int,
            "availability": str,
            "first_received": str,
            "last_received": str,
            "incomplete_reason": str,
            "incomplete_since": str,
            # When a storage commitment last covered every instance it
            # referenced in this series with success: the series is complete.
            "committed_at": str,
            # The availability `verify` found before it marked the series
            # UNAVAILABLE (a file missing); NULL when verify did not mark it.
            "unavailable_by_verify": str,
        },
        "series_uid",
    ),
    "instances": (
        {
            "sop_instance_uid": str,
            "series_uid": str,
            "study_uid": str,
            "sop_class_uid": str,
            **INSTANCE_FIELDS,
            "transfer_syntax": str,
            "path": str,
            "size": int,
            "sha256": str,
            "received_at": str,
            "calling_ae": str,
            "called_ae": str,
            "peer": str,
            "association_id": str,
        },
        "sop_instance_uid",
    ),
    "conflicts": (
        {
            "id": int,
            "sop_instance_uid": str,
            # kept-aside, overwrote (a resend with other bytes); refused (nothing
            # of it kept: path NULL, `reason` says why).
            "action": str,
            "path": str,
            "size": int,
            "sha256": str,
            "received_at": str,
            "calling_ae": str,
            "peer": str,
            "association_id": str,
            # A refused instance has no row in instances: its study and series
            # as it named them. NULL for a resend (its instance row has them).
            "study_uid": str,
            "series_uid": str,
            "reason": str,
        },
        "id",
    ),
    "commitments": (
        {
            "transaction_uid": str,
            "requester_ae": str,
            "requester_peer": str,
            "association_id": str,
            "requested_at": str,
            "instances": int,
            # Set once, when checked: the result never changes after.
            "checked_at": str,
            "committed": int,
            "failed": int,
            # checking -> pending (-> delivering, a reporter has it) -> delivered, or failed
            "delivery_state": str,
            "attempts": int,
            "next_attempt_at": str,
            "delivered_at": str,
            "delivered_by": str,  # same association | new association
            "last_error": str,
        },
        "transaction_uid",
    ),
    "commitment_items": (
        {
            "transaction_uid": str,
            "position": int,
            "sop_class_uid": str,
            "sop_instance_uid": str,
            # Where the indexed instance was when checked (NULL: not indexed).
            "study_uid": str,
            "series_uid": str,
            "failure_reason": int,  # NULL: committed (once checked)
        },
        ("transaction_uid", "position"),
    ),
}
INDEXES = [
    ("commitments", ["delivery_state", "next_attempt_at"]),
    ("commitment_items", ["study_uid"]),
    # The admin filters (storage.catalog.reads.StudyFilter) and its newest-first order.
    *(
        ("studies", [column])
        for column in (
            "patient_id",
            "accession",
            "study_date",
            "last_received",
            "patient_name_folded",  # C-FIND's commonest key, often a prefix: DOE*
        )
    ),
    ("series", ["study_uid"]),
    ("instances", ["series_uid"]),
    ("conflicts", ["sop_instance_uid"]),
]
# How often a group's transaction is run again after a PostgreSQL deadlock or
# serialization failure, before its senders get a failure status.
COMMIT_ATTEMPTS = 8


def _left(deadline: float) -> float | None:
    """Seconds until `deadline` (0 once past), None when unbounded."""
    return None if deadline == _UNBOUNDED else max(0.0, deadline - time.monotonic())


def _text(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__  # libpq's messages span lines


def utc_now() -> str:
    """A sortable UTC timestamp with milliseconds, as stored in the index
    (2026-12-01T20:41:24.123Z). Formatted by hand, the seconds once a second:
    it is taken for every instance."""
    milliseconds = time.time_ns() // 1_000_000
    seconds, fraction = divmod(milliseconds, 1000)
    global _formatted_second
    cached = _formatted_second  # one tuple, read and replaced whole: safe across threads
    if cached[0] != seconds:
        cached = _formatted_second = (
            seconds,
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)),
        )
    return f"{cached[1]}.{fraction:03d}Z"


_formatted_second: tuple[int | None, str] = (None, "")


@dataclass(frozen=True)
class Provenance:
    """Who sent an instance, over which association."""

    calling_ae: str | None = None
    called_ae: str | None = None
    peer: str | None = None
    association_id: str | None = None

    def receipt(self, received_at: str) -> dict:
        """What a stored file records about its reception (see files.encode_file_header)."""
        return {
            "received_at": received_at,
            "calling_ae": self.calling_ae,
            "called_ae": self.called_ae,
            "peer": self.peer,
            "association_id": self.association_id,
        }

    @classmethod
    def from_receipt(cls, receipt: dict) -> "Provenance":
        return cls(**{f.name: receipt.get(f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class IndexEntry:
    """Everything the index records about one received instance."""

    header: "InstanceHeader"
    path: str
    size: int
    sha256: str
    transfer_syntax: str
    received_at: str
    provenance: Provenance


@dataclass(frozen=True)
class StoredDigest:
    """What the index knows of an instance already received, to compare a resend."""

    study_uid: str
    series_uid: str
    path: str
    size: int
    sha256: str


@dataclass
class IndexOutcome:
    """What indexing one instance changed, for the caller to log."""

    new_study: bool = False
    new_series: bool = False
    # (level, field, stored value, received value): later values that disagree
    # with the stored first one; the stored value is kept.
    disagreements: list[tuple[str, str, object, object]] = field(default_factory=list)


T = TypeVar("T")
_UNBOUNDED = float("inf")
# Between two attempts to reconnect to a PostgreSQL that is not there (yet).
_RECONNECT_PAUSE = 0.25
_ADMIN_CONNECT_TIMEOUT = 30.0  # without index_timeout
_BEHIND = "an earlier write of this process still waits for it"


@dataclass(eq=False)  # each is itself: found in the queue by identity
class _Ticket:
    """One thread's work in a group commit."""

    work: Callable[[], object]
    lock_key: str | None = None
    deadline: float = _UNBOUNDED  # time.monotonic() by which its thread has its answer
    taken: bool = False  # into a leader's batch
    # PostgreSQL: an all-or-nothing statement tried before `work`, in the round
    # trip that commits it, and what its row means; None: `work` alone.
    attempt: "_Attempt | None" = None
    written: bool = False  # by its attempt
    done: bool = False
    result: object = None
    error: BaseException | None = None

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class _Attempt:
    statement: tuple[str, tuple]
    outcome: Callable[[object], object]  # its row (one came back: it wrote) -> the result


class SeriesStudyMismatch(ValueError):
    """A Series Instance UID already indexed under another study."""


@dataclass(frozen=True)
class Patient:
    """Whom a study or an instance names as its patient: Patient ID and Issuer
    of Patient ID are who it is (None: empty or absent), the name is shown."""

    id: str | None
    issuer: str | None
    name: str | None

    @classmethod
    def of(cls, study: dict) -> "Patient":
        """From a study's fields (as indexed, or as an instance's header has them)."""
        return cls(
            study.get("patient_id"), study.get("issuer_of_patient_id"), study.get("patient_name")
        )

    def is_not(self, other: "Patient") -> bool:
        return (self.id, self.issuer) != (other.id, other.issuer)

    def __str__(self) -> str:
        return f"{_shown(self.id)} (issuer {_shown(self.issuer)}, name {_shown(self.name)})"


def _shown(value: str | None) -> str:
    return "(empty)" if value is None else value


class PatientConflict(ValueError):
    """An instance whose Patient ID or Issuer of Patient ID is not its study's
    indexed one: indexing it would put two patients under one study."""

    def __init__(self, study_uid: str, indexed: Patient, received: Patient):
        self.study_uid, self.indexed, self.received = study_uid, indexed, received
        super().__init__(
            f"Patient ID {received} differs from study {study_uid}'s {indexed}:"
            " two patients cannot share a study; correct the patient at the sender"
            " (or the study's, if it is the one that is wrong) and send again"
        )

    @property
    def comment(self) -> str:
        """Both IDs, first: what the sender is told (scp.dimse.fitted_comment)."""
        if self.indexed.id != self.received.id:
            name, indexed, received = "Patient ID", self.indexed.id, self.received.id
        else:
            name, indexed, received = (
                "Issuer of Patient ID",
                self.indexed.issuer,
                self.received.issuer,
            )
        return f"{name} {_shown(received)} differs from study's {_shown(indexed)}"


class Catalog:
    """The index database of one archive, as its writers use it."""

    def __init__(
        self, db: Database, location: IndexLocation | None = None, timeout: float | None = None
    ):
        self.conn = db
        self.location = location  # None: a scratch index (rebuild)
        # index_timeout: how long a write may wait for the index (None: as long
        # as it takes, for the admin commands).
        self.timeout = timeout
        self.health = IndexHealth()
        self._deadlines = Deadlines()
        self._monitor: IndexMonitor | None = None
        # Instances whose transaction's answer was lost with the connection and
        # that could not be read back in time: settled once it is back.
        self._unsettled: list[tuple[str, Callable[[StoredDigest | None], object]]] = []
        self._unsettled_lock = threading.Lock()
        db.prepare_writer()
        self._lock = threading.Lock()
        # In-process, hints are read on a connection of their own: WAL readers
        # do not wait for the writer, and the writer's lock is held through a
        # group's COMMIT and its WAL sync.
        self._hints: Database | None = None
        self._hints_lock = threading.Lock()
        self._group = threading.Condition()  # group commit: who leads, who waits
        self._queue: list[_Ticket] = []
        self._leading = False
        self._create_schema()

    @classmethod
    def open(cls, location: IndexLocation, timeout: float | None = None) -> "Catalog":
        return cls(location.open(create=True, timeout=timeout), location, timeout)

    def start_monitor(self) -> None:
        """Bound every write by `timeout`, and probe the index while it is
        unavailable (the listener's index; the admin commands wait instead)."""
        self._deadlines.start()
        self._monitor = IndexMonitor(self.health, self.probe)
        self._monitor.start()

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.stop()
        if self._hints is not None:
            self._hints.close()
        self.conn.close()

    # --- the index's availability -------------------------------------------------

    def _deadline(self) -> float:
        return _UNBOUNDED if self.timeout is None else time.monotonic() + self.timeout

    def _hold(self, deadline: float, *, write: bool = True) -> None:
        """The writer's connection, for this thread alone until `_release`, and
        until `deadline`: IndexTimedOut when the wait for it is longer,
        IndexUnavailable when a lost one cannot be replaced in time; the
        connection is cut at the deadline. `write`: with the writers' turn
        (SQLite's lock). Called for every group commit: no round trip here."""
        left = _left(deadline)
        if not self._lock.acquire(timeout=-1 if left is None else left):
            raise self._unavailable(self._no_answer(_BEHIND))
        try:
            self._deadlines.watch(self.conn, deadline)
            if self.conn.broken or self.conn.closed_by_server():
                self._reconnect(deadline)
            if write:
                self.conn.take_turn(_left(deadline))
        except BaseException as exc:
            self._release(write=False)
            if isinstance(exc, IndexTimedOut):
                raise self._unavailable(exc) from None
            raise

    def _release(self, *, write: bool = True) -> None:
        if write:
            self.conn.end_turn()
        self._deadlines.unwatch()  # before the connection may be closed: never cut it then
        self._lock.release()

    @contextmanager
    def _connection(self, deadline: float, *, write: bool = True) -> Iterator[Database]:
        """`_hold` … `_release` around a block."""
        self._hold(deadline, write=write)
        try:
            yield self.conn
        finally:
            self._release(write=write)

    def _reconnect(self, deadline: float) -> None:
        """A new connection for a lost one (with `_lock`), trying again until
        `deadline`; then what was left in doubt is settled."""
        reason = self.health.reason or "the connection to the index is lost"
        while True:
            left = _left(deadline)
            if left is not None and left < _RECONNECT_PAUSE:
                raise self._unavailable(IndexUnavailable(reason))
            try:
                self.conn.reopen(_ADMIN_CONNECT_TIMEOUT if left is None else left)
                break
            except (IndexUnreachable, *database_errors()) as exc:
                reason = _text(exc)
                if left is None:
                    raise IndexUnavailable(reason) from exc
            time.sleep(_RECONNECT_PAUSE)
        self._settle_unsettled()

    def _settle_unsettled(self) -> None:
        with self._unsettled_lock:
            waiting, self._unsettled = self._unsettled, []
        for position, (uid, settle) in enumerate(waiting):
            try:
                known = _stored_digest_on(self.conn, uid)
            except BaseException:
                with self._unsettled_lock:
                    self._unsettled[:0] = waiting[position:]
                raise
            settle(known)

    def settle_later(self, uid: str, settle: Callable[["StoredDigest | None"], object]) -> None:
        """`settle(what the index holds for uid)` once the index answers again:
        for an instance whose transaction may or may not have committed."""
        with self._unsettled_lock:
            self._unsettled.append((uid, settle))

    def read_back(self, uid: str, deadline: float) -> "StoredDigest | None":
        """What the index holds for `uid`, on a connection that replaced a lost
        one (the lost one's session ended first): whether a transaction whose
        answer was lost committed. IndexUnavailable/IndexTimedOut past `deadline`."""
        with self._connection(deadline, write=False) as conn:
            return _stored_digest_on(conn, uid)

    def probe(self) -> None:
        """One empty write transaction (reconnecting first if need be); the index
        is available again when it succeeds."""
        with self._connection(self._deadline()) as conn:
            self._settle_unsettled()
            conn.begin()
            conn.first_rows([("SELECT 1", ())])
            conn.execute("ROLLBACK")
        self._available()

    def _available(self) -> None:
        if not self.health.available and not self._unsettled:
            self.health.came_back()

    def _note_damage(self, exc: BaseException) -> None:
        """When `exc` says the SQLite file is damaged: the node is out until an
        admin rebuilds it."""
        damage = self.conn.corruption(exc)
        if damage is not None:
            self.health.damaged(str(damage))

    def _unavailable(self, exc: Exception) -> Exception:
        self.health.went(_text(exc))
        return exc

    def _no_answer(self, why: str) -> IndexTimedOut:
        bound = self.timeout if self.timeout is not None else self.conn.timeout  # SQLite's busy
        return IndexTimedOut(bound, why)

    def _lost(self, exc: BaseException, deadline: float) -> Exception:
        """The error for the tickets of a transaction whose connection was lost."""
        if self._deadlines.cut or _left(deadline) == 0:  # cut at its deadline
            timed_out = self._no_answer("connection cut")
            lost = IndexInterrupted(str(timed_out), deadline, timed_out.comment)
        else:
            lost = IndexInterrupted(f"connection to the index lost: {_text(exc)}", deadline)
        return self._unavailable(lost)

    def _create_schema(self) -> None:
        db = self.conn
        with self._lock, db.writers_turn():
            db.begin()
            try:
                db.lock_schema()
                found = db.schema_version()
                if found > SCHEMA_VERSION:
                    raise SchemaTooNew(
                        f"the index has schema version {found}, written by a newer imaging-scp;"
                        f" this one knows version {SCHEMA_VERSION}: run the newer imaging-scp"
                    )
                for name, (columns, pk) in TABLES.items():
                    db.ensure_table(name, columns, pk)
                for table, columns in INDEXES:
                    db.ensure_index(table, columns)
                if found < 3:
                    _fold_indexed_names(db)
                if found != SCHEMA_VERSION:
                    db.set_schema_version(SCHEMA_VERSION)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    @contextmanager
    def writing(self, lock_keys: Iterable[str] = ()) -> Iterator["Catalog"]:
        """One write transaction, exclusive within this process.

        Commits on normal exit (durably: synchronous=FULL on SQLite,
        synchronous_commit=on on PostgreSQL), rolls back on error. `lock_keys`:
        the studies it changes, locked first as ingest locks them
        (`Database.lock_keys`); a change that learns them by reading calls
        `lock_studies` once, before its first write.
        """
        with self._connection(self._deadline()):
            self.conn.begin()
            self.conn.lock_keys(list(lock_keys))
            try:
                yield self
                self.conn.execute("COMMIT")
            except BaseException as exc:
                # Also after a failed COMMIT (SQLITE_FULL, I/O error): the shared
                # connection must not stay inside a transaction.
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                if self.conn.broken:  # the probe reconnects
                    self._unavailable(exc)
                raise
        self._available()

    def commit_together(self, work: Callable[[], T], *, lock_key: str | None = None) -> T:
        """Run `work` in a write transaction shared with what other threads of this
        process bring at the same moment (group commit): one COMMIT, and so one
        WAL sync, for all of them. Returns, or raises, only after that COMMIT.

        Each work runs in its own savepoint: one that raises is rolled back alone
        and its exception raised in its own thread; a failed COMMIT fails all.
        `lock_key` (the study UID) is what the work changes: on PostgreSQL, other
        nodes' transactions on the same key wait for this one. A transaction that
        meets a deadlock or another node's concurrent insert is run again, whole,
        so a work must be safe to run again after a rollback.
        """
        return self._commit_ticket(_Ticket(work, lock_key))

    def index_new_instance(
        self, entry: IndexEntry, otherwise: Callable[[], T]
    ) -> "IndexOutcome | T":
        """Index `entry`, most likely a new instance of an indexed series, in a
        group commit (as `commit_together`); when it is not — a resend, its
        series' first instance, a series of another study, a series learning its
        modality — run the work `otherwise` instead, and return what it returns.

        On PostgreSQL the likely case is one statement that takes the study's
        lock and writes everything or nothing (`_NEW_IN_KNOWN_SERIES`): alone, a
        transaction of its own, committed before its row comes back; with other
        threads' in one group, inside their BEGIN … COMMIT. One round trip either
        way. In-process (SQLite) a round trip costs nothing, and `otherwise` does
        it all.
        """
        lock_key = entry.header.study_uid
        if not self.conn.remote:
            return self.commit_together(otherwise, lock_key=lock_key)
        attempt = _Attempt(_new_in_known_series(entry), lambda row: _outcome_of(entry, row))
        return self._commit_ticket(_Ticket(otherwise, lock_key, attempt))

    def _commit_ticket(self, ticket: "_Ticket"):
        ticket.deadline = self._deadline()
        with self._group:
            self._queue.append(ticket)
            while self._leading and not ticket.done:
                left = None if ticket.taken else _left(ticket.deadline)
                if left == 0:  # the leader is stuck: nothing of this one was sent
                    self._queue.remove(ticket)
                    raise self._unavailable(self._no_answer(_BEHIND))
                self._group.wait(left)  # a taken one: its leader answers it by its deadline
            if ticket.done:  # another thread's transaction carried it
                return ticket.outcome()
            self._leading = True
            batch, self._queue = self._queue, []
            for queued in batch:
                queued.taken = True
        try:
            self._commit_batch(batch, batch[0].deadline)  # the first come is the first due
        finally:
            with self._group:
                self._leading = False
                self._group.notify_all()
        return ticket.outcome()

    def _commit_batch(self, batch: list["_Ticket"], deadline: float) -> None:
        try:
            self._hold(deadline)
        except (IndexTimedOut, IndexUnavailable) as exc:  # nothing was sent
            for ticket in batch:
                ticket.error, ticket.done = exc, True
            return
        try:
            rest = batch
            attempts = [ticket for ticket in batch if ticket.attempt is not None]
            if attempts and self._retried(attempts, self._run_attempts, deadline):
                rest = [ticket for ticket in batch if not ticket.written]
            if self.conn.broken:  # the attempts' answers were lost
                for ticket in rest:  # those without an attempt were not sent
                    ticket.error = ticket.error or IndexUnavailable(self.health.reason)
                return
            # After failed attempts, every work: alone in its savepoint, a
            # ticket that cannot be indexed fails alone.
            for ticket in rest:
                ticket.result = ticket.error = None
            if rest:
                self._retried(rest, self._run_batch, deadline)
            for ticket in batch:
                if ticket.error is not None:
                    self._note_damage(ticket.error)
            # It answered (a refusal of one instance is no outage), unless
            # SQLite's write lock stayed taken.
            if (
                not self.health.available
                and not self.conn.broken
                and not any(isinstance(ticket.error, IndexTimedOut) for ticket in batch)
            ):
                self._available()
        finally:
            self._release()
            for ticket in batch:
                ticket.done = True

    def _retried(
        self, batch: list["_Ticket"], run: Callable[[list["_Ticket"]], None], deadline: float
    ) -> bool:
        """`run(batch)` until it commits, again after a rollback for a deadlock
        or another node's concurrent insert; False when it could not (each
        ticket then holds an error: IndexInterrupted when the connection was
        lost, IndexTimedOut when SQLite's write lock stayed taken)."""
        conn = self.conn
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            try:
                run(batch)
                return True
            except BaseException as exc:
                if conn.broken:
                    lost = self._lost(exc, deadline)
                    for ticket in batch:
                        ticket.error = lost
                    return False
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if is_locked(exc):
                    where = self.location.describe() if self.location else "the index"
                    exc = self._unavailable(
                        self._no_answer(f"another process holds the write lock of {where}")
                    )
                if not is_retryable(exc) or attempt == COMMIT_ATTEMPTS:
                    for ticket in batch:
                        ticket.error = ticket.error or exc
                    return False
            for ticket in batch:
                ticket.result = ticket.error = None
            time.sleep(min(0.5, 0.005 * 2**attempt) * random.uniform(0.5, 1.5))
        return False

    def _run_attempts(self, batch: list["_Ticket"]) -> None:
        """Every ticket's all-or-nothing statement in one round trip; a ticket
        whose statement wrote is done, the others are left to their work.

        A lone statement goes without BEGIN and COMMIT: in autocommit mode it is
        its own transaction, durable when its result arrives (synchronous_commit
        on), and it takes its study's lock itself. Several go inside one
        transaction, all their locks taken first, in order."""
        conn = self.conn
        statements = [ticket.attempt.statement for ticket in batch]
        if len(batch) == 1:
            rows = conn.first_rows(statements)
        else:
            conn.begin()
            conn.lock_keys([ticket.lock_key for ticket in batch if ticket.lock_key])
            rows = conn.first_rows([*statements, ("COMMIT", ())])
        for ticket, row in zip(batch, rows, strict=False):
            if row is not None:
                ticket.result, ticket.written = ticket.attempt.outcome(row), True

    def _run_batch(self, batch: list["_Ticket"]) -> None:
        conn = self.conn
        conn.begin()
        conn.lock_keys([ticket.lock_key for ticket in batch if ticket.lock_key])
        if len(batch) == 1:  # alone: its failure rolls back the whole transaction
            batch[0].result = batch[0].work()
        else:
            for ticket in batch:
                conn.execute("SAVEPOINT instance")
                try:
                    ticket.result = ticket.work()
                except BaseException as exc:
                    if is_retryable(exc):  # the whole transaction runs again
                        raise
                    ticket.error = exc
                    conn.execute("ROLLBACK TO instance")
                conn.execute("RELEASE instance")
        conn.execute("COMMIT")

    def lock_studies(self, series_uids: Iterable[str]) -> None:
        """Inside `writing()`, before its first write: lock the studies of these series."""
        rows = self.conn.rows_in(
            "SELECT DISTINCT study_uid FROM series WHERE series_uid IN (?)", list(series_uids)
        )
        self.conn.lock_keys([row[0] for row in rows])

    def stored_digest(self, sop_instance_uid: str) -> StoredDigest | None:
        """The indexed copy of an instance, or None. Call inside `writing()` to
        act on the answer; outside, it is only a hint."""
        return _stored_digest_on(self.conn, sop_instance_uid)

    def digest_hint(self, sop_instance_uid: str) -> StoredDigest | None:
        """`stored_digest` outside a transaction, of what is committed: lets an
        identical resend be answered without writing anything. Decisions are
        re-checked in `writing()`. It does not wait for a commit in progress."""
        if self.conn.remote:
            with self._connection(self._deadline(), write=False):
                return self.stored_digest(sop_instance_uid)
        with self._hints_lock:
            if self._hints is None:
                self._hints = self.conn.another()
            try:
                return _stored_digest_on(self._hints, sop_instance_uid)
            except database_errors() as exc:
                self._note_damage(exc)
                raise

    def check_series_study(self, series_uid: str, study_uid: str) -> None:
        """Raise SeriesStudyMismatch if the series is indexed under another study."""
        row = self.conn.execute(
            "SELECT study_uid FROM series WHERE series_uid = ?", (series_uid,)
        ).fetchone()
        if row and row[0] != study_uid:
            raise SeriesStudyMismatch(f"series {series_uid} already belongs to study {row[0]}")

    def check_patient(self, entry: IndexEntry) -> None:
        """Raise PatientConflict if the instance's study is indexed with another
        Patient ID or Issuer of Patient ID."""
        study = entry.header.study
        row = self.conn.execute(
            "SELECT patient_id, issuer_of_patient_id, patient_name FROM studies"
            " WHERE study_uid = ?",
            (entry.header.study_uid,),
        ).fetchone()
        if row is not None and Patient.of(study).is_not(indexed := Patient(*row)):
            raise PatientConflict(entry.header.study_uid, indexed, Patient.of(study))

    def index_instance(self, entry: IndexEntry) -> IndexOutcome:
        """Add a new instance and update its series and study. Call inside `writing()`.
        SeriesStudyMismatch or PatientConflict, with nothing written, when its
        series is indexed under another study or its study names another patient."""
        self.check_patient(entry)
        outcome = IndexOutcome()
        new_modality = self._count_in_series(entry, outcome)
        self.conn.execute(_INSERT_INSTANCE, _instance_values(entry))
        self._count_in_study(entry, new_modality, outcome)
        return outcome

    def index_if_new(self, entry: IndexEntry) -> "StoredDigest | IndexOutcome":
        """`index_instance` when the SOP Instance UID has no row, else its
        `stored_digest`. Call inside `writing()`, or a group commit's work.

        The instance row goes in first, so that one statement is both the lookup
        and the insert of a new instance: the writer's section is what parallel
        senders queue for. SeriesStudyMismatch and PatientConflict are raised
        after that row went in, for the rollback of the caller's transaction or
        savepoint to take back.
        """
        if self.conn.execute(_INSERT_IF_NEW, _instance_values(entry)).rowcount == 0:
            return self.stored_digest(entry.header.sop_instance_uid)
        outcome = IndexOutcome()
        new_modality = self._count_in_series(entry, outcome)
        self._count_in_study(entry, new_modality, outcome)
        return outcome

    def replace_instance(self, entry: IndexEntry) -> None:
        """Record a new copy of an indexed instance in the same series (policy
        overwrite): counts stay, byte totals follow the new size."""
        header = entry.header
        old_size = self.conn.execute(
            "SELECT size FROM instances WHERE sop_instance_uid = ?", (header.sop_instance_uid,)
        ).fetchone()[0]
        # Every column but the key; series, study and path are the indexed copy's.
        self.conn.execute(
            f"UPDATE instances SET {', '.join(f'{c} = ?' for c in _INSTANCE_COLUMNS[1:])}"
            " WHERE sop_instance_uid = ?",
            (*_instance_values(entry)[1:], header.sop_instance_uid),
        )
        delta = entry.size - old_size
        self.conn.execute(
            f"UPDATE series SET bytes = bytes + ?, {_REPLACED} WHERE series_uid = ?",
            (delta, entry.received_at, header.series_uid),
        )
        self.conn.execute(
            "UPDATE studies SET bytes = bytes + ?, last_received = ? WHERE study_uid = ?",
            (delta, entry.received_at, header.study_uid),
        )

    def record_refusal(self, entry: IndexEntry, reason: str) -> None:
        """Remember an instance refused for what it conflicts with (nothing of
        it is kept): listed with the resends' conflicts."""
        header = entry.header
        self._insert(
            "conflicts",
            {
                **_conflict_values(entry, "refused"),
                "study_uid": header.study_uid,
                "series_uid": header.series_uid,
                "reason": reason,
            },
        )

    def record_conflict(self, entry: IndexEntry, action: str) -> None:
        """Remember a resend whose bytes differ from the indexed copy, and what was done."""
        self._insert("conflicts", {**_conflict_values(entry, action), "path": entry.path})

    def _insert(self, table: str, row: dict) -> None:
        self.conn.execute(
            f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
            tuple(row.values()),
        )

    def _count_in_series(self, entry: IndexEntry, outcome: IndexOutcome) -> str | None:
        """Create or update the instance's series; SeriesStudyMismatch (nothing
        written) when the series is indexed under another study.

        Returns the series modality when the study has not seen it through this
        series before (a new series, or one that only now learnt its modality).
        """
        header = entry.header
        row = self.conn.execute(*_series_count(entry)).fetchone()
        if row is not None:
            return self._series_counted(entry, row, outcome)
        self.check_series_study(header.series_uid, header.study_uid)
        outcome.new_series = True
        values = {name: header.series.get(name) for name in SERIES_FIELDS}
        self._insert(
            "series",
            {
                "series_uid": header.series_uid,
                "study_uid": header.study_uid,
                **values,
                "number_of_instances": 1,
                "bytes": entry.size,
                "availability": ONLINE,
                "first_received": entry.received_at,
                "last_received": entry.received_at,
            },
        )
        return values["modality"]

    def _series_counted(self, entry: IndexEntry, row, outcome: IndexOutcome) -> str | None:
        """After the series' count went up: fill in what it lacked (first value wins)."""
        stored = dict(zip(SERIES_FIELDS, row, strict=True))
        updates = _first_values_win("series", stored, entry.header.series, outcome)
        if updates:
            self._fill_in("series", "series_uid", entry.header.series_uid, updates)
        return updates.get("modality")

    def _count_in_study(
        self, entry: IndexEntry, new_modality: str | None, outcome: IndexOutcome
    ) -> None:
        header = entry.header
        row = self.conn.execute(*_study_count(entry, outcome.new_series)).fetchone()
        if row is not None:
            self._study_counted(entry, new_modality, row, outcome)
            return
        outcome.new_study = True
        study = _study_values(header)
        self._insert(
            "studies",
            {
                "study_uid": header.study_uid,
                **{name: study.get(name) for name in STUDY_FIELDS},
                "modalities": json.dumps([new_modality] if new_modality else []),
                "number_of_series": 1,
                "number_of_instances": 1,
                "bytes": entry.size,
                "availability": ONLINE,
                "first_received": entry.received_at,
                "last_received": entry.received_at,
            },
        )

    def _study_counted(
        self, entry: IndexEntry, new_modality: str | None, row, outcome: IndexOutcome
    ) -> None:
        """After the study's count went up: PatientConflict when the instance
        names another patient (the caller's rollback takes the count back);
        else fill in what the study lacked (first value wins)."""
        stored = dict(zip(STUDY_FIELDS, row[1:], strict=True))
        indexed, received = Patient.of(stored), Patient.of(entry.header.study)
        if received.is_not(indexed):
            raise PatientConflict(entry.header.study_uid, indexed, received)
        updates = _first_values_win("study", stored, _study_values(entry.header), outcome)
        modalities = json.loads(row[0] or "[]")
        if new_modality and new_modality not in modalities:
            updates["modalities"] = json.dumps([*modalities, new_modality])
        if updates:
            self._fill_in("studies", "study_uid", entry.header.study_uid, updates)

    def _fill_in(self, table: str, key: str, uid: str, values: dict) -> None:
        assignments = ", ".join(f"{name} = ?" for name in values)
        self.conn.execute(
            f"UPDATE {table} SET {assignments} WHERE {key} = ?", (*values.values(), uid)
        )


_STORED_DIGEST = (
    "SELECT study_uid, series_uid, path, size, sha256 FROM instances WHERE sop_instance_uid = ?"
)


def _conflict_values(entry: IndexEntry, action: str) -> dict:
    """A conflicts row's columns that every action records."""
    source = entry.provenance
    return {
        "sop_instance_uid": entry.header.sop_instance_uid,
        "action": action,
        "size": entry.size,
        "sha256": entry.sha256,
        "received_at": entry.received_at,
        "calling_ae": source.calling_ae,
        "peer": source.peer,
        "association_id": source.association_id,
    }


def _stored_digest_on(db: Database, sop_instance_uid: str) -> StoredDigest | None:
    row = db.execute(_STORED_DIGEST, (sop_instance_uid,)).fetchone()
    return StoredDigest(*row) if row else None


# The columns of `_instance_values`, in its order: the table's.
_INSTANCE_COLUMNS = tuple(TABLES["instances"][0])
_INSERT_INSTANCE = (
    f"INSERT INTO instances ({', '.join(_INSTANCE_COLUMNS)})"
    f" VALUES ({', '.join('?' * len(_INSTANCE_COLUMNS))})"
)


_INSERT_IF_NEW = f"{_INSERT_INSTANCE} ON CONFLICT (sop_instance_uid) DO NOTHING"


def _instance_values(entry: IndexEntry) -> tuple:
    header, source = entry.header, entry.provenance
    return (
        header.sop_instance_uid,
        header.series_uid,
        header.study_uid,
        header.sop_class_uid,
        header.instance.get("number"),
        header.instance.get("title"),
        header.instance.get("number_of_frames"),
        entry.transfer_syntax,
        entry.path,
        entry.size,
        entry.sha256,
        entry.received_at,
        source.calling_ae,
        source.called_ae,
        source.peer,
        source.association_id,
    )


# What an instance's arrival and a copy's replacement write of the series'
# lifecycle (storage.catalog.lifecycle): the received_at is their value.
_ARRIVED = TRANSITIONS[Event.INSTANCE_ARRIVED].sets
_REPLACED = TRANSITIONS[Event.COPY_REPLACED].sets


_SERIES_COUNT = (
    "UPDATE series SET number_of_instances = number_of_instances + 1, bytes = bytes + ?,"
    f" {_ARRIVED} WHERE series_uid = ? AND study_uid = ?"
    f" RETURNING {', '.join(SERIES_FIELDS)}"
)


def _series_count(entry: IndexEntry) -> tuple[str, tuple]:
    """The series' count goes up, its stored values come back (no row: a new
    series, or one of another study)."""
    return _SERIES_COUNT, (
        entry.size,
        entry.received_at,
        entry.header.series_uid,
        entry.header.study_uid,
    )


def _study_count(entry: IndexEntry, new_series: bool) -> tuple[str, tuple]:
    return (
        "UPDATE studies SET number_of_instances = number_of_instances + 1,"
        " number_of_series = number_of_series + ?, bytes = bytes + ?, last_received = ?"
        f" WHERE study_uid = ? RETURNING modalities, {', '.join(STUDY_FIELDS)}",
        (int(new_series), entry.size, entry.received_at, entry.header.study_uid),
    )


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
    f" bytes = bytes + ?, {_ARRIVED}, {', '.join(_SERIES_FILL)} FROM v"
    f" WHERE {POSTGRES_KEY_LOCK}"
    " AND series_uid = ? AND study_uid = ? AND (modality IS NOT NULL OR ?::text IS NULL)"
    " AND NOT EXISTS (SELECT 1 FROM instances WHERE sop_instance_uid = ?)"
    " AND EXISTS (SELECT 1 FROM studies WHERE study_uid = ?"
    " AND patient_id IS NOT DISTINCT FROM ?::text"
    " AND issuer_of_patient_id IS NOT DISTINCT FROM ?::text)"
    f" RETURNING {', '.join(f'series.{name}' for name in SERIES_FIELDS)}),"
    f" i AS (INSERT INTO instances ({', '.join(_INSTANCE_COLUMNS)})"
    f" SELECT {', '.join('?' * len(_INSTANCE_COLUMNS))} WHERE EXISTS (SELECT 1 FROM s)),"
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
        *_received_arrays(_STUDY_GROUPS, _study_values(header)),
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
        *_instance_values(entry),
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
    _first_values_win("series", series, entry.header.series, outcome)
    # The folded names need no comparing: they are never reported.
    _first_values_win("study", study, entry.header.study, outcome)
    return outcome


def _study_values(header: "InstanceHeader") -> dict:
    """The study's fields as an instance gives them: as read, and its names folded."""
    values = dict(header.study)
    for folded, name in FOLDED_NAMES.items():
        values[folded] = fold_name(values.get(name))
    return values


def _fold_indexed_names(db: Database) -> None:
    """Schema version 3: fold the names of the studies indexed before it."""
    names = ", ".join(FOLDED_NAMES.values())
    rows = db.execute(
        f"SELECT study_uid, {names} FROM studies WHERE"
        f" {' OR '.join(f'{name} IS NOT NULL' for name in FOLDED_NAMES.values())}"
    ).fetchall()
    assignments = ", ".join(f"{folded} = ?" for folded in FOLDED_NAMES)
    db.executemany(
        f"UPDATE studies SET {assignments} WHERE study_uid = ?",
        [(*(fold_name(value) for value in row[1:]), row[0]) for row in rows],
    )


def _first_values_win(level: str, stored: dict, received: dict, outcome: IndexOutcome) -> dict:
    """The fields to fill in: received values where nothing is stored yet.

    A received value that disagrees with a stored one is noted in `outcome` and
    otherwise ignored; a missing received value never erases a stored one.
    """
    updates = {}
    for name, value in received.items():
        if value is None or name not in stored:
            continue
        current = stored[name]
        if current is None:
            updates[name] = value
        elif current != value and name not in FOLDED_NAMES:
            outcome.disagreements.append((level, name, current, value))
    return updates


def replace_rows(
    source: Database,
    target: Database,
    tables: list[str],
    progress: Callable[[int], None] = lambda _: None,
) -> dict[str, int]:
    """Make `tables` of `target` hold exactly the rows of `source` (inside the
    caller's transaction on `target`); returns the rows copied per table.
    `progress(n)` after each n instance rows."""
    copied = {}
    for table in tables:
        columns, pk = TABLES[table]
        names = list(columns)
        target.execute(f"DELETE FROM {table}")
        rows = source.execute(f"SELECT {', '.join(names)} FROM {table}")
        if table == "instances":
            rows = _counted(rows, progress)
        copied[table] = target.insert_rows(table, names, rows)
        if pk == "id":
            target.reset_identity(table, "id")
    return copied


def _counted(rows, progress: Callable[[int], None], every: int = 1000):
    number = 0
    for number, row in enumerate(rows, 1):
        yield row
        if number % every == 0:
            progress(every)
    progress(number % every)  # the last, partial batch
