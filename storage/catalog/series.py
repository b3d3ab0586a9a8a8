"""What changes a series or a study besides ingest: its marks, its
availability, the deletion of its rows. Each change is one transaction of
`Catalog.writing()`, the single writer path ingest uses too, and writes the
series' lifecycle through its table (`storage.catalog.lifecycle`).

The files of a deletion are storage.changes' business: the rows' deletion
tells it which, and the row check of each of its unlink turns is here
(`indexed_files`).
"""

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from storage.catalog import lifecycle
from storage.catalog.engines import Database, utc_now
from storage.catalog.index import Catalog
from storage.catalog.lifecycle import AVAILABILITIES, Event


@dataclass(frozen=True)
class Deletion:
    instances: int
    bytes: int
    instance_files: list[tuple[str, str]]  # (SOP Instance UID, path)


def set_availability(
    catalog: Catalog,
    availability: str,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> int:
    """Set the availability of one series, or of every series of a study; the
    study's is derived again. Returns how many series changed (0: not found)."""
    availability = availability.upper()
    if availability not in AVAILABILITIES:
        raise ValueError(f"availability must be one of {', '.join(AVAILABILITIES)}")
    conn = catalog.conn
    with catalog.writing():
        if series_uid is not None:
            row = conn.execute(
                "SELECT study_uid FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
            if row is None:
                return 0
            study_uid = row[0]
        conn.lock_keys([study_uid])
        changed = lifecycle.apply(
            conn,
            Event.AVAILABILITY_SET,
            (availability,),
            series_uid=series_uid,
            study_uid=study_uid,
        )
        if changed:
            refresh_study_availability(catalog, study_uid)
    return changed


def refresh_study_availability(catalog: Catalog, study_uid: str) -> None:
    """Derive a study's availability from its series. Inside `writing()`."""
    values = [
        row[0]
        for row in catalog.conn.execute(
            "SELECT DISTINCT availability FROM series WHERE study_uid = ?", (study_uid,)
        )
    ]
    catalog.conn.execute(
        "UPDATE studies SET availability = ? WHERE study_uid = ?",
        (lifecycle.worst_availability(values), study_uid),
    )


def mark_files_missing(catalog: Catalog, series_uid: str, study_uid: str) -> None:
    """`verify` found files of the series missing: UNAVAILABLE until they are
    back (`give_availability_back`). Inside `writing()`, with the study locked."""
    lifecycle.apply(catalog.conn, Event.FILES_MISSING, series_uid=series_uid)
    refresh_study_availability(catalog, study_uid)


def give_availability_back(catalog: Catalog, series_uid: str, study_uid: str) -> bool:
    """`verify` found the files back: the series has the availability it had
    before it marked it, unless an admin set another since. Whether it had a
    mark to give back. Inside `writing()`, with the study locked."""
    if not lifecycle.apply(catalog.conn, Event.FILES_BACK, series_uid=series_uid):
        return False
    refresh_study_availability(catalog, study_uid)
    return True


def mark_incomplete(catalog: Catalog, series_uids: list[str], reason: str) -> list[str]:
    """Mark series delivered into by an association that broke off; returns
    those marked (not those a storage commitment has found complete since
    their last instance)."""
    return _apply_to_each(catalog, series_uids, Event.ASSOCIATION_BROKE_OFF, (reason, utc_now()))


def clear_incomplete(catalog: Catalog, series_uids: list[str]) -> list[str]:
    """Clear the incomplete mark of series a released association delivered
    instances of (new ones or resends); returns those that had one."""
    return _apply_to_each(catalog, series_uids, Event.DELIVERED_AGAIN, ())


def _apply_to_each(
    catalog: Catalog, series_uids: list[str], event: Event, values: tuple
) -> list[str]:
    """`event` into each series, in one transaction; the series it changed."""
    changed = []
    with catalog.writing():
        catalog.lock_studies(series_uids)
        for uid in series_uids:
            if lifecycle.apply(catalog.conn, event, values, series_uid=uid):
                changed.append(uid)
    return changed


def mark_study_complete(catalog: Catalog, study_uid: str) -> int:
    """Clear the incomplete mark of a study's series; returns how many were marked."""
    with catalog.writing(lock_keys=[study_uid]):
        return lifecycle.apply(catalog.conn, Event.MARKED_COMPLETE, study_uid=study_uid)


def study_of(catalog: Catalog, series_uid: str) -> str | None:
    """The study a series is indexed under (None: not indexed), as the
    writers see it."""
    with catalog.writing():
        row = catalog.conn.execute(
            "SELECT study_uid FROM series WHERE series_uid = ?", (series_uid,)
        ).fetchone()
    return row[0] if row else None


def delete_rows(
    catalog: Catalog,
    *,
    study_uid: str,
    series_uid: str | None,
    before_commit: Callable[[list[tuple[str, str]]], None],
) -> Deletion | None:
    """Delete the rows of a study, or of one of its series (the study's counts
    updated; the study's row too when it was its last series), in one
    transaction; None, with nothing deleted, when the series is no longer of
    `study_uid`. `before_commit(instance_files)` is called in that transaction,
    once the rows are gone and before its COMMIT."""
    conn = catalog.conn
    table, column, uid = (
        ("series", "series_uid", series_uid)
        if series_uid is not None
        else ("studies", "study_uid", study_uid)
    )
    with catalog.writing(lock_keys=[study_uid]):
        row = conn.execute(
            f"SELECT study_uid, number_of_instances, bytes FROM {table} WHERE {column} = ?", (uid,)
        ).fetchone()
        if row is None:
            return Deletion(0, 0, [])
        if row[0] != study_uid:  # deleted and received again under another study
            return None
        _, instances, size = row
        instance_files = _instance_files(conn, column, uid)
        conn.execute(f"DELETE FROM instances WHERE {column} = ?", (uid,))
        conn.execute(f"DELETE FROM series WHERE {column} = ?", (uid,))
        if series_uid is None or _series_left(conn, study_uid) == 0:
            conn.execute("DELETE FROM studies WHERE study_uid = ?", (study_uid,))
        else:
            _drop_series_from_study(catalog, study_uid, instances, size)
        before_commit(instance_files)
    return Deletion(instances, size, instance_files)


def indexed_files(catalog: Catalog, sop_instance_uids: Iterable[str]) -> set[tuple[str, str]]:
    """The (SOP Instance UID, path) of those instances that have a row. Inside
    `writing()` with their study locked, to act on the answer in that turn."""
    return set(
        map(
            tuple,
            catalog.conn.rows_in(
                "SELECT sop_instance_uid, path FROM instances WHERE sop_instance_uid IN (?)",
                list(sop_instance_uids),
            ),
        )
    )


def _series_left(conn: Database, study_uid: str) -> int:
    return conn.execute("SELECT count(*) FROM series WHERE study_uid = ?", (study_uid,)).fetchone()[
        0
    ]


def _instance_files(conn: Database, column: str, uid: str) -> list[tuple[str, str]]:
    return [
        (row[0], row[1])
        for row in conn.execute(
            f"SELECT sop_instance_uid, path FROM instances WHERE {column} = ?", (uid,)
        )
    ]


def _drop_series_from_study(catalog: Catalog, study_uid: str, instances: int, size: int) -> None:
    modalities = [
        row[0]
        for row in catalog.conn.execute(
            "SELECT modality FROM series WHERE study_uid = ? AND modality IS NOT NULL"
            " GROUP BY modality ORDER BY min(first_received)",
            (study_uid,),
        )
    ]
    catalog.conn.execute(
        "UPDATE studies SET number_of_series = number_of_series - 1,"
        " number_of_instances = number_of_instances - ?, bytes = bytes - ?, modalities = ?,"
        " changed_at = ? WHERE study_uid = ?",
        (instances, size, json.dumps(modalities), utc_now(), study_uid),
    )
    refresh_study_availability(catalog, study_uid)
