"""The catalog's writer: one write connection per process, and what bounds,
groups and retries the transactions on it.

Writes go through one connection guarded by one lock per process
(`Writer.writing`); across processes SQLite's writers take turns in the kernel
(`Database.writers_turn`) before they take its write lock, and on PostgreSQL a
lock per study (`Database.lock_keys`) serialises the nodes'
transactions on the same study while other studies' go on at once.
Live ingest commits in groups (`Writer.commit_together`): the instances that
reach the index at the same moment share one transaction and one WAL sync.

The listener's writes are bounded by index_timeout (`Writer.start_monitor`,
storage.catalog.health): a write still waiting at its deadline has its connection cut,
a lost connection is replaced on the next write or by the probe, and what a
transaction cut short may have committed is read back before its sender is
answered.
"""

import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from storage.catalog.engines import (
    Database,
    IndexLocation,
    IndexTimedOut,
    IndexUnreachable,
    database_errors,
    is_locked,
    is_retryable,
)
from storage.catalog.health import (
    Deadlines,
    IndexHealth,
    IndexInterrupted,
    IndexMonitor,
    IndexUnavailable,
)
from storage.catalog.ingest import StoredDigest, stored_digest_on

# How often a group's transaction is run again after a PostgreSQL deadlock or
# serialization failure, before its senders get a failure status.
COMMIT_ATTEMPTS = 8


def _left(deadline: float) -> float | None:
    """Seconds until `deadline` (0 once past), None when unbounded."""
    return None if deadline == _UNBOUNDED else max(0.0, deadline - time.monotonic())


def _text(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__  # libpq's messages span lines


T = TypeVar("T")
_UNBOUNDED = float("inf")
# Between two attempts to reconnect to a PostgreSQL that is not there (yet).
_RECONNECT_PAUSE = 0.25
_ADMIN_CONNECT_TIMEOUT = 30.0  # without index_timeout
_BEHIND = "an earlier write of this process still waits for it"


@dataclass(eq=False)  # each is itself: found in the queue by identity
class Ticket:
    """One thread's work in a group commit."""

    work: Callable[[], object]
    lock_key: str | None = None
    deadline: float = _UNBOUNDED  # time.monotonic() by which its thread has its answer
    taken: bool = False  # into a leader's batch
    # PostgreSQL: an all-or-nothing statement tried before `work`, in the round
    # trip that commits it, and what its row means; None: `work` alone.
    attempt: "Attempt | None" = None
    written: bool = False  # by its attempt
    done: bool = False
    result: object = None
    error: BaseException | None = None

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class Attempt:
    statement: tuple[str, tuple]
    outcome: Callable[[object], object]  # its row (one came back: it wrote) -> the result


class Writer:
    """The write connection of one catalog, shared by the threads of its process."""

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
        self._group = threading.Condition()  # group commit: who leads, who waits
        self._queue: list[Ticket] = []
        self._leading = False

    def start_monitor(self) -> None:
        """Bound every write by `timeout`, and probe the index while it is
        unavailable (the listener's index; the admin commands wait instead)."""
        self._deadlines.start()
        self._monitor = IndexMonitor(self.health, self.probe)
        self._monitor.start()

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.stop()
        self.conn.close()

    @contextmanager
    def alone(self) -> Iterator[Database]:
        """The connection, with this process's lock and the writers' turn, and no
        deadline: for what a catalog does once, when it opens the index."""
        with self._lock, self.conn.writers_turn():
            yield self.conn

    # --- the index's availability -------------------------------------------------

    def deadline(self) -> float:
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
    def connection(self, deadline: float, *, write: bool = True) -> Iterator[Database]:
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
                known = stored_digest_on(self.conn, uid)
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
        with self.connection(deadline, write=False) as conn:
            return stored_digest_on(conn, uid)

    def probe(self) -> None:
        """One empty write transaction (reconnecting first if need be); the index
        is available again when it succeeds."""
        with self.connection(self.deadline()) as conn:
            self._settle_unsettled()
            conn.begin()
            conn.first_rows([("SELECT 1", ())])
            conn.execute("ROLLBACK")
        self._available()

    def _available(self) -> None:
        if not self.health.available and not self._unsettled:
            self.health.came_back()

    def note_damage(self, exc: BaseException) -> None:
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

    @contextmanager
    def writing(self, lock_keys: Iterable[str] = ()) -> Iterator[None]:
        """One write transaction, exclusive within this process.

        Commits on normal exit (durably: synchronous=FULL on SQLite,
        synchronous_commit=on on PostgreSQL), rolls back on error. `lock_keys`:
        the studies it changes, locked first as ingest locks them
        (`Database.lock_keys`); a change that learns them by reading calls
        `Catalog.lock_studies` once, before its first write.
        """
        with self.connection(self.deadline()):
            self.conn.begin()
            self.conn.lock_keys(list(lock_keys))
            try:
                yield
                self.conn.commit()
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
        return self.commit_ticket(Ticket(work, lock_key))

    def commit_ticket(self, ticket: "Ticket"):
        ticket.deadline = self.deadline()
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

    def _commit_batch(self, batch: list["Ticket"], deadline: float) -> None:
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
                    self.note_damage(ticket.error)
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
        self, batch: list["Ticket"], run: Callable[[list["Ticket"]], None], deadline: float
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

    def _run_attempts(self, batch: list["Ticket"]) -> None:
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

    def _run_batch(self, batch: list["Ticket"]) -> None:
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
        conn.commit()
