"""Deleting a study or a series: its rows go in the catalog
(`storage.catalog.series.delete_rows`), its files only once the index commit
that forgot them is done, so a crash never leaves rows pointing at nothing.
"""

import errno
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from storage import files
from storage.catalog import Catalog, series
from storage.catalog.series import Deletion


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
        study = study_uid if series_uid is None else series.study_of(index, series_uid)
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
            indexed = series.indexed_files(index, [uid for uid, _ in checked])
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


def _delete_rows(
    index: Catalog, data_dir: Path, *, study_uid: str, series_uid: str | None
) -> tuple[Deletion | None, Path | None]:
    """The deletion of the rows and, when it had files, its journal; (None,
    None) when the series is no longer of `study_uid`."""
    journal = None

    def write_journal(instance_files: list[tuple[str, str]]) -> None:
        nonlocal journal
        if instance_files:
            journal = _write_journal(data_dir, study_uid, instance_files)

    try:
        deletion = series.delete_rows(
            index, study_uid=study_uid, series_uid=series_uid, before_commit=write_journal
        )
    except BaseException:
        if journal is not None:  # the rows are still there
            journal.unlink(missing_ok=True)
        raise
    return deletion, journal
