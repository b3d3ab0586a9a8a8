"""The index's schema, the same on SQLite and PostgreSQL: its tables, their
columns and indexes, and the version the index is at (upgraded in place when a
catalog opens an index of an earlier one)."""

from storage.attributes import ATTRIBUTES, INSTANCE, PATIENT, SERIES, STUDY, columns
from storage.catalog.engines import SQLITE_FILENAME, Database, SchemaTooNew
from storage.names import fold_name

INDEX_FILENAME = SQLITE_FILENAME
# 2: storage commitment (commitments, commitment_items, series.committed_at),
# series.unavailable_by_verify, dates and times normalised with *_raw beside them
# 3: studies.patient_name_folded and referrer_folded (storage.names.fold_name)
# 4: studies.changed_at
SCHEMA_VERSION = 4

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
            # When the study last changed other than by a new instance: an event
            # of storage.catalog.lifecycle on one of its series, or a series
            # deleted. With last_received, its FHIR meta.lastUpdated.
            "changed_at": str,
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
            "changed_at",  # FHIR _lastUpdated
        )
    ),
    ("series", ["study_uid"]),
    ("instances", ["series_uid"]),
    ("conflicts", ["sop_instance_uid"]),
]


def create_schema(db: Database) -> None:
    """Create what is missing of the schema and upgrade an earlier version, in
    one transaction (the writers' turn taken by the caller). SchemaTooNew for an
    index of a later version."""
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
        if 0 < found < 4:
            _date_earlier_changes(db)
        if found != SCHEMA_VERSION:
            db.set_schema_version(SCHEMA_VERSION)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


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


def _date_earlier_changes(db: Database) -> None:
    """Schema version 4: a study's changed_at from the marks its series hold
    (a commitment, an incomplete mark); earlier events left no date."""
    marks: dict[str, str] = {}
    for study_uid, committed_at, incomplete_since in db.execute(
        "SELECT study_uid, max(committed_at), max(incomplete_since) FROM series GROUP BY study_uid"
    ).fetchall():
        dated = [mark for mark in (committed_at, incomplete_since) if mark]
        if dated:
            marks[study_uid] = max(dated)
    db.executemany(
        "UPDATE studies SET changed_at = ? WHERE study_uid = ?",
        [(mark, study_uid) for study_uid, mark in marks.items()],
    )
