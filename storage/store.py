"""Receiving one instance: validate, write durably, index — or refuse with a reason.

`InstanceStore.store` is the whole storage side of a C-STORE. It knows nothing of
the network: the caller hands it the dataset bytes and the request's UIDs, and
maps a `StoreRefused` to a DICOM status. When `store` returns, the file is
durable on disk and the index transaction is committed.
"""

import dataclasses
import enum
import errno
import io
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from storage import files
from storage.header import HeaderError, InstanceHeader, read_header
from storage.index import (
    Index,
    IndexEntry,
    Provenance,
    SeriesStudyMismatch,
    utc_now,
)
from storage.policy import DuplicatePolicy
from storage.uids import MAX_UID_LENGTH, is_valid_uid


class Refusal(enum.Enum):
    """Why an instance was not stored; the caller turns each into a DICOM status."""

    UNREADABLE = "unreadable"
    MISSING_UID = "missing-uid"
    INVALID_UID = "invalid-uid"
    MISMATCH = "mismatch"
    DUPLICATE = "duplicate"
    SERIES_IN_OTHER_STUDY = "series-in-other-study"
    OUT_OF_SPACE = "out-of-space"
    WRITE_FAILED = "write-failed"


class StoreRefused(Exception):
    def __init__(self, refusal: Refusal, reason: str):
        super().__init__(reason)
        self.refusal = refusal
        self.reason = reason


class Outcome(enum.StrEnum):
    STORED = "stored"
    IDENTICAL_RESEND = "identical-resend"
    KEPT_ASIDE = "kept-aside"
    OVERWRITTEN = "overwritten"


@dataclass
class StoreResult:
    outcome: Outcome
    header: InstanceHeader
    path: str
    size: int
    sha256: str
    new_study: bool = False
    new_series: bool = False
    disagreements: list = field(default_factory=list)
    placed: bool = False  # the file got its final name (the index may not have it yet)


class InstanceStore:
    """Files and index of one data directory, as the receiver writes them."""

    def __init__(
        self,
        data_dir: Path,
        index: Index,
        duplicates: DuplicatePolicy,
        min_free: tuple[int, float] = (0, 0.0),
    ):
        """`min_free` is the free-space floor: (bytes, percent of the filesystem)."""
        self.data_dir = Path(data_dir)
        self.index = index
        self.duplicates = DuplicatePolicy(duplicates)
        self.min_free_bytes, self.min_free_percent = min_free

    def has_room(self, incoming: int = 0) -> bool:
        """Whether `incoming` more bytes keep the data filesystem above the floor.

        Checked on every object, so ingest resumes by itself once space is back.
        """
        fs = os.statvfs(self.data_dir)
        free = fs.f_bavail * fs.f_frsize
        floor = max(self.min_free_bytes, fs.f_blocks * fs.f_frsize * self.min_free_percent / 100)
        return free - incoming >= floor

    def store(
        self,
        dataset: BinaryIO,
        transfer_syntax: str,
        sop_class_uid: str | None,
        sop_instance_uid: str | None,
        provenance: Provenance,
    ) -> StoreResult:
        """Store one received dataset: its encoded bytes as sent, in a BytesIO, or
        in a file for a large object that was received to disk.

        Raises StoreRefused with the reason it was not stored.
        """
        dataset.seek(0)
        header = self._validated_header(dataset, transfer_syntax, sop_class_uid, sop_instance_uid)
        if not isinstance(dataset, io.BytesIO):  # a large object received to a file
            return self._store(dataset, header, transfer_syntax, provenance)
        with dataset.getbuffer() as view:
            return self._store(view, header, transfer_syntax, provenance)

    def _store(
        self,
        dataset: files.Part,
        header: InstanceHeader,
        transfer_syntax: str,
        provenance: Provenance,
    ) -> StoreResult:
        sha256 = files.dataset_digest(dataset)
        known = self.index.digest_hint(header.sop_instance_uid)
        if known is not None and known.sha256 == sha256:
            return StoreResult(Outcome.IDENTICAL_RESEND, header, known.path, known.size, sha256)

        received_at = utc_now()
        file_header = files.encode_file_header(
            header.sop_class_uid,
            header.sop_instance_uid,
            transfer_syntax,
            provenance.receipt(received_at),
        )
        size = len(file_header) + files.part_size(dataset)
        relpath = files.instance_relpath(
            header.study_uid, header.series_uid, header.sop_instance_uid
        )
        entry = IndexEntry(
            header=header,
            path=str(relpath),
            size=size,
            sha256=sha256,
            transfer_syntax=transfer_syntax,
            received_at=received_at,
            provenance=provenance,
        )
        result = StoreResult(Outcome.STORED, header, entry.path, size, sha256)
        if not self.has_room(size):
            raise StoreRefused(
                Refusal.OUT_OF_SPACE, "receiver's disk is below its free-space floor"
            )
        temp = self._write_temp([file_header, dataset])
        try:
            with self.index.writing():
                self._place(temp, entry, result)
        except sqlite3.OperationalError as exc:
            self._undo_placing(temp, result)
            if "full" in str(exc):
                raise StoreRefused(Refusal.OUT_OF_SPACE, "index: no space left on disk") from exc
            raise StoreRefused(Refusal.WRITE_FAILED, f"index write failed: {exc}") from exc
        except OSError as exc:
            self._undo_placing(temp, result)
            raise StoreRefused(_refusal_for(exc), f"placing failed: {exc.strerror}") from exc
        except BaseException:
            self._undo_placing(temp, result)
            raise
        else:
            # Only after the commit: until then the temp name marks the object as
            # placed but perhaps not indexed, for startup recovery.
            temp.path.unlink(missing_ok=True)
        return result

    def _undo_placing(self, temp: files.TempFile, result: StoreResult) -> None:
        """After a failed index transaction: the sender gets a failure, so leave
        no file without its row."""
        if result.outcome is Outcome.OVERWRITTEN:
            return  # the old copy is gone: startup recovery records the new one
        if result.placed:
            (self.data_dir / result.path).unlink(missing_ok=True)
        temp.path.unlink(missing_ok=True)

    def _place(self, temp: files.TempFile, entry: IndexEntry, result: StoreResult) -> None:
        """Give the durable temp file its place and index it. Inside `writing()`."""
        header = entry.header
        relpath = PurePosixPath(entry.path)
        known = self.index.stored_digest(header.sop_instance_uid)
        if known is None:
            try:
                self.index.check_series_study(header.series_uid, header.study_uid)
            except SeriesStudyMismatch as exc:
                raise StoreRefused(Refusal.SERIES_IN_OTHER_STUDY, str(exc)) from exc
            self._link(temp, relpath, result, Outcome.STORED)
            outcome = self.index.index_instance(entry)
            result.new_study = outcome.new_study
            result.new_series = outcome.new_series
            result.disagreements = outcome.disagreements
            return
        result.path = known.path
        if known.sha256 == entry.sha256:  # an identical copy won the race
            result.outcome = Outcome.IDENTICAL_RESEND
            return
        if self.duplicates is DuplicatePolicy.REJECT:
            raise StoreRefused(
                Refusal.DUPLICATE,
                "SOP Instance UID already stored with different content",
            )
        same_place = (known.study_uid, known.series_uid) == (header.study_uid, header.series_uid)
        if self.duplicates is DuplicatePolicy.OVERWRITE and same_place:
            self._link(temp, relpath, result, Outcome.OVERWRITTEN)
            self.index.replace_instance(entry)
            self.index.record_conflict(entry, "overwrote")
            return
        # keep-first, or an overwrite that would move the instance to another
        # series: the first copy stays and the new one is kept aside, not lost.
        aside = files.conflict_relpath(header.sop_instance_uid, entry.sha256)
        if (self.data_dir / aside).exists():  # these very bytes were kept aside before
            result.outcome, result.path = Outcome.KEPT_ASIDE, str(aside)
            return
        self._link(temp, aside, result, Outcome.KEPT_ASIDE)
        self.index.record_conflict(dataclasses.replace(entry, path=str(aside)), "kept-aside")

    def _link(self, temp: files.TempFile, relpath, result: StoreResult, outcome: Outcome) -> None:
        result.outcome, result.path = outcome, str(relpath)
        files.link_into_place(self.data_dir, temp, relpath)
        result.placed = True

    def _write_temp(self, parts: list) -> files.TempFile:
        try:
            return files.write_temp_file(self.data_dir, parts)
        except OSError as exc:
            raise StoreRefused(_refusal_for(exc), f"write failed: {exc.strerror or exc}") from exc

    def _validated_header(
        self,
        dataset: BinaryIO,
        transfer_syntax: str,
        sop_class_uid: str | None,
        sop_instance_uid: str | None,
    ) -> InstanceHeader:
        for name, uid in (
            ("Affected SOP Class UID", sop_class_uid),
            ("Affected SOP Instance UID", sop_instance_uid),
        ):
            if not uid:
                raise StoreRefused(Refusal.MISSING_UID, f"request has no {name}")
            if not is_valid_uid(uid):
                raise StoreRefused(Refusal.INVALID_UID, f"invalid {name} {_shown(uid)}")
        try:
            header = read_header(dataset, transfer_syntax)
        except HeaderError as exc:
            raise StoreRefused(Refusal.UNREADABLE, str(exc)) from exc
        for name, uid in (
            ("SOP Class UID", header.sop_class_uid),
            ("SOP Instance UID", header.sop_instance_uid),
            ("Study Instance UID", header.study_uid),
            ("Series Instance UID", header.series_uid),
        ):
            if not uid:
                raise StoreRefused(Refusal.MISSING_UID, f"dataset has no {name}")
            if not is_valid_uid(uid):
                raise StoreRefused(Refusal.INVALID_UID, f"invalid {name} {_shown(uid)}")
        if header.sop_class_uid != sop_class_uid:
            raise StoreRefused(Refusal.MISMATCH, "dataset SOP Class UID differs from the request")
        if header.sop_instance_uid != sop_instance_uid:
            raise StoreRefused(
                Refusal.MISMATCH, "dataset SOP Instance UID differs from the request"
            )
        return header


def _refusal_for(error: OSError) -> Refusal:
    return (
        Refusal.OUT_OF_SPACE
        if error.errno in (errno.ENOSPC, errno.EDQUOT)
        else Refusal.WRITE_FAILED
    )


def _shown(uid: str) -> str:
    """A UID as it may appear in a reason: printable, and not unbounded."""
    text = repr(uid)
    return text if len(text) <= MAX_UID_LENGTH + 2 else text[:MAX_UID_LENGTH] + "…"
