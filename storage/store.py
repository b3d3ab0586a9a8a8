"""Receiving one instance: validate, write durably, index — or refuse with a reason.

`InstanceStore.receive` is the whole storage side of a C-STORE. It knows nothing
of the network: the caller names the request's UIDs, hands over the dataset's
bytes as they arrive (`IncomingInstance.write`), and maps a `StoreRefused` from
`finish` to a DICOM status. When `finish` returns, the file is durable on disk
and the index transaction is committed.
"""

import dataclasses
import enum
import errno
import functools
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from storage import files
from storage.catalog import (
    Catalog,
    IndexEntry,
    IndexOutcome,
    Provenance,
    StoredDigest,
    utc_now,
)
from storage.catalog.engines import IndexFailed, IndexTimedOut
from storage.catalog.health import IndexInterrupted, IndexUnavailable
from storage.catalog.ingest import PatientConflict, SeriesStudyMismatch
from storage.codec.walk import HeaderError
from storage.header import DatasetWalk, InstanceHeader, read_header, walkable
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
    OTHER_PATIENT = "other-patient"  # than its study's: listed in conflicts
    OUT_OF_SPACE = "out-of-space"
    WRITE_FAILED = "write-failed"
    INDEX_CORRUPT = "index-corrupt"  # the reason names the file and what to do


class StoreRefused(Exception):
    def __init__(
        self,
        refusal: Refusal,
        reason: str,
        header: InstanceHeader | None = None,
        *,
        comment: str | None = None,
        details: dict | None = None,
    ):
        super().__init__(reason)
        self.refusal = refusal
        self.reason = reason  # whole, for the log
        self.header = header  # the dataset's, when it was read before the refusal
        # For the sender, where 64 characters fit (a C-STORE's ErrorComment is
        # an LO; scp.dimse.fitted_comment keeps its first whole words): a
        # reason whose point is not in its first words says it shorter here.
        self.comment = comment or reason
        self.details = details or {}  # more fields for the log event


class Outcome(enum.StrEnum):
    STORED = "stored"
    IDENTICAL_RESEND = "identical-resend"
    KEPT_ASIDE = "kept-aside"
    OVERWRITTEN = "overwritten"
    RESTORED = "restored"  # an identical resend of an instance whose file was gone or damaged


@dataclass
class StoreResult:
    outcome: Outcome
    header: InstanceHeader
    path: str
    size: int
    sha256: str
    disagreements: list = field(default_factory=list)
    placed: bool = False  # the file got its final name (the index may not have it yet)
    # (study, series) the index holds the SOP Instance UID under, when not this
    # copy's: a copy kept aside whose first copy is in another series.
    indexed_under: tuple[str, str] | None = None
    timings: dict = field(default_factory=dict)  # stage: milliseconds, for the log

    def log_fields(self) -> dict:
        """What an `instance.stored` event says of it, over DICOM or STOW-RS."""
        header = self.header
        return {
            "study_uid": header.study_uid,
            "series_uid": header.series_uid,
            "sop_instance_uid": header.sop_instance_uid,
            "outcome": str(self.outcome),
            "bytes": self.size,
            "timings": self.timings,
        }


class InstanceStore:
    """Files and index of one data directory, as the receiver writes them."""

    def __init__(
        self,
        data_dir: Path,
        index: Catalog,
        duplicates: DuplicatePolicy,
        min_free: tuple[int, float] = (0, 0.0),
        *,
        node: str,
    ):
        """`min_free` is the free-space floor: (bytes, percent of the filesystem);
        `node` names this node's temp directory (scp.config.Config.node)."""
        self.data_dir = Path(data_dir)
        self.incoming = files.incoming_dir(self.data_dir, node)
        self.index = index
        self.duplicates = DuplicatePolicy(duplicates)
        self.min_free_bytes, self.min_free_percent = min_free

    def has_room(self) -> bool:
        """Whether the data filesystem is above the free-space floor.

        Checked for each new association and for each object once it is written
        to its temp file, so ingest resumes by itself once space is back.
        """
        free, floor = self.free_space()
        return free >= floor

    def free_space(self) -> tuple[int, float]:
        """The data filesystem's free bytes (for this user), and the floor in bytes."""
        fs = os.statvfs(self.data_dir)
        floor = max(self.min_free_bytes, fs.f_blocks * fs.f_frsize * self.min_free_percent / 100)
        return fs.f_bavail * fs.f_frsize, floor

    def receive(
        self,
        transfer_syntax: str,
        sop_class_uid: str | None,
        sop_instance_uid: str | None,
        provenance: Provenance,
    ) -> "IncomingInstance":
        """Start receiving one dataset, announced by a request with these UIDs.
        Feed its bytes to `write` as they arrive, then call `finish`."""
        return IncomingInstance(self, transfer_syntax, sop_class_uid, sop_instance_uid, provenance)

    def keep_received(self, incoming: "IncomingInstance", header: InstanceHeader) -> StoreResult:
        """Make a received, checked dataset durable and index it (or see that it is
        an identical resend). Called by `IncomingInstance.finish`."""
        temp_writer = incoming.temp
        sha256 = incoming.digest.hexdigest()
        uid = header.sop_instance_uid
        relpath = files.instance_relpath(
            header.study_uid, header.series_uid, header.sop_instance_uid
        )
        # An identical resend has the same study and series, so its file is at
        # this place. In-process (SQLite, a local disk) the index is asked only
        # when something is there, and the resend is answered before anything is
        # made durable: a new instance pays one stat, not a query. With
        # PostgreSQL the data directory is shared storage, where a stat is a round
        # trip of its own: the link below finds what is in place. A resend this
        # misses (its file gone, or of other content elsewhere) is told apart in
        # the transaction.
        known = None
        if not self.index.shared_by_nodes and (self.data_dir / relpath).exists():
            known = self.index.digest_hint(uid)
            if self._identical(known, sha256):
                temp_writer.discard()
                return _identical_resend(header, known)
        size = temp_writer.size
        if not self.has_room():  # measured with the object's bytes already on the disk
            known = known or self.index.digest_hint(uid)
            temp_writer.discard()
            if self._identical(known, sha256):  # nothing new to keep
                return _identical_resend(header, known)
            raise StoreRefused(
                Refusal.OUT_OF_SPACE, "receiver's disk is below its free-space floor"
            )
        entry = IndexEntry(
            header=header,
            path=str(relpath),
            size=size,
            sha256=sha256,
            transfer_syntax=incoming.transfer_syntax,
            received_at=incoming.received_at,
            provenance=incoming.provenance,
        )
        result = StoreResult(Outcome.STORED, header, entry.path, size, sha256)
        result.timings = timings = incoming.timings
        started = time.perf_counter()
        try:
            temp = temp_writer.durable()
        except OSError as exc:
            temp_writer.discard()
            raise StoreRefused(_refusal_for(exc), f"write failed: {exc.strerror or exc}") from exc
        timings["fsync"] = _ms_since(started)
        try:
            if known is None:
                # Most likely a new instance: placed (link, directory fsync) before
                # the transaction, so that the group commits only index rows while
                # several associations' directory fsyncs overlap. `_place` checks
                # again inside the transaction, and undoes it if a row appeared.
                try:
                    self._link(temp, entry.path, result, Outcome.STORED, new=True)
                except FileExistsError:
                    # Something is at its place: most likely a resend (come since
                    # the look above, on SQLite). The stored copy is read here,
                    # not in the writer's section.
                    known = self.index.digest_hint(uid)
                    if self._identical(known, sha256):
                        temp.path.unlink(missing_ok=True)
                        return _identical_resend(header, known)
            placed_before = result.placed
            started = time.perf_counter()
            work = functools.partial(self._place, temp, entry, result, known)
            if placed_before:  # a new instance, most likely
                found = self.index.index_new_instance(entry, otherwise=work)
                if isinstance(found, IndexOutcome):
                    result.disagreements = found.disagreements
            else:
                self.index.commit_together(work, lock_key=header.study_uid)
        except IndexInterrupted as lost:
            self._settle_lost(temp, entry, result, lost)
        except (IndexUnavailable, IndexTimedOut) as exc:  # nothing was sent
            self._undo_placing(temp, result)
            raise StoreRefused(Refusal.WRITE_FAILED, str(exc), comment=exc.comment) from exc
        except IndexFailed as exc:
            self._undo_placing(temp, result)
            raise self.index_refusal(exc, "index write failed") from exc
        except OSError as exc:
            self._undo_placing(temp, result)
            raise StoreRefused(_refusal_for(exc), f"placing failed: {exc.strerror}") from exc
        except StoreRefused as refused:
            self._undo_placing(temp, result)
            if refused.refusal is Refusal.OTHER_PATIENT:
                self._record_refusal(entry, refused)
            raise
        except BaseException:
            self._undo_placing(temp, result)
            raise
        else:
            # Only after the commit: until then the temp name marks the object as
            # placed but perhaps not indexed, for startup recovery.
            temp.path.unlink(missing_ok=True)
        placing = 0.0 if placed_before else timings.get("place", 0.0)  # inside the transaction
        timings["index"] = round(_ms_since(started) - placing, 3)
        return result

    def _record_refusal(self, entry: IndexEntry, refused: StoreRefused) -> None:
        """List a refused instance in conflicts, in a transaction of its own (its
        instance's was rolled back). The refusal stands if this fails."""
        try:
            self.index.commit_together(
                functools.partial(self.index.record_refusal, entry, refused.reason),
                lock_key=entry.header.study_uid,
            )
        except IndexFailed as exc:
            refused.reason += f"; not listed in conflicts: {exc}"

    def index_refusal(self, exc: IndexFailed, failed: str) -> StoreRefused:
        """Why the index failed an instance: a full disk, a damaged SQLite file
        (the admin must rebuild it), or the error itself after `failed`."""
        if exc.out_of_space:
            return StoreRefused(Refusal.OUT_OF_SPACE, "index: no space left on disk")
        damage = self.index.location.corruption(exc)
        if damage is not None:
            return StoreRefused(
                Refusal.INDEX_CORRUPT,
                str(damage),
                comment="receiver's index is damaged: its admin must run rebuild",
            )
        return StoreRefused(Refusal.WRITE_FAILED, f"{failed}: {exc}")

    def _settle_lost(
        self, temp: files.TempFile, entry: IndexEntry, result: StoreResult, lost: IndexInterrupted
    ) -> None:
        """The connection was lost with the instance's transaction on its way:
        its COMMIT may have landed. Returns (the instance is stored) when the
        index, read back on a new connection, holds it; else nothing of it is
        kept and the sender is refused. When the index cannot be read back
        before the sender's deadline, the file stays (with its temp name, as
        startup recovery knows it) until the index answers again, and the
        sender is refused: it sends again, and its resend finds what was kept."""
        uid = entry.header.sop_instance_uid
        settle = functools.partial(self._settle, temp, result, entry.sha256)
        try:
            known = self.index.read_back(uid, lost.deadline)
        except (IndexUnavailable, IndexTimedOut, IndexFailed) as exc:
            self.index.settle_later(uid, settle)
            raise StoreRefused(
                Refusal.WRITE_FAILED,
                f"{lost}; whether the instance was indexed is read back once the index"
                " answers again: send it again",
                comment=lost.comment,
            ) from exc
        if not settle(known):
            raise StoreRefused(
                Refusal.WRITE_FAILED,
                f"{lost}; the instance was not indexed and nothing of it was kept: send it again",
                comment=lost.comment,
            ) from lost

    def _settle(
        self, temp: files.TempFile, result: StoreResult, sha256: str, known: StoredDigest | None
    ) -> bool:
        """After a lost answer, with `known` what the index holds now: whether
        the instance's transaction committed. Its temp name goes either way;
        its file only when the index does not point at it."""
        if known is not None and known.path == result.path:
            temp.path.unlink(missing_ok=True)
            return known.sha256 == sha256
        self._undo_placing(temp, result)
        return False

    def _identical(self, known: StoredDigest | None, sha256: str) -> bool:
        return known is not None and known.sha256 == sha256 and self._intact(known)

    def _intact(self, known: StoredDigest) -> bool:
        """Whether the indexed file is there with the bytes it was indexed with.
        Read only for a resend: what `verify` or a storage commitment found
        damaged or gone, the sender's resend puts back."""
        return files.holds_dataset(self.data_dir / known.path, known.sha256, known.size)

    def _undo_placing(self, temp: files.TempFile, result: StoreResult) -> None:
        """After a failed index transaction: the sender gets a failure, so leave
        no file without its row."""
        if result.outcome in (Outcome.OVERWRITTEN, Outcome.RESTORED):
            return  # the old copy is gone: startup recovery records the new one
        if result.placed:
            (self.data_dir / result.path).unlink(missing_ok=True)
        temp.path.unlink(missing_ok=True)

    def _place(
        self,
        temp: files.TempFile,
        entry: IndexEntry,
        result: StoreResult,
        seen_before: StoredDigest | None,
    ) -> None:
        """Give the durable temp file its place and index it, inside a transaction.
        `seen_before`: the indexed copy as read before the transaction, already
        found not to be an identical, intact one."""
        header = entry.header
        try:
            found = self.index.index_if_new(entry)
        except SeriesStudyMismatch as exc:
            raise StoreRefused(
                Refusal.SERIES_IN_OTHER_STUDY,
                str(exc),
                comment="series already indexed under another study; the log names it",
            ) from exc
        except PatientConflict as exc:
            indexed, received = exc.indexed, exc.received
            raise StoreRefused(
                Refusal.OTHER_PATIENT,
                str(exc),
                comment=exc.comment,
                details={
                    "study_uid": exc.study_uid,
                    "study_patient_id": indexed.id,
                    "study_issuer_of_patient_id": indexed.issuer,
                    "study_patient_name": indexed.name,
                    "patient_id": received.id,
                    "issuer_of_patient_id": received.issuer,
                    "patient_name": received.name,
                },
            ) from exc
        # Only now is the study's turn surely taken: on PostgreSQL, BEGIN and the
        # study's lock go to the server with the transaction's first statement.
        if result.placed and os.stat(temp.path).st_nlink < 2:
            # Linked before the transaction (its only other name), and since
            # removed or replaced: a deletion of its study took the file at this
            # path (whose row it had deleted), or another copy of this instance
            # took its place. Seen under the study's turn, which such a deletion
            # takes too; linked again below if this instance is the one indexed.
            result.placed = False
        if isinstance(found, IndexOutcome):  # a new instance, indexed
            if not result.placed:
                self._link(temp, entry.path, result, Outcome.STORED)
            result.disagreements = found.disagreements
            return
        known = found
        if result.placed:  # placed before the transaction, but a row came first
            (self.data_dir / result.path).unlink(missing_ok=True)
            result.placed = False
        result.path = known.path
        if known.sha256 == entry.sha256:
            if known != seen_before and self._intact(known):  # an identical copy won the race
                result.outcome = Outcome.IDENTICAL_RESEND
                return
            # The indexed file is gone or damaged: the sender resends what a
            # commitment or `verify` found wrong, and it is put back in place.
            self._link(temp, known.path, result, Outcome.RESTORED)
            self.index.replace_instance(dataclasses.replace(entry, path=known.path))
            return
        if self.duplicates is DuplicatePolicy.REJECT:
            raise StoreRefused(
                Refusal.DUPLICATE,
                "SOP Instance UID already stored with different content",
            )
        same_place = (known.study_uid, known.series_uid) == (header.study_uid, header.series_uid)
        if self.duplicates is DuplicatePolicy.OVERWRITE and same_place:
            self._link(temp, entry.path, result, Outcome.OVERWRITTEN)
            self.index.replace_instance(entry)
            self.index.record_conflict(entry, "overwrote")
            return
        # keep-first, or an overwrite that would move the instance to another
        # series: the first copy stays and the new one is kept aside, not lost.
        if not same_place:
            result.indexed_under = (known.study_uid, known.series_uid)
        aside = files.conflict_relpath(header.sop_instance_uid, entry.sha256)
        linked_by_us = result.placed and result.path == str(aside)  # a transaction run again
        if (self.data_dir / aside).exists() and not linked_by_us:  # kept aside before
            result.outcome, result.path = Outcome.KEPT_ASIDE, str(aside)
            return
        self._link(temp, aside, result, Outcome.KEPT_ASIDE)
        self.index.record_conflict(dataclasses.replace(entry, path=str(aside)), "kept-aside")

    def _link(
        self,
        temp: files.TempFile,
        relpath,
        result: StoreResult,
        outcome: Outcome,
        *,
        new: bool = False,
    ) -> None:
        """Link the temp file at `relpath`; with `new`, FileExistsError when
        something is there already (nothing is replaced)."""
        started = time.perf_counter()
        files.link_into_place(self.data_dir, temp, relpath, replace=not new)
        result.outcome, result.path = outcome, str(relpath)
        result.placed = True
        result.timings["place"] = _ms_since(started)


class IncomingInstance:
    """One dataset on its way in. Its bytes go to a temp file in `.incoming` as
    they arrive, through the SHA-256 and the header walk, so that an object of
    any size is read once and never held in memory. A refusal known early (the
    request's UIDs, a full disk, a write error) is kept and raised by `finish`:
    the sender is still sending, and its bytes are taken and dropped.
    """

    def __init__(
        self,
        store: InstanceStore,
        transfer_syntax: str,
        sop_class_uid: str | None,
        sop_instance_uid: str | None,
        provenance: Provenance,
    ):
        self.store = store
        self.transfer_syntax = transfer_syntax
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.provenance = provenance
        self.received_at = utc_now()
        self.timings: dict[str, float] = {}
        self._started = time.perf_counter()
        self.digest = hashlib.sha256()
        self.temp: files.TempWriter | None = None
        self._walk = DatasetWalk(transfer_syntax) if walkable(transfer_syntax) else None
        self._refused: StoreRefused | None = None
        try:
            _check_request_uids(sop_class_uid, sop_instance_uid)
            head = files.encode_file_header(
                sop_class_uid,
                sop_instance_uid,
                transfer_syntax,
                provenance.receipt(self.received_at),
            )
            # The digest covers what follows `head`: where every reader finds the dataset.
            self._dataset_offset = files.dataset_offset(head)
            self.temp = files.TempWriter(store.incoming, head)
        except StoreRefused as refused:
            self._refuse(refused)
        except OSError as exc:
            self._refuse(StoreRefused(_refusal_for(exc), f"write failed: {exc.strerror or exc}"))

    def write(self, data) -> None:
        """The next bytes of the dataset (a view the caller reuses afterwards)."""
        if self._refused is not None:
            return
        try:
            self.temp.write(data)
        except OSError as exc:
            self._refuse(StoreRefused(_refusal_for(exc), f"write failed: {exc.strerror or exc}"))
            return
        self.digest.update(data)
        if self._walk is not None:
            self._walk.feed(data)

    def finish(self) -> StoreResult:
        """The dataset is complete: check it, make it durable, index it.
        Raises StoreRefused; nothing of a refused object stays on disk."""
        self.timings["receive"] = _ms_since(self._started)
        if self._refused is not None:
            raise self._refused
        started = time.perf_counter()
        try:
            header = self._validated_header()
        except StoreRefused:
            self.temp.discard()
            raise
        self.timings["check"] = _ms_since(started)
        try:
            return self.store.keep_received(self, header)
        except IndexFailed as exc:  # a look at the index before its transaction
            self.temp.discard()
            raise self.store.index_refusal(exc, "index read failed") from exc

    def discard(self) -> None:
        """The transfer broke off: leave nothing behind."""
        if self.temp is not None:
            self.temp.discard()

    def _refuse(self, refused: StoreRefused) -> None:
        self._refused = refused
        self._walk = None
        self.discard()

    def _validated_header(self) -> InstanceHeader:
        try:
            if self._walk is not None:
                header = self._walk.finish()
            else:  # big endian or deflated: pydicom reads the file (see storage.header)
                with open(self.temp.path, "rb") as handle:
                    handle.seek(self._dataset_offset)
                    header = read_header(handle, self.transfer_syntax)
        except HeaderError as exc:
            raise StoreRefused(Refusal.UNREADABLE, str(exc)) from exc
        for name, uid, requested in (
            ("SOP Class UID", header.sop_class_uid, self.sop_class_uid),
            ("SOP Instance UID", header.sop_instance_uid, self.sop_instance_uid),
            ("Study Instance UID", header.study_uid, None),
            ("Series Instance UID", header.series_uid, None),
        ):
            if not uid:
                raise StoreRefused(Refusal.MISSING_UID, f"dataset has no {name}")
            if uid != requested and not is_valid_uid(uid):  # the request's are checked
                raise StoreRefused(Refusal.INVALID_UID, f"invalid {name} {_shown(uid)}")
        if header.sop_class_uid != self.sop_class_uid:
            raise StoreRefused(
                Refusal.MISMATCH, "dataset SOP Class UID differs from the request", header
            )
        if header.sop_instance_uid != self.sop_instance_uid:
            raise StoreRefused(
                Refusal.MISMATCH, "dataset SOP Instance UID differs from the request", header
            )
        return header


def _identical_resend(header: InstanceHeader, known: StoredDigest) -> StoreResult:
    return StoreResult(Outcome.IDENTICAL_RESEND, header, known.path, known.size, known.sha256)


def _check_request_uids(sop_class_uid: str | None, sop_instance_uid: str | None) -> None:
    for name, uid in (
        ("Affected SOP Class UID", sop_class_uid),
        ("Affected SOP Instance UID", sop_instance_uid),
    ):
        if not uid:
            raise StoreRefused(Refusal.MISSING_UID, f"request has no {name}")
        if not is_valid_uid(uid):
            raise StoreRefused(Refusal.INVALID_UID, f"invalid {name} {_shown(uid)}")


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


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
