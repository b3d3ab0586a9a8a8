"""The changes admins and associations make to the index besides ingest:
availability, completeness marks, deletion. Each goes through
`Index.writing()`, the single writer path ingest uses too; a deletion removes
the files only once the index commit that forgot them is done, so a crash
never leaves rows pointing at nothing.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from storage.database import Database
from storage.index import AVAILABILITIES, Index, utc_now
from storage.query import worst_availability


@dataclass(frozen=True)
class Deletion:
    instances: int
    bytes: int
    files: list[str]


def set_availability(
    index: Index, availability: str, *, study_uid: str | None = None, series_uid: str | None = None
) -> int:
    """Set the availability of one series, or of every series of a study; the
    study's is derived again. Returns how many series changed (0: not found)."""
    availability = availability.upper()
    if availability not in AVAILABILITIES:
        raise ValueError(f"availability must be one of {', '.join(AVAILABILITIES)}")
    conn = index.conn
    with index.writing():
        if series_uid is not None:
            row = conn.execute(
                "SELECT study_uid FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
            if row is None:
                return 0
            study_uid = row[0]
        conn.lock_keys([study_uid])
        if series_uid is not None:
            # The admin's word: nothing `verify` set is to be given back any more.
            changed = conn.execute(
                "UPDATE series SET availability = ?, unavailable_by_verify = NULL"
                " WHERE series_uid = ?",
                (availability, series_uid),
            ).rowcount
        else:
            changed = conn.execute(
                "UPDATE series SET availability = ?, unavailable_by_verify = NULL"
                " WHERE study_uid = ?",
                (availability, study_uid),
            ).rowcount
        if changed:
            refresh_study_availability(index, study_uid)
    return changed


def refresh_study_availability(index: Index, study_uid: str) -> None:
    """Derive a study's availability from its series. Inside `writing()`."""
    values = [
        row[0]
        for row in index.conn.execute(
            "SELECT DISTINCT availability FROM series WHERE study_uid = ?", (study_uid,)
        )
    ]
    index.conn.execute(
        "UPDATE studies SET availability = ? WHERE study_uid = ?",
        (worst_availability(values), study_uid),
    )


def mark_incomplete(index: Index, series_uids: list[str], reason: str) -> list[str]:
    """Mark series delivered into by an association that broke off; returns
    those marked. A series a storage commitment has found complete since its
    last instance is left alone: the sender's own list said it was all there."""
    return _update_each_series(
        index,
        series_uids,
        "UPDATE series SET incomplete_reason = ?, incomplete_since = ?"
        " WHERE series_uid = ? AND committed_at IS NULL",
        (reason, utc_now()),
    )


def clear_incomplete(index: Index, series_uids: list[str]) -> list[str]:
    """Clear the incomplete mark of series a released association delivered
    instances of (new ones or resends); returns those that had one."""
    return _update_each_series(
        index,
        series_uids,
        "UPDATE series SET incomplete_reason = NULL, incomplete_since = NULL"
        " WHERE series_uid = ? AND incomplete_reason IS NOT NULL",
        (),
    )


def _update_each_series(index: Index, series_uids: list[str], sql: str, values: tuple) -> list[str]:
    """`sql` (`values`, then the series UID) for each series, in one transaction;
    the series it changed."""
    changed = []
    with index.writing():
        index.lock_studies(series_uids)
        for uid in series_uids:
            if index.conn.execute(sql, (*values, uid)).rowcount:
                changed.append(uid)
    return changed


def mark_complete(index: Index, study_uid: str) -> int:
    """Clear the incomplete mark of a study's series; returns how many were marked."""
    with index.writing(lock_keys=[study_uid]):
        return index.conn.execute(
            "UPDATE series SET incomplete_reason = NULL, incomplete_since = NULL"
            " WHERE study_uid = ? AND incomplete_reason IS NOT NULL",
            (study_uid,),
        ).rowcount


def delete(
    index: Index,
    data_dir: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    progress: Callable[[int], None] = lambda _: None,
) -> Deletion:
    """Remove a study or a series: its index rows (the study's counts updated),
    then, once that commit is done, its files and the directories left empty.
    `progress(1)` is called per file removed."""
    deletion = _delete_rows(index, study_uid=study_uid, series_uid=series_uid)
    _remove_files(Path(data_dir), deletion.files, progress)
    return deletion


def _remove_files(data_dir: Path, relpaths: list[str], progress: Callable[[int], None]) -> None:
    parents = set()
    for relpath in relpaths:
        path = data_dir / relpath
        path.unlink(missing_ok=True)
        progress(1)
        parents.update((path.parent, path.parent.parent))
    for directory in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        if directory != data_dir and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()


def _delete_rows(
    index: Index, *, study_uid: str | None = None, series_uid: str | None = None
) -> Deletion:
    conn = index.conn
    with index.writing():
        if series_uid is not None:
            row = conn.execute(
                "SELECT study_uid, number_of_instances, bytes FROM series WHERE series_uid = ?",
                (series_uid,),
            ).fetchone()
            if row is None:
                return Deletion(0, 0, [])
            study_uid, instances, size = row
            conn.lock_keys([study_uid])
            paths = _paths(conn, "series_uid", series_uid)
            conn.execute("DELETE FROM instances WHERE series_uid = ?", (series_uid,))
            conn.execute("DELETE FROM series WHERE series_uid = ?", (series_uid,))
            remaining = conn.execute(
                "SELECT count(*) FROM series WHERE study_uid = ?", (study_uid,)
            ).fetchone()[0]
            if remaining == 0:
                conn.execute("DELETE FROM studies WHERE study_uid = ?", (study_uid,))
                return Deletion(instances, size, paths)
            _drop_series_from_study(index, study_uid, instances, size)
            return Deletion(instances, size, paths)
        conn.lock_keys([study_uid])
        row = conn.execute(
            "SELECT number_of_instances, bytes FROM studies WHERE study_uid = ?",
            (study_uid,),
        ).fetchone()
        if row is None:
            return Deletion(0, 0, [])
        paths = _paths(conn, "study_uid", study_uid)
        conn.execute("DELETE FROM instances WHERE study_uid = ?", (study_uid,))
        conn.execute("DELETE FROM series WHERE study_uid = ?", (study_uid,))
        conn.execute("DELETE FROM studies WHERE study_uid = ?", (study_uid,))
        return Deletion(row[0], row[1], paths)


def _paths(conn: Database, column: str, uid: str) -> list[str]:
    return [
        row[0] for row in conn.execute(f"SELECT path FROM instances WHERE {column} = ?", (uid,))
    ]


def _drop_series_from_study(index: Index, study_uid: str, instances: int, size: int) -> None:
    modalities = [
        row[0]
        for row in index.conn.execute(
            "SELECT modality FROM series WHERE study_uid = ? AND modality IS NOT NULL"
            " GROUP BY modality ORDER BY min(first_received)",
            (study_uid,),
        )
    ]
    index.conn.execute(
        "UPDATE studies SET number_of_series = number_of_series - 1,"
        " number_of_instances = number_of_instances - ?, bytes = bytes - ?, modalities = ?"
        " WHERE study_uid = ?",
        (instances, size, json.dumps(modalities), study_uid),
    )
    refresh_study_availability(index, study_uid)
