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
from dataclasses import dataclass, field
from pathlib import Path

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


class InstanceStore:
    """Files and index of one data directory, as the receiver writes them."""

    def __init__(self, data_dir: Path, index: Index, duplicates: DuplicatePolicy):
        self.data_dir = Path(data_dir)
        self.index = index
        self.duplicates = DuplicatePolicy(duplicates)

    def store(
        self,
        dataset: io.BytesIO,
        transfer_syntax: str,
        sop_class_uid: str | None,
        sop_instance_uid: str | None,
        provenance: Provenance,
    ) -> StoreResult:
        """Store one received dataset (its encoded bytes, as sent, in a BytesIO).

        Raises StoreRefused with the reason it was not stored.
        """
        dataset.seek(0)
        header = self._validated_header(dataset, transfer_syntax, sop_class_uid, sop_instance_uid)
        with dataset.getbuffer() as view:
            return self._store(view, header, transfer_syntax, provenance)

    def _store(
        self,
        dataset: memoryview,
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
        size = len(file_header) + len(dataset)
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
        temp = self._write_temp([file_header, dataset])
        try:
            with self.index.writing():
                self._place(temp, entry, result)
        finally:
            # Only after the commit: until then the temp name marks the object as
            # placed but perhaps not indexed, for startup recovery.
            temp.path.unlink(missing_ok=True)
        return result

    def _place(self, temp: files.TempFile, entry: IndexEntry, result: StoreResult) -> None:
        """Move the durable temp file to its place and index it. Inside `writing()`."""
        header = entry.header
        known = self.index.stored_digest(header.sop_instance_uid)
        if known is None:
            try:
                self.index.check_series_study(header.series_uid, header.study_uid)
            except SeriesStudyMismatch as exc:
                raise StoreRefused(Refusal.SERIES_IN_OTHER_STUDY, str(exc)) from exc
            files.link_into_place(
                self.data_dir,
                temp,
                files.instance_relpath(
                    header.study_uid, header.series_uid, header.sop_instance_uid
                ),
            )
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
            files.link_into_place(
                self.data_dir,
                temp,
                files.instance_relpath(
                    header.study_uid, header.series_uid, header.sop_instance_uid
                ),
            )
            self.index.replace_instance(entry)
            self.index.record_conflict(entry, "overwrote")
            result.outcome = Outcome.OVERWRITTEN
            return
        # keep-first, or an overwrite that would move the instance to another
        # series: the first copy stays and the new one is kept aside, not lost.
        aside = files.conflict_relpath(header.sop_instance_uid, entry.sha256)
        files.link_into_place(self.data_dir, temp, aside)
        self.index.record_conflict(dataclasses.replace(entry, path=str(aside)), "kept-aside")
        result.outcome = Outcome.KEPT_ASIDE
        result.path = str(aside)

    def _write_temp(self, parts: list) -> files.TempFile:
        try:
            return files.write_temp_file(self.data_dir, parts)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreRefused(
                    Refusal.OUT_OF_SPACE, "no space left on the receiver's disk"
                ) from exc
            raise StoreRefused(
                Refusal.WRITE_FAILED, f"write failed: {exc.strerror or exc}"
            ) from exc

    def _validated_header(
        self,
        dataset: io.BytesIO,
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


def _shown(uid: str) -> str:
    """A UID as it may appear in a reason: printable, and not unbounded."""
    text = repr(uid)
    return text if len(text) <= MAX_UID_LENGTH + 2 else text[:MAX_UID_LENGTH] + "…"
