"""The changes admins and associations make to the index besides ingest:
availability, completeness marks, deletion. Each goes through
`Catalog.writing()`, the single writer path ingest uses too; a deletion removes
the files only once the index commit that forgot them is done, so a crash
never leaves rows pointing at nothing.
"""

import errno
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from storage import files
from storage.catalog import AVAILABILITIES, Catalog, utc_now
from storage.catalog.engines import Database
from storage.catalog.reads import worst_availability


@dataclass(frozen=True)
class Deletion:
    instances: int
    bytes: int
    instance_files: list[tuple[str, str]]  # (SOP Instance UID, path)


def set_availability(
    index: Catalog,
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


def refresh_study_availability(index: Catalog, study_uid: str) -> None:
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


def mark_incomplete(index: Catalog, series_uids: list[str], reason: str) -> list[str]:
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


def clear_incomplete(index: Catalog, series_uids: list[str]) -> list[str]:
    """Clear the incomplete mark of series a released association delivered
    instances of (new ones or resends); returns those that had one."""
    return _update_each_series(
        index,
        series_uids,
        "UPDATE series SET incomplete_reason = NULL, incomplete_since = NULL"
        " WHERE series_uid = ? AND incomplete_reason IS NOT NULL",
        (),
    )


def _update_each_series(
    index: Catalog, series_uids: list[str], sql: str, values: tuple
) -> list[str]:
    """`sql` (`values`, then the series UID) for each series, in one transaction;
    the series it changed."""
    changed = []
    with index.writing():
        index.lock_studies(series_uids)
        for uid in series_uids:
            if index.conn.execute(sql, (*values, uid)).rowcount:
                changed.append(uid)
    return changed


def mark_study_complete(index: Catalog, study_uid: str) -> int:
    """Clear the incomplete mark of a study's series; returns how many were marked."""
    with index.writing(lock_keys=[study_uid]):
        return index.conn.execute(
            "UPDATE series SET incomplete_reason = NULL, incomplete_since = NULL"
            " WHERE study_uid = ? AND incomplete_reason IS NOT NULL",
            (study_uid,),
        ).rowcount


def delete(
    index: Catalog,
    data_dir: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    progress: Callable[[int], None] = lambda _: None,
) -> Deletion:
    """Remove a study or a series: its index rows (the study's counts updated),
    then, once that commit is done, its files and the directories left empty.
    `progress(1)` is called per file. A deletion a crash interrupted is finished
    first (`finish_deletions`).

    Ingest of the same study may go on meanwhile. The files go in turns of the
    study's writers (`_remove_files`), and a file is left where an instance row
    points at it again: an instance received after the rows' deletion is kept
    whole, one received before it is removed whole.
    """
    data_dir = Path(data_dir)
    finish_deletions(index, data_dir)
    while True:
        study = study_uid if series_uid is None else _study_of(index, series_uid)
        if study is None:
            return Deletion(0, 0, [])
        deletion, journal = _delete_rows(index, data_dir, study_uid=study, series_uid=series_uid)
        if deletion is not None:
            break
        # The series was deleted and received again under another study since
        # it was looked up: look again.
    if journal is not None:
        _remove_files(index, data_dir, study, deletion.instance_files, progress)
        journal.unlink(missing_ok=True)
    return deletion


# --- files of deleted instances -------------------------------------------------
# A deletion's rows go in one transaction, its files after that COMMIT (a crash
# never leaves a row without its file). Meanwhile the study may be received
# again: an instance row re-created after the deletion's COMMIT has its file at
# the same place (a deterministic path), and that file must stay. So the files
# go in turns of the study's writers (`Catalog.writing` with the study's key, as
# ingest's transactions take it), each turn removing only files no row points
# at; ingest's transaction sees, under the same turn, whether the file it linked
# before its transaction is still there (`InstanceStore._place`). A turn lasts
# at most `_TURN_SECONDS`, so that ingest of the study (of every study, on
# SQLite) waits no longer than that, however slow the filesystem's unlinks.
#
# The paths are written to a journal before the rows' COMMIT: a crash between
# that COMMIT and the last unlink leaves files without rows, which the journal
# names, for the next `delete` or `serve` to remove (`finish_deletions`) and for
# `verify` not to take them for unknown files to index.

DELETIONS_DIR = PurePosixPath(files.INCOMING_DIR, ".deletions")
_JOURNAL_SUFFIX = ".json"
_TURN_SECONDS = 0.02
# Between two turns: flock() (SQLite's turns) hands the lock to no waiter in
# particular, and without a pause the deletion would take it again before a
# waiting ingest has woken up.
_BETWEEN_TURNS = 0.002
_CHECKED_AT_ONCE = 500  # paths whose rows one turn looks up


def finish_deletions(index: Catalog, data_dir: Path) -> int:
    """Remove the files of deletions a crash interrupted (each journal's, but
    those an instance row points at again); returns how many journals it
    finished or dropped."""
    finished = 0
    for journal, content in _read_journals(Path(data_dir)):
        if content is not None:
            study_uid = content["study_uid"]
            instance_files = [tuple(pair) for pair in content["instance_files"]]
            _remove_files(index, Path(data_dir), study_uid, instance_files, lambda _: None)
        # else cut short by the crash, so before the rows' COMMIT: nothing to remove
        journal.unlink(missing_ok=True)
        finished += 1
    return finished


def files_being_deleted(data_dir: Path) -> set[str]:
    """The paths (relative to the data directory) of files a deletion has
    forgotten in the index and not yet removed: no unknown files."""
    return {
        path
        for _, content in _read_journals(Path(data_dir))
        if content is not None
        for _, path in content["instance_files"]
    }


def _read_journals(data_dir: Path) -> Iterator[tuple[Path, dict | None]]:
    """Each deletion journal and what it says (None: cut short as it was written);
    one finished meanwhile, by another process, is passed over."""
    for journal in _journals(data_dir):
        try:
            content = json.loads(journal.read_text())
        except FileNotFoundError:
            continue
        except ValueError:
            content = None
        yield journal, content


def _journals(data_dir: Path) -> list[Path]:
    directory = data_dir / DELETIONS_DIR
    if not directory.is_dir():
        return []
    return sorted(directory.glob("*" + _JOURNAL_SUFFIX))


def _write_journal(data_dir: Path, study_uid: str, instance_files: list[tuple[str, str]]) -> Path:
    """Durably, before the rows' COMMIT: the files the deletion will remove. A
    journal a crash cut short was so before that COMMIT (`finish_deletions`)."""
    directory = data_dir / DELETIONS_DIR
    files.ensure_directory(data_dir, directory)
    journal = directory / f"{os.getpid()}-{time.time_ns()}{_JOURNAL_SUFFIX}"
    content = json.dumps({"study_uid": study_uid, "instance_files": instance_files})
    with open(journal, "x") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    files.fsync_directory(directory)
    return journal


def _remove_files(
    index: Catalog,
    data_dir: Path,
    study_uid: str,
    instance_files: list[tuple[str, str]],
    progress: Callable[[int], None],
) -> None:
    """Unlink each (SOP Instance UID, path) no instance row points at, in turns
    of the study's writers; then the directories left empty."""
    pending = list(instance_files)
    parents = set()
    while pending:
        with index.writing(lock_keys=[study_uid]):
            checked = pending[:_CHECKED_AT_ONCE]
            indexed = set(
                map(
                    tuple,
                    index.conn.rows_in(
                        "SELECT sop_instance_uid, path FROM instances"
                        " WHERE sop_instance_uid IN (?)",
                        [uid for uid, _ in checked],
                    ),
                )
            )
            turn_ends = time.monotonic() + _TURN_SECONDS
            removed = 0
            for uid, relpath in checked:
                path = data_dir / relpath
                if (uid, relpath) not in indexed:  # else received again since
                    path.unlink(missing_ok=True)
                parents.update((path.parent, path.parent.parent))
                removed += 1
                progress(1)
                if time.monotonic() > turn_ends:
                    break
            pending = pending[removed:]
            if not pending:
                # In the turn: an instance linked again under it (`_place`)
                # finds its directory.
                _remove_empty(data_dir, parents)
        if pending:
            time.sleep(_BETWEEN_TURNS)


def _remove_empty(data_dir: Path, directories: set[Path]) -> None:
    for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):
        if directory == data_dir:
            continue
        try:
            directory.rmdir()
        except OSError as exc:
            # Not empty: an instance arriving now was linked into it before its
            # transaction (or files the index does not know are there).
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                raise


def _study_of(index: Catalog, series_uid: str) -> str | None:
    with index.writing():
        row = index.conn.execute(
            "SELECT study_uid FROM series WHERE series_uid = ?", (series_uid,)
        ).fetchone()
    return row[0] if row else None


def _delete_rows(
    index: Catalog, data_dir: Path, *, study_uid: str, series_uid: str | None
) -> tuple[Deletion | None, Path | None]:
    """The deletion of the rows and, when it had files, its journal; (None,
    None) when the series is no longer of `study_uid`."""
    conn = index.conn
    journal = None
    try:
        with index.writing(lock_keys=[study_uid]):
            if series_uid is not None:
                row = conn.execute(
                    "SELECT study_uid, number_of_instances, bytes FROM series WHERE series_uid = ?",
                    (series_uid,),
                ).fetchone()
                if row is None:
                    return Deletion(0, 0, []), None
                if row[0] != study_uid:
                    return None, None
                _, instances, size = row
                instance_files = _instance_files(conn, "series_uid", series_uid)
                conn.execute("DELETE FROM instances WHERE series_uid = ?", (series_uid,))
                conn.execute("DELETE FROM series WHERE series_uid = ?", (series_uid,))
                remaining = conn.execute(
                    "SELECT count(*) FROM series WHERE study_uid = ?", (study_uid,)
                ).fetchone()[0]
                if remaining == 0:
                    conn.execute("DELETE FROM studies WHERE study_uid = ?", (study_uid,))
                else:
                    _drop_series_from_study(index, study_uid, instances, size)
            else:
                row = conn.execute(
                    "SELECT number_of_instances, bytes FROM studies WHERE study_uid = ?",
                    (study_uid,),
                ).fetchone()
                if row is None:
                    return Deletion(0, 0, []), None
                instances, size = row
                instance_files = _instance_files(conn, "study_uid", study_uid)
                conn.execute("DELETE FROM instances WHERE study_uid = ?", (study_uid,))
                conn.execute("DELETE FROM series WHERE study_uid = ?", (study_uid,))
                conn.execute("DELETE FROM studies WHERE study_uid = ?", (study_uid,))
            if instance_files:
                journal = _write_journal(data_dir, study_uid, instance_files)
    except BaseException:
        if journal is not None:  # the rows are still there
            journal.unlink(missing_ok=True)
        raise
    return Deletion(instances, size, instance_files), journal


def _instance_files(conn: Database, column: str, uid: str) -> list[tuple[str, str]]:
    return [
        (row[0], row[1])
        for row in conn.execute(
            f"SELECT sop_instance_uid, path FROM instances WHERE {column} = ?", (uid,)
        )
    ]


def _drop_series_from_study(index: Catalog, study_uid: str, instances: int, size: int) -> None:
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
