"""Keeping files and index in agreement: index files found on disk, verify, rebuild.

Every instance file records when and from whom it arrived (see
`files.encode_file_header`), so indexing a file found on disk produces the same
rows that live ingest produced when it arrived.
"""

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from storage import files
from storage.catalog import Catalog, IndexEntry, Provenance, series
from storage.catalog.engines import (
    WRITER_LOCK_SUFFIX,
    IndexCorrupt,
    IndexLocation,
    open_in_another_process,
)
from storage.catalog.ingest import PatientConflict, SeriesStudyMismatch
from storage.catalog.rebuild import (
    carry_over_damaged,
    file_to_replace,
    replace_live_rows,
    scratch_catalog,
)
from storage.catalog.schema import INDEX_FILENAME
from storage.catalog.verification import RecordedFiles
from storage.changes import files_being_deleted
from storage.codec.walk import HeaderError
from storage.header import read_header
from storage.uids import is_valid_uid

Progress = Callable[[int], None]


def _no_progress(_: int) -> None:
    pass


class UnindexableFile(ValueError):
    """A file in the data directory that cannot be indexed, and why."""


def instance_files(data_dir: Path) -> Iterator[PurePosixPath]:
    """Relative paths of the .dcm files in the data directory, except kept-aside
    copies and temp files (a misplaced one is listed too, to be reported)."""
    skipped = {files.CONFLICTS_DIR, files.INCOMING_DIR}
    for dirpath, dirnames, filenames in os.walk(data_dir):
        if Path(dirpath) == Path(data_dir):
            dirnames[:] = [name for name in dirnames if name not in skipped]
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(files.INSTANCE_SUFFIX):
                yield PurePosixPath(Path(dirpath, name).relative_to(data_dir).as_posix())


def conflict_files(data_dir: Path) -> Iterator[PurePosixPath]:
    root = Path(data_dir) / files.CONFLICTS_DIR
    if root.is_dir():
        for path in sorted(root.rglob("*" + files.INSTANCE_SUFFIX)):
            yield PurePosixPath(path.relative_to(data_dir).as_posix())


def entry_for_file(data_dir: Path, relpath: PurePosixPath) -> IndexEntry:
    """The index entry of a stored file, as ingest made it when the file arrived."""
    path = Path(data_dir) / relpath
    try:
        meta = files.read_file_meta(path)
    except ValueError as exc:
        raise UnindexableFile(str(exc)) from exc
    if not meta.transfer_syntax:
        raise UnindexableFile(f"{relpath}: no transfer syntax in the file meta")
    with open(path, "rb") as handle:
        handle.seek(meta.dataset_offset)
        try:
            header = read_header(handle, meta.transfer_syntax)
        except HeaderError as exc:
            raise UnindexableFile(f"{relpath}: {exc}") from exc
    uids = (header.study_uid, header.series_uid, header.sop_instance_uid, header.sop_class_uid)
    if not all(is_valid_uid(uid) for uid in uids):
        raise UnindexableFile(f"{relpath}: missing or invalid UIDs")
    expected = files.instance_relpath(header.study_uid, header.series_uid, header.sop_instance_uid)
    if relpath.parts[0] != files.CONFLICTS_DIR and relpath != expected:
        raise UnindexableFile(f"{relpath}: its UIDs say it belongs at {expected}")
    receipt = meta.receipt
    received_at = receipt.get("received_at") or _mtime(path)
    return IndexEntry(
        header=header,
        path=str(relpath),
        size=path.stat().st_size,
        sha256=files.file_dataset_digest(path),
        transfer_syntax=meta.transfer_syntax,
        received_at=received_at,
        provenance=Provenance.from_receipt(receipt),
    )


def _mtime(path: Path) -> str:
    moment = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def index_file(index: Catalog, entry: IndexEntry) -> bool:
    """Add a file found on disk to the index, unless its SOP Instance UID is
    known already. Inside `writing()`. Returns whether it was added;
    UnindexableFile when its series is indexed under another study, or its
    study under another patient (ingest refuses such an instance now)."""
    if index.stored_digest(entry.header.sop_instance_uid) is not None:
        return False
    try:
        index.index_instance(entry)
    except (SeriesStudyMismatch, PatientConflict) as exc:
        raise UnindexableFile(f"{entry.path}: {exc}") from exc
    return True


@dataclass
class Recovery:
    """What startup recovery found in `.incoming` after a crash."""

    removed: int = 0  # never placed: their senders got no Success
    indexed: list[str] = field(default_factory=list)  # placed, and the index lacked them


def recover_incoming(index: Catalog, node: str) -> Recovery:
    """Finish what a crash of this node interrupted: a temp file still linked
    to its final name was placed but perhaps not indexed (see
    `files.link_into_place`), so index it; any other temp file is removed.
    With a SQLite index (one machine), every node directory is this machine's."""
    location = index.location
    data_dir = Path(location.data_dir)
    recovery = Recovery()
    temps = files.prepare_data_dir(data_dir, node, every_node=not index.shared_by_nodes)
    for temp in temps:
        relpath = _final_name(data_dir, temp) if temp.stat().st_nlink > 1 else None
        if relpath is None:
            temp.unlink()
            recovery.removed += 1
            continue
        entry = entry_for_file(data_dir, relpath)
        with index.writing(lock_keys=[entry.header.study_uid]):
            if _finish_placing(index, data_dir, entry, relpath):
                recovery.indexed.append(str(relpath))
        temp.unlink()
    return recovery


class IndexBehindFiles(Exception):
    """The index holds no instance, the data directory does: an index lost or
    cut to nothing (SQLite takes an empty file for an empty database)."""


def check_not_behind_files(index: Catalog) -> None:
    """IndexBehindFiles when the index holds no instance while the data
    directory holds instance files. Reads one row; walks the directory only
    for an empty index, down to the first file."""
    if index.holds_instances():
        return
    location = index.location
    found = next(instance_files(Path(location.data_dir)), None)
    if found is not None:
        raise IndexBehindFiles(
            f"the index {location.describe()} holds no instances, but {location.data_dir}"
            f" holds instance files ({found}, …): run `imaging-scp rebuild` with imaging-scp"
            " serve stopped to index them, or give the right --data-dir and index_url"
        )


def _final_name(data_dir: Path, temp: Path) -> PurePosixPath | None:
    meta = files.read_file_meta(temp)
    with open(temp, "rb") as handle:
        handle.seek(meta.dataset_offset)
        header = read_header(handle, meta.transfer_syntax)
    candidates = [
        files.instance_relpath(header.study_uid, header.series_uid, header.sop_instance_uid),
        files.conflict_relpath(header.sop_instance_uid, files.file_dataset_digest(temp)),
    ]
    return files.placed_path(data_dir, temp, candidates)


def _finish_placing(
    index: Catalog, data_dir: Path, entry: IndexEntry, relpath: PurePosixPath
) -> bool:
    """Record a placed file as ingest would have; False if it already was."""
    if relpath.parts[0] == files.CONFLICTS_DIR:
        known = index.has_conflict_at(str(relpath))
        if not known:
            index.record_conflict(entry, "kept-aside")
        return not known
    known = index.stored_digest(entry.header.sop_instance_uid)
    if known is None:
        try:
            index.index_instance(entry)
        except (SeriesStudyMismatch, PatientConflict):  # ingest refused it: no Success
            (Path(data_dir) / relpath).unlink(missing_ok=True)
            return False
        return True
    if known.sha256 != entry.sha256:  # an overwrite that did not commit
        index.replace_instance(entry)
        index.record_conflict(entry, "overwrote")
        return True
    return False


@dataclass
class VerifyReport:
    checked: int = 0
    checked_kept_aside: int = 0  # copies under conflicts/ the index records
    missing: list[str] = field(default_factory=list)
    wrong_size: list[str] = field(default_factory=list)
    wrong_checksum: list[str] = field(default_factory=list)
    unavailable_series: list[str] = field(default_factory=list)
    available_again: list[str] = field(default_factory=list)  # files back: what verify set undone
    unknown_files: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unindexable: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        problems = (self.missing, self.wrong_size, self.wrong_checksum, self.unindexable)
        unknown = set(self.unknown_files) - set(self.repaired)
        return not any(problems) and not unknown


def verify(
    index: Catalog,
    data_dir: Path,
    *,
    checksum: bool = False,
    repair: bool = False,
    progress: Progress = _no_progress,
) -> VerifyReport:
    """Check every indexed file (exists, recorded size, and SHA-256 when asked),
    and every copy kept aside; series with missing files become UNAVAILABLE, and
    get back the availability they had once their files are back (what an admin
    set is never undone); files on disk the index does not know are reported,
    and indexed when `repair`."""
    data_dir = Path(data_dir)
    report = VerifyReport()
    missing: list[tuple[str, str, str, str]] = []  # path, SOP Instance UID, series, study
    with RecordedFiles(index) as recorded:
        for relpath, size, sha256, uid, series_uid, study_uid in recorded.instances():
            report.checked += 1
            progress(1)
            if not _check_file(data_dir, relpath, size, sha256, checksum, report):
                missing.append((relpath, uid, series_uid, study_uid))
        # Copies kept aside are the only copy of what a sender sent the second
        # time: each must be where the index says, as it arrived.
        for relpath, size, sha256 in recorded.kept_aside():
            report.checked_kept_aside += 1
            _check_file(data_dir, relpath, size, sha256, checksum, report)
        marked_by_verify = recorded.marked_by_verify()
    studies = {*(study for *_, study in missing), *marked_by_verify.values()}
    damaged_series: dict[str, str] = {}
    recovered: dict[str, str] = {}
    if studies:
        with index.writing(lock_keys=studies):
            # In the studies' turn, which ingest and deletion take too: a file
            # missing since the look above because a deletion removed it with
            # its row, or back because a resend restored it, is not missing.
            for relpath, uid, series_uid, study_uid in missing:
                if _still_missing(index, data_dir, relpath, uid):
                    damaged_series[series_uid] = study_uid
                else:
                    report.missing.remove(relpath)
            for series_uid, study_uid in damaged_series.items():
                series.mark_files_missing(index, series_uid, study_uid)
            for series_uid, study_uid in marked_by_verify.items():
                if series_uid in damaged_series:
                    continue
                if series.give_availability_back(index, series_uid, study_uid):
                    recovered[series_uid] = study_uid
        report.unavailable_series = sorted(damaged_series)
        report.available_again = sorted(recovered)
    _find_unknown_files(index, data_dir, report, repair)
    return report


def _still_missing(index: Catalog, data_dir: Path, relpath: str, sop_instance_uid: str) -> bool:
    """Inside `writing()`: whether an indexed file found missing still is."""
    known = index.stored_digest(sop_instance_uid)
    return known is not None and known.path == relpath and not (data_dir / relpath).exists()


def _check_file(
    data_dir: Path, relpath: str, size: int, sha256: str, checksum: bool, report: VerifyReport
) -> bool:
    """Check one recorded file into `report`; False when it is missing."""
    path = data_dir / relpath
    try:
        actual_size = path.stat().st_size
    except FileNotFoundError:
        report.missing.append(relpath)
        return False
    if actual_size != size:
        report.wrong_size.append(relpath)
    elif checksum and not files.holds_dataset(path, sha256):
        report.wrong_checksum.append(relpath)
    return True


def _find_unknown_files(index: Catalog, data_dir: Path, report: VerifyReport, repair: bool) -> None:
    for relpath in instance_files(data_dir):
        sop_instance_uid = relpath.name.removesuffix(files.INSTANCE_SUFFIX)
        known = index.digest_hint(sop_instance_uid)
        if (known is not None and known.path == str(relpath)) or _coming_or_going(
            data_dir, relpath
        ):
            continue
        report.unknown_files.append(str(relpath))
        if not repair:
            continue
        try:
            entry = entry_for_file(data_dir, relpath)
            with index.writing(lock_keys=[entry.header.study_uid]):
                # Again in the study's turn, which ingest and deletion take too:
                # what is placed or removed now is theirs.
                if not _coming_or_going(data_dir, relpath) and index_file(index, entry):
                    report.repaired.append(str(relpath))
        except UnindexableFile as exc:
            report.unindexable.append(str(exc))


def _coming_or_going(data_dir: Path, relpath: PurePosixPath) -> bool:
    """Whether a file the index does not know is one an ingest is placing (it
    is linked to its temp file in `.incoming` until the ingest's transaction
    has committed, or a crash's startup recovery has indexed it), one a
    deletion is removing (its journal names it), or gone."""
    try:
        if (data_dir / relpath).stat().st_nlink > 1:
            return True
    except FileNotFoundError:
        return True
    return str(relpath) in files_being_deleted(data_dir)


@dataclass
class RebuildReport:
    instances: int = 0
    conflicts: int = 0
    unindexable: list[str] = field(default_factory=list)
    kept_aside: str | None = None  # where the damaged index was moved
    # What the files cannot tell, taken from the old index: rows per table.
    carried_over: dict[str, int] = field(default_factory=dict)
    not_carried_over: list[str] = field(default_factory=list)  # and why


class RebuildRefused(Exception):
    """`rebuild` cannot run now; the message says why and what to do."""


REBUILD_SUFFIX = ".rebuild"
CORRUPT_SUFFIX = ".corrupt-"  # + the UTC time the damaged index was set aside
_REBUILD_BATCH = 2000


def rebuild(location: IndexLocation, *, progress: Progress = _no_progress) -> RebuildReport:
    """Recreate the index from the files on disk.

    The new index is built beside the files (``index.sqlite.rebuild``, a SQLite
    file whatever the live index is; started afresh on every run, so an
    interrupted rebuild is simply run again). Files are indexed in the order
    they were received, so first-value-wins and the modality order come out as
    live ingest made them. What the files cannot tell (availability, marks,
    overwrite history, storage commitments) is taken from the old index.

    A live index is then replaced in one transaction that ingest waits for —
    safe while `serve` runs: what was indexed after the scan passed its file is
    indexed again from its file. A damaged SQLite index (or none) is replaced
    whole: moved aside under a dated name, with what can still be read of it
    carried over (RebuildRefused while another process has it open).
    """
    data_dir = Path(location.data_dir)
    damage = _damage(location)
    replace_file = file_to_replace(location, damage)
    if replace_file is not None:
        _refuse_if_open(replace_file)
    scratch_path = data_dir / (INDEX_FILENAME + REBUILD_SUFFIX)
    _remove_database(scratch_path)
    report = RebuildReport()
    scratch = scratch_catalog(scratch_path)
    built = False
    try:
        order = _arrival_order(data_dir, report)
        for start in range(0, len(order), _REBUILD_BATCH):
            with scratch.writing():
                for _, relpath in order[start : start + _REBUILD_BATCH]:
                    try:
                        index_file(scratch, entry_for_file(data_dir, relpath))
                        report.instances += 1
                    except UnindexableFile as exc:
                        report.unindexable.append(str(exc))
                    progress(1)
        report.conflicts = _rebuild_conflicts(scratch, data_dir, report)
        if replace_file is None:
            replace_live_rows(
                location, scratch, report.carried_over, functools.partial(_index_again, report)
            )
        elif damage is not None:
            report.not_carried_over += carry_over_damaged(
                replace_file, scratch, data_dir, report.carried_over
            )
        else:
            report.not_carried_over.append(
                f"no index was at {replace_file}: availability set by an admin,"
                " incomplete and complete marks, the overwrite history and storage"
                " commitments start afresh"
            )
        built = True
    finally:
        scratch.close()  # the last connection: its WAL goes into the file
        if not built:
            _remove_database(scratch_path)
    if replace_file is not None:
        if damage is not None:
            _refuse_if_open(replace_file)  # opened since the start? Then it stays.
            report.kept_aside = str(_set_aside(replace_file))
        _put_in_place(scratch_path, replace_file)
    _remove_database(scratch_path)
    return report


def _refuse_if_open(path: Path) -> None:
    if open_in_another_process(path):
        raise RebuildRefused(
            f"{path} is open in another process (imaging-scp serve?): a damaged index is"
            " replaced, not written to; stop that process and run rebuild again"
        )


def _damage(location: IndexLocation) -> IndexCorrupt | None:
    try:
        location.check_intact(quick=False)
    except IndexCorrupt as exc:
        return exc
    return None


def rebuild_size(data_dir: Path) -> int:
    """How many instance files a rebuild will read (for a progress bar)."""
    return sum(1 for _ in instance_files(data_dir))


def _remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", WRITER_LOCK_SUFFIX):
        Path(str(path) + suffix).unlink(missing_ok=True)


def _arrival_order(data_dir: Path, report: RebuildReport) -> list[tuple[str, PurePosixPath]]:
    """(received time, path) of every instance file, oldest first. Reads the
    file meta only, so a million files fit in memory."""
    order = []
    for relpath in instance_files(data_dir):
        path = data_dir / relpath
        try:
            received_at = files.read_file_meta(path).receipt.get("received_at") or _mtime(path)
        except ValueError as exc:
            report.unindexable.append(str(exc))
            continue
        order.append((received_at, relpath))
    order.sort()
    return order


def _rebuild_conflicts(scratch: Catalog, data_dir: Path, report: RebuildReport) -> int:
    count = 0
    with scratch.writing():
        for relpath in conflict_files(data_dir):
            try:
                entry = entry_for_file(data_dir, relpath)
            except UnindexableFile as exc:
                report.unindexable.append(str(exc))
                continue
            scratch.record_conflict(entry, "kept-aside")
            count += 1
    return count


def _index_again(report: RebuildReport, live: Catalog, relpath: str) -> None:
    """Index into the live index, while its rows are replaced, an instance it
    received after the scan of the files passed its place."""
    try:
        index_file(live, entry_for_file(live.location.data_dir, PurePosixPath(relpath)))
        report.instances += 1
    except FileNotFoundError:  # deleted since: neither file nor row
        pass
    except UnindexableFile as exc:
        report.unindexable.append(str(exc))


def _set_aside(path: Path) -> Path:
    """Move a damaged SQLite file and its -wal and -shm to a dated name."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}{CORRUPT_SUFFIX}{stamp}")
    # Its WAL first: left beside the new file, SQLite would read it as the new one's.
    for suffix in ("-wal", "-shm", ""):
        with contextlib.suppress(FileNotFoundError):
            os.rename(f"{path}{suffix}", f"{aside}{suffix}")
    files.fsync_directory(path.parent)
    return aside


def _put_in_place(scratch_path: Path, path: Path) -> None:
    try:
        os.link(scratch_path, path)  # never over an index another process created meanwhile
    except FileExistsError as exc:
        raise RebuildRefused(
            f"an index appeared at {path} while rebuild ran (imaging-scp serve started?):"
            " stop it and run rebuild again"
        ) from exc
    files.fsync_directory(path.parent)
