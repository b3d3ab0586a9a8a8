"""Ingest: what indexing one received instance writes, the same SQL on SQLite
and PostgreSQL.

One transaction per instance inserts the instance and updates its series and
study through primary-key reads and writes only, so the cost of indexing an
instance does not depend on how large the study or the index already is.
Counts and the modality list are maintained here, never read from DICOM tags.
The verbs run on the writer's connection, inside `Catalog.writing` or a group
commit's work (storage.catalog.writer). On PostgreSQL the likely case, a new
instance of an indexed series, is one statement (`new_in_known_series`), tried
before them (storage.catalog.index chooses each engine's way).
"""

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from storage.catalog.engines import POSTGRES_KEY_LOCK, Database, lock_number
from storage.catalog.lifecycle import FIRST_INSTANCE, ONLINE, TRANSITIONS, Event
from storage.catalog.schema import FOLDED_NAMES, SERIES_FIELDS, STUDY_FIELDS, TABLES
from storage.names import fold_name

if TYPE_CHECKING:
    from storage.header import InstanceHeader


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


class Ingest:
    """The ingest verbs of a catalog, on its writer's connection `conn`."""

    conn: Database

    def lock_studies(self, series_uids: Iterable[str]) -> None:
        """Inside `writing()`, before its first write: lock the studies of these series."""
        rows = self.conn.rows_in(
            "SELECT DISTINCT study_uid FROM series WHERE series_uid IN (?)", list(series_uids)
        )
        self.conn.lock_keys([row[0] for row in rows])

    def stored_digest(self, sop_instance_uid: str) -> StoredDigest | None:
        """The indexed copy of an instance, or None. Call inside `writing()` to
        act on the answer; outside, it is only a hint."""
        return stored_digest_on(self.conn, sop_instance_uid)

    def has_conflict_at(self, path: str) -> bool:
        """Whether a conflicts row records a copy at `path`."""
        return (
            self.conn.execute("SELECT 1 FROM conflicts WHERE path = ?", (path,)).fetchone()
            is not None
        )

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
        self.conn.execute(_INSERT_INSTANCE, instance_values(entry))
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
        if self.conn.execute(_INSERT_IF_NEW, instance_values(entry)).rowcount == 0:
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
            f"UPDATE instances SET {', '.join(f'{c} = ?' for c in INSTANCE_COLUMNS[1:])}"
            " WHERE sop_instance_uid = ?",
            (*instance_values(entry)[1:], header.sop_instance_uid),
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
                "first_received": entry.received_at,
                "last_received": entry.received_at,
                **FIRST_INSTANCE,
            },
        )
        return values["modality"]

    def _series_counted(self, entry: IndexEntry, row, outcome: IndexOutcome) -> str | None:
        """After the series' count went up: fill in what it lacked (first value wins)."""
        stored = dict(zip(SERIES_FIELDS, row, strict=True))
        updates = first_values_win("series", stored, entry.header.series, outcome)
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
        study = study_values(header)
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
        updates = first_values_win("study", stored, study_values(entry.header), outcome)
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


def stored_digest_on(db: Database, sop_instance_uid: str) -> StoredDigest | None:
    row = db.execute(_STORED_DIGEST, (sop_instance_uid,)).fetchone()
    return StoredDigest(*row) if row else None


# The columns of `instance_values`, in its order: the table's.
INSTANCE_COLUMNS = tuple(TABLES["instances"][0])
_INSERT_INSTANCE = (
    f"INSERT INTO instances ({', '.join(INSTANCE_COLUMNS)})"
    f" VALUES ({', '.join('?' * len(INSTANCE_COLUMNS))})"
)


_INSERT_IF_NEW = f"{_INSERT_INSTANCE} ON CONFLICT (sop_instance_uid) DO NOTHING"


def instance_values(entry: IndexEntry) -> tuple:
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
ARRIVED = TRANSITIONS[Event.INSTANCE_ARRIVED].sets
_REPLACED = TRANSITIONS[Event.COPY_REPLACED].sets

_SERIES_COUNT = (
    "UPDATE series SET number_of_instances = number_of_instances + 1, bytes = bytes + ?,"
    f" {ARRIVED} WHERE series_uid = ? AND study_uid = ?"
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


def study_values(header: "InstanceHeader") -> dict:
    """The study's fields as an instance gives them: as read, and its names folded."""
    values = dict(header.study)
    for folded, name in FOLDED_NAMES.items():
        values[folded] = fold_name(values.get(name))
    return values


def first_values_win(level: str, stored: dict, received: dict, outcome: IndexOutcome) -> dict:
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


def new_in_known_series(entry: IndexEntry) -> tuple[str, tuple]:
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


def outcome_of(entry: IndexEntry, row) -> IndexOutcome:
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
