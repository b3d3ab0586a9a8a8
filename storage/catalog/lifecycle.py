"""A series' lifecycle: the events that move it, and what each writes.

Besides its counts, what the index says of a series is six columns of
`series`, and this module says every value they take: `FIRST_INSTANCE` (and
the arrival's last_received) in the row a series' first instance creates,
`TRANSITIONS` for every change after (a rebuild restores the `MARKS` the files
cannot tell in the index it builds):

- ``last_received``: when its last new instance arrived;
- ``incomplete_reason``, ``incomplete_since``: why, and since when, it is
  incomplete (an association broke off, a commitment found instances missing);
- ``committed_at``: when a storage commitment last found every instance it
  referenced in the series committed;
- ``availability``: ONLINE (as it arrives), NEARLINE, OFFLINE or UNAVAILABLE;
- ``unavailable_by_verify``: the availability `verify` took away when it found
  files missing, to be given back once they are there again (NULL: the
  availability is the admin's, or the arrival's).

The state a reader sees is derived from them (`state_of`), as docs/the-index.md's
"Is the study complete?" describes it: ``incomplete`` while a reason is
recorded, else ``complete`` once a commitment completed it, else
``receiving`` until `stable_after` seconds pass without a new instance, then
``stable``. A study is incomplete when one of its series is, complete when all
of them are; its availability is the worst of its series'
(`worst_availability`).
"""

import enum
from dataclasses import dataclass
from datetime import UTC, datetime

from storage.catalog.engines import Database, moment_of, utc_now

ONLINE, NEARLINE, OFFLINE, UNAVAILABLE = "ONLINE", "NEARLINE", "OFFLINE", "UNAVAILABLE"
# Best first: a study's availability is the worst one among its series.
AVAILABILITIES = (ONLINE, NEARLINE, OFFLINE, UNAVAILABLE)

RECEIVING, STABLE, COMPLETE, INCOMPLETE = "receiving", "stable", "complete", "incomplete"


# The columns above that the files cannot tell: a rebuild from the files
# carries them over from the index it replaces (storage.catalog.rebuild).
MARKS = (
    "availability",
    "unavailable_by_verify",
    "incomplete_reason",
    "incomplete_since",
    "committed_at",
)


# The lifecycle columns of the row a series' first instance creates, beside its
# last_received (the instance's arrival): ONLINE and no mark (the others NULL).
# A constant, not a call: nothing of this module runs for each instance.
FIRST_INSTANCE = {"availability": ONLINE}


class Event(enum.Enum):
    INSTANCE_ARRIVED = "an instance new to the series was indexed"
    COPY_REPLACED = "an indexed instance's copy was replaced (duplicate policy overwrite)"
    ASSOCIATION_BROKE_OFF = "an association that delivered into the series ended without a release"
    DELIVERED_AGAIN = "a released association delivered instances of the series"
    MARKED_COMPLETE = "an admin marked the study complete"
    COMMITTED = "a commitment found every instance it referenced in the series committed"
    NOT_COMMITTED = "a commitment found instances of the series (or never received) missing"
    AVAILABILITY_SET = "an admin set the availability"
    FILES_MISSING = "verify found files of the series missing"
    FILES_BACK = "verify found the files it had missed back"


# Dated by the study's last_received: every other event dates studies.changed_at.
_ARRIVALS = {Event.INSTANCE_ARRIVED, Event.COPY_REPLACED}


@dataclass(frozen=True)
class Transition:
    sets: str  # SQL assignments; `?` for the event's values, in their order
    where: str | None = None  # the condition on the series' row; None: always


_CLEARED = "incomplete_reason = NULL, incomplete_since = NULL"

# event: Transition(what it sets, where). The event's values fill the `?` in
# order (after the comment's colon); why a condition is there is said above it.
TRANSITIONS: dict[Event, Transition] = {
    # A new instance supersedes an aborted transfer's mark and a commitment's
    # "complete": the series is receiving again. (received_at)
    Event.INSTANCE_ARRIVED: Transition(f"last_received = ?, {_CLEARED}, committed_at = NULL"),
    # Nothing new arrived: the marks stay. (received_at)
    Event.COPY_REPLACED: Transition("last_received = ?"),
    # Incomplete, unless a commitment has found it complete since its last
    # instance: the sender's own list said it was all there. (reason, now)
    Event.ASSOCIATION_BROKE_OFF: Transition("incomplete_reason = ?, incomplete_since = ?", "committed_at IS NULL"),  # noqa: E501
    # Resends count: the sender finished sending the series. Only a marked
    # series changes, so that those changed are those that had a mark.
    Event.DELIVERED_AGAIN: Transition(_CLEARED, "incomplete_reason IS NOT NULL"),
    # As DELIVERED_AGAIN: the mark goes, and the series is not `complete` for
    # it (no commitment said so) but receiving or stable.
    Event.MARKED_COMPLETE: Transition(_CLEARED, "incomplete_reason IS NOT NULL"),
    # Complete. (now)
    Event.COMMITTED: Transition(f"committed_at = ?, {_CLEARED}"),
    # Incomplete, and no longer complete. (reason, now)
    Event.NOT_COMMITTED: Transition("committed_at = NULL, incomplete_reason = ?, incomplete_since = ?"),  # noqa: E501
    # The admin's word: nothing `verify` set is to be given back any more. (availability)
    Event.AVAILABILITY_SET: Transition("availability = ?, unavailable_by_verify = NULL"),
    # An admin's UNAVAILABLE stays the admin's: only another value is
    # remembered, to be given back once the files are.
    Event.FILES_MISSING: Transition(f"unavailable_by_verify = availability, availability = '{UNAVAILABLE}'", f"availability != '{UNAVAILABLE}'"),  # noqa: E501
    # Only while marked: an admin's `availability set` since verify looked
    # cleared the mark, and the admin's value stays.
    Event.FILES_BACK: Transition("availability = unavailable_by_verify, unavailable_by_verify = NULL", "unavailable_by_verify IS NOT NULL"),  # noqa: E501
}  # fmt: skip


def apply(
    db: Database,
    event: Event,
    values: tuple = (),
    *,
    series_uid: str | None = None,
    study_uid: str | None = None,
) -> int:
    """Write `event` (its `values`) into the series `series_uid`, or (None)
    into every series of `study_uid`, inside a write transaction; how many
    series it changed. A study whose series it changed is dated changed now."""
    transition = TRANSITIONS[event]
    column, key = ("series_uid", series_uid) if series_uid is not None else ("study_uid", study_uid)
    condition = f" AND {transition.where}" if transition.where else ""
    changed = db.execute(
        f"UPDATE series SET {transition.sets} WHERE {column} = ?{condition}", (*values, key)
    ).rowcount
    if changed and event not in _ARRIVALS:
        study = (
            "?" if study_uid is not None else "(SELECT study_uid FROM series WHERE series_uid = ?)"
        )
        db.execute(f"UPDATE studies SET changed_at = ? WHERE study_uid = {study}", (utc_now(), key))
    return changed


def state_of(
    last_received: str | None, incomplete_reason: str | None, committed: bool, stable_after: float
) -> str:
    """A series' state (or a study's, from its series' marks and its last instance)."""
    if incomplete_reason:
        return INCOMPLETE
    if committed:
        return COMPLETE
    if last_received is None:
        return STABLE
    age = datetime.now(UTC) - moment_of(last_received)
    return RECEIVING if age.total_seconds() < stable_after else STABLE


def worst_availability(values: list[str]) -> str:
    """A study's availability: the worst among its series (ONLINE when it has none)."""
    return max(values, key=AVAILABILITIES.index, default=AVAILABILITIES[0])
