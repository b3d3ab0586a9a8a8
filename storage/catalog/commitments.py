"""Storage commitment requests in the index: what a requester asked us to
keep, what the check found, and the delivery of its report.

A request (a transaction UID and the instances it references) is recorded
before it is acknowledged. Its check (storage.commitment) decides, once and
for good, which instances are committed; the result, kept per instance in
`commitment_items`, is what every delivery of the report sends, so a report
sent twice says the same. Recording it also writes what it says of each
series' completeness (`storage.catalog.lifecycle`).

Delivery state (`commitments.delivery_state`): ``checking`` (recorded, not yet
checked), ``pending`` (checked, report not yet acknowledged; retried at
`next_attempt_at`), ``delivering`` (a reporter took it, until `next_attempt_at`:
the nodes sharing an index deliver each report once), ``delivered``, ``failed``
(given up, or nowhere to send it).
"""

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from storage.catalog import lifecycle
from storage.catalog.engines import Database, IndexUnreachable, moment_of, stored_moment, utc_now
from storage.catalog.index import Catalog
from storage.catalog.lifecycle import Event

CHECKING, PENDING, DELIVERING = "checking", "pending", "delivering"
DELIVERED, FAILED = "delivered", "failed"

# Failure Reason (0008,1197) values, PS3.4 J.3.3.1.1
PROCESSING_FAILURE = 0x0110  # the file is missing or its bytes changed
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
SOP_CLASS_NOT_SUPPORTED = 0x0122

_FAILURE_NAMES = {
    PROCESSING_FAILURE: "damaged",
    NO_SUCH_OBJECT_INSTANCE: "missing",
    CLASS_INSTANCE_CONFLICT: "class conflict",
    SOP_CLASS_NOT_SUPPORTED: "class not supported",
}


def failures_by_name(reasons: Iterable[int]) -> dict[str, int]:
    """How many failures of each kind, by name ("missing": 3), in order of appearance."""
    counts: dict[str, int] = {}
    for reason in reasons:
        name = _FAILURE_NAMES.get(reason, f"0x{reason:04X}")
        counts[name] = counts.get(name, 0) + 1
    return counts


class Recorded(enum.Enum):
    NEW = "new"
    REPEATED = "repeated"  # the same transaction UID with the same references
    CONFLICTING = "conflicting"  # the same transaction UID with other references


@dataclass(frozen=True)
class Reference:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class CommitmentRequest:
    transaction_uid: str
    references: list[Reference]
    requester_ae: str | None
    requester_peer: str | None
    association_id: str | None


@dataclass(frozen=True)
class Failure:
    reference: Reference
    reason: int


@dataclass
class CommitmentResult:
    """What the report of one transaction says."""

    transaction_uid: str
    requester_ae: str | None
    committed: list[Reference] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)

    @property
    def all_committed(self) -> bool:
        return not self.failed

    def failures_by_reason(self) -> dict[str, int]:
        return failures_by_name(failure.reason for failure in self.failed)


@dataclass(frozen=True)
class IndexedCopy:
    """The indexed copy of a referenced instance, as its check needs it."""

    sop_class_uid: str
    path: str
    sha256: str
    study_uid: str
    series_uid: str


# (position, failure reason or None, study UID, series UID) of one reference
Outcome = tuple[int, int | None, str | None, str | None]


def record_request(catalog: Catalog, request: CommitmentRequest, *, hold: float = 0.0) -> Recorded:
    """Record a request durably (the commit is synchronous=FULL), or tell a
    repeat of a recorded one apart from a different request under its UID.
    `hold`: seconds during which the caller has it to check and report."""
    conn = catalog.conn
    with catalog.writing():
        existing = conn.execute(
            "SELECT sop_class_uid, sop_instance_uid FROM commitment_items"
            " WHERE transaction_uid = ? ORDER BY position",
            (request.transaction_uid,),
        ).fetchall()
        if existing or _is_recorded(conn, request.transaction_uid):
            same = [tuple(row) for row in existing] == [
                (r.sop_class_uid, r.sop_instance_uid) for r in request.references
            ]
            return Recorded.REPEATED if same else Recorded.CONFLICTING
        conn.execute(
            "INSERT INTO commitments (transaction_uid, requester_ae, requester_peer,"
            " association_id, requested_at, instances, delivery_state, attempts, next_attempt_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)",
            (
                request.transaction_uid,
                request.requester_ae,
                request.requester_peer,
                request.association_id,
                utc_now(),
                len(request.references),
                CHECKING,
                _moment(hold),
            ),
        )
        conn.executemany(
            "INSERT INTO commitment_items (transaction_uid, position, sop_class_uid,"
            " sop_instance_uid) VALUES (?, ?, ?, ?)",
            [
                (request.transaction_uid, position, r.sop_class_uid, r.sop_instance_uid)
                for position, r in enumerate(request.references)
            ],
        )
    return Recorded.NEW


def _is_recorded(conn: Database, transaction_uid: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM commitments WHERE transaction_uid = ?", (transaction_uid,)
        ).fetchone()
        is not None
    )


def referenced_copies(
    catalog: Catalog, transaction_uid: str
) -> list[tuple[int, Reference, IndexedCopy | None]] | None:
    """What a recorded request's check looks at: each reference (by position)
    with the indexed copy of its instance (None: not indexed). Only the
    indexed copy counts: one kept aside under conflicts/ is not what the index
    serves. None when the request is checked already: its result stands
    (`load_result`)."""
    reader = catalog.location.open_reader()
    try:
        if _checked(reader, transaction_uid):
            return None
        items = reader.execute(
            "SELECT position, sop_class_uid, sop_instance_uid FROM commitment_items"
            " WHERE transaction_uid = ? ORDER BY position",
            (transaction_uid,),
        ).fetchall()
        return [
            (position, Reference(cls, uid), _indexed_copy(reader, uid))
            for position, cls, uid in items
        ]
    finally:
        reader.close()


def _checked(conn: Database, transaction_uid: str) -> bool:
    row = conn.execute(
        "SELECT checked_at FROM commitments WHERE transaction_uid = ?", (transaction_uid,)
    ).fetchone()
    return row is not None and row[0] is not None


def _indexed_copy(conn: Database, sop_instance_uid: str) -> IndexedCopy | None:
    row = conn.execute(
        "SELECT sop_class_uid, path, sha256, study_uid, series_uid FROM instances"
        " WHERE sop_instance_uid = ?",
        (sop_instance_uid,),
    ).fetchone()
    return IndexedCopy(*row) if row else None


def record_result(
    catalog: Catalog,
    transaction_uid: str,
    outcomes: list[Outcome],
    completeness: dict[str, str | None],
    hold: float,
) -> None:
    """Record a check's outcome per reference, and what it says of each
    series: `completeness` maps a series to None (complete) or to why it is
    incomplete. A request another thread or process has checked meanwhile
    keeps that result. `hold`: as `record_request`'s."""
    conn = catalog.conn
    now = utc_now()
    failed = sum(1 for _, reason, _, _ in outcomes if reason is not None)
    studies = {study for _, _, study, _ in outcomes if study}
    with catalog.writing(lock_keys=studies):
        if _checked(conn, transaction_uid):  # another thread or process got there first
            return
        conn.executemany(
            "UPDATE commitment_items SET failure_reason = ?, study_uid = ?, series_uid = ?"
            " WHERE transaction_uid = ? AND position = ?",
            [
                (reason, study, series, transaction_uid, position)
                for position, reason, study, series in outcomes
            ],
        )
        conn.execute(
            "UPDATE commitments SET checked_at = ?, committed = ?, failed = ?,"
            " delivery_state = ?, next_attempt_at = ? WHERE transaction_uid = ?",
            (now, len(outcomes) - failed, failed, PENDING, _moment(hold), transaction_uid),
        )
        for series_uid, incomplete_reason in completeness.items():
            if incomplete_reason is None:
                lifecycle.apply(conn, Event.COMMITTED, (now,), series_uid=series_uid)
            else:
                lifecycle.apply(
                    conn, Event.NOT_COMMITTED, (incomplete_reason, now), series_uid=series_uid
                )


def load_result(catalog: Catalog, transaction_uid: str) -> CommitmentResult:
    """The recorded result of a checked transaction."""
    reader = catalog.location.open_reader()
    try:
        requester = reader.execute(
            "SELECT requester_ae FROM commitments WHERE transaction_uid = ?", (transaction_uid,)
        ).fetchone()
        result = CommitmentResult(transaction_uid, requester[0] if requester else None)
        for cls, uid, reason in reader.execute(
            "SELECT sop_class_uid, sop_instance_uid, failure_reason FROM commitment_items"
            " WHERE transaction_uid = ? ORDER BY position",
            (transaction_uid,),
        ):
            reference = Reference(cls, uid)
            if reason is None:
                result.committed.append(reference)
            else:
                result.failed.append(Failure(reference, reason))
        return result
    finally:
        reader.close()


# -- delivery ---------------------------------------------------------------------


@dataclass(frozen=True)
class DueReport:
    transaction_uid: str
    requester_ae: str | None
    attempts: int
    checked: bool


def claim(catalog: Catalog, transaction_uid: str, lease: float) -> bool:
    """Take a due report for this process to deliver: the reporters of several
    nodes sharing an index all see it, and one of them wins (the row's update
    is atomic). Held for `lease` seconds; a node that dies holding it leaves it
    to the others after that."""
    with catalog.writing():
        return (
            catalog.conn.execute(
                "UPDATE commitments SET delivery_state = ?, next_attempt_at = ?"
                " WHERE transaction_uid = ? AND (delivery_state IN (?, ?)"
                " OR (delivery_state = ? AND next_attempt_at <= ?))",
                (DELIVERING, _moment(lease), transaction_uid, PENDING, CHECKING, DELIVERING,
                 utc_now()),
            ).rowcount
            == 1
        )  # fmt: skip


def reopen(catalog: Catalog, transaction_uid: str, *, hold: float = 0.0) -> None:
    """A repeated request: its (unchanged) report is owed again."""
    with catalog.writing():
        catalog.conn.execute(
            "UPDATE commitments SET delivery_state = ?, attempts = 0, next_attempt_at = ?"
            " WHERE transaction_uid = ? AND delivery_state != ?",
            (PENDING, _moment(hold), transaction_uid, CHECKING),
        )


def delivered(catalog: Catalog, transaction_uid: str, by: str) -> None:
    with catalog.writing():
        catalog.conn.execute(
            "UPDATE commitments SET delivery_state = ?, delivered_at = ?, delivered_by = ?,"
            " attempts = attempts + 1, last_error = NULL WHERE transaction_uid = ?",
            (DELIVERED, utc_now(), by, transaction_uid),
        )


def delivery_failed(
    catalog: Catalog,
    transaction_uid: str,
    error: str,
    retry_in: float | None,
    *,
    attempt: bool = True,
) -> None:
    """An attempt failed: retry in `retry_in` seconds, or (None) give up."""
    with catalog.writing():
        catalog.conn.execute(
            "UPDATE commitments SET delivery_state = ?, next_attempt_at = ?, last_error = ?,"
            " attempts = attempts + ? WHERE transaction_uid = ?",
            (
                PENDING if retry_in is not None else FAILED,
                _moment(retry_in) if retry_in is not None else None,
                error,
                int(attempt),
                transaction_uid,
            ),
        )


def due_reports(catalog: Catalog, *, starting: bool = False) -> list[DueReport]:
    """Transactions whose report is owed now, oldest first: checked ones whose
    retry time has come, and those still unchecked whose association's hold
    has passed (a check that failed), and those a reporter took and did not
    finish within its lease (its node died). `starting`: the service has just
    started and no association of its own holds anything: every pending and
    unchecked one."""
    try:
        conn = catalog.location.open_reader()
    except IndexUnreachable:
        return []
    try:
        rows = conn.execute(
            "SELECT transaction_uid, requester_ae, attempts, checked_at IS NOT NULL"
            " FROM commitments WHERE (delivery_state IN (?, ?)"
            " AND (? OR coalesce(next_attempt_at, requested_at) <= ?))"
            " OR (delivery_state = ? AND next_attempt_at <= ?) ORDER BY requested_at",
            (PENDING, CHECKING, starting, now := utc_now(), DELIVERING, now),
        ).fetchall()
        return [DueReport(uid, ae, attempts, bool(checked)) for uid, ae, attempts, checked in rows]
    finally:
        conn.close()


def next_attempt_in(catalog: Catalog) -> float | None:
    """Seconds until the earliest retry of a pending report (None: none pending)."""
    try:
        conn = catalog.location.open_reader()
    except IndexUnreachable:
        return None
    try:
        row = conn.execute(
            "SELECT min(next_attempt_at) FROM commitments WHERE delivery_state IN (?, ?)",
            (PENDING, DELIVERING),
        ).fetchone()
    finally:
        conn.close()
    if row[0] is None:
        return None
    moment = moment_of(row[0])
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def _moment(seconds: float) -> str:
    return stored_moment(datetime.now(UTC) + timedelta(seconds=seconds))
