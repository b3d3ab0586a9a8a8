"""The C-STORE sub-operations of a retrieve (C-MOVE, C-GET, `imaging-scp send`):
stored instances sent as they were received.

Each match comes from the index's cursor (`CatalogReader.retrieve`).
Its file is checked against the index before a byte goes out (its size, and
the SHA-256 of its data set), then its data set (the bytes after the File Meta
group) is streamed from the file a PDU at a time: memory does not grow with the
object, nor with the number of matches. A match that cannot be sent (its
series OFFLINE or UNAVAILABLE, its file missing or not as indexed, no context
the destination accepted for it) is a failed sub-operation with the reason
logged (`retrieve.failed`) and its UID in the Failed SOP Instance UID List.

`Tally` counts the sub-operations and encodes the retrieve's responses;
`Destination` sends sub-operations on associations of ours (C-MOVE, `send`).
"""

import functools
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pydicom.uid import UID

from scp import dimse
from scp.upper_layer import (
    AssociationError,
    NoAnswer,
    Proposal,
    RequestorAssociation,
    lazily_mapped,
)
from storage.catalog.find import StoredInstance
from storage.catalog.lifecycle import OFFLINE, UNAVAILABLE
from storage.codec.datasets import reencode_dataset
from storage.codec.elements import encode_element, pad
from storage.codec.syntax import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)
from storage.codec.syntax import transfer_syntax as syntax_of
from storage.files import dataset_offset

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
WARNING = 0xB000  # some sub-operations failed or warned
UNABLE_TO_PERFORM_SUB_OPERATIONS = 0xA702  # none could be sent
# A Pending response at most this long after the previous response, when a
# sub-operation ends then (and never more than one per sub-operation).
PENDING_INTERVAL = 0.5

_FAILED_SOP_INSTANCE_UID_LIST = 0x00080058
_HEAD = 128 + 4 + 12  # preamble, DICM, File Meta Information Group Length
# The buffer a retrieve reads its data sets through (`ReadBuffer`).
_READ_BUFFER = 1 << 20
# The size from which a file is checked in the checker thread (`Matches`):
# handing a check over costs ~0.1 ms of CPU, what reading and hashing 128 KiB
# takes. A smaller one is checked in the retrieve's thread.
_CHECK_AHEAD_FROM = 128 * 1024


class Unsendable(Exception):
    """A match that cannot be sent; the message says why."""


class DestinationLost(Exception):
    """No match can be sent any more: no new association with the destination,
    or it stopped answering. The message says why."""


class ReadBuffer:
    """The one buffer a retrieve's data sets are read through, kept for all of
    them: a fresh megabyte per sub-operation had its pages faulted in each
    time. Its pages are mapped only as far as the data sets reach."""

    def __init__(self):
        self.view = memoryview(lazily_mapped(_READ_BUFFER))


@dataclass(frozen=True)
class Dataset:
    """A stored data set, checked and ready to be sent: held in the read
    buffer when it fits (read once), else read again from `source`."""

    source: BinaryIO  # positioned at the data set's first byte
    length: int
    held: memoryview | None  # the whole data set, when it fits the read buffer
    buffer: ReadBuffer

    def pieces(self):
        """The data set's bytes in order, as views of the read buffer (each
        valid until the next is taken); OSError when the file fails."""
        if self.held is not None:
            yield self.held
            return
        left = self.length
        while left > 0:
            got = self.source.readinto(self.buffer.view[: min(left, _READ_BUFFER)])
            if not got:
                raise OSError(f"the file ends {left} bytes early")
            left -= got
            yield self.buffer.view[:got]

    def converted(self, instance: StoredInstance, syntax: str) -> bytes:
        """The data set encoded in `syntax` (read whole: a conversion is the
        exception, for a destination that does not take the stored syntax)."""
        data = bytes(self.held) if self.held is not None else self.source.read(self.length)
        try:
            return reencode_dataset(data, instance.transfer_syntax, syntax)
        except Exception as exc:  # pydicom raises many kinds on a malformed value
            raise Unsendable(f"it does not convert to {UID(syntax).name}: {exc}") from exc


def open_dataset(data_dir: Path, instance: StoredInstance, buffer: ReadBuffer) -> Dataset:
    """The data set of a stored instance, its file checked against the index
    (size, SHA-256 of the data set); Unsendable when it is not to be sent."""
    if instance.series_availability in (OFFLINE, UNAVAILABLE):
        raise Unsendable(f"its series is {instance.series_availability}")
    try:
        # Unbuffered: the data set is read into the read buffer directly.
        source = open(data_dir / instance.path, "rb", buffering=0)  # noqa: SIM115 (closed by the caller)
    except FileNotFoundError as exc:
        raise Unsendable(f"its file {instance.path} is missing") from exc
    except OSError as exc:
        raise Unsendable(f"its file {instance.path} cannot be read: {exc.strerror}") from exc
    try:
        size = os.fstat(source.fileno()).st_size
        if size != instance.size:
            raise Unsendable(
                f"its file {instance.path} is {size} bytes, {instance.size} were stored"
            )
        view = buffer.view
        if size <= len(view):  # the whole file in one read: its data set stays in the buffer
            _read_into(source, view[:size])
            offset = _offset(bytes(view[:_HEAD]), size)
            held = view[offset:size]
            digest = hashlib.sha256(held)
        else:
            offset = _offset(source.read(_HEAD), size)
            source.seek(offset)
            held, digest = None, hashlib.sha256()
            while got := source.readinto(view):
                digest.update(view[:got])
            source.seek(offset)
        if digest.hexdigest() != instance.sha256:
            raise Unsendable(f"its file {instance.path} no longer holds the data set received")
    except (OSError, ValueError) as exc:
        source.close()
        raise Unsendable(f"its file {instance.path} cannot be read: {exc}") from exc
    except Unsendable:
        source.close()
        raise
    return Dataset(source, size - offset, held, buffer)


def _read_into(source: BinaryIO, view: memoryview) -> None:
    """Fill `view` from `source`; OSError when the file ends first."""
    filled = 0
    while filled < len(view):
        got = source.readinto(view[filled:])
        if not got:
            raise OSError(f"the file ends {len(view) - filled} bytes early")
        filled += got


def _offset(head: bytes, size: int) -> int:
    """Where the data set of a `size`-byte file starts, from its first bytes
    (`dataset_offset`)."""
    offset = dataset_offset(head)
    if offset > size:
        raise ValueError(f"its meta group ends at byte {offset}, after the file's end")
    return offset


def choose_syntax(instance: StoredInstance, accepted: Iterable[str]) -> str:
    """The transfer syntax to send `instance` in, among those accepted for its
    SOP class: the stored one, else for an uncompressed little endian object
    Explicit or Implicit VR Little Endian (converted). Never a compressed one
    for another: Unsendable then, as when there is none."""
    accepted = set(accepted)
    stored = instance.transfer_syntax
    if stored in accepted:
        return stored
    syntax = syntax_of(stored)
    if not syntax.encapsulated and syntax.little_endian:
        for convertible in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN):
            if convertible in accepted:
                return convertible
    offered = ", ".join(UID(uid).name for uid in sorted(accepted)) or "nothing"
    raise Unsendable(
        f"the destination accepts no {UID(instance.transfer_syntax).name}"
        f" for the {UID(instance.sop_class_uid).name} (only {offered})"
    )


class Match:
    """One match of a retrieve, and the check of its file (`open_dataset`),
    started ahead (`Matches`)."""

    def __init__(self, instance: StoredInstance, checked: Future):
        self.instance = instance
        self._checked = checked

    def dataset(self) -> Dataset:
        """Its data set, checked; Unsendable when it is not to be sent."""
        return self._checked.result()

    def close(self) -> None:
        if self._checked.exception() is None:  # waits for the check
            self._checked.result().source.close()


class Matches:
    """A retrieve's matches, from the index's cursor, each one's file checked
    one match ahead, while the one before is on its way: a large file in a
    thread of the retrieve's own as soon as the match before it is taken (the
    file is read and hashed, and hashlib lets go of the GIL, while that match
    is sent), a small one in the retrieve's thread while the C-STORE-RSP to
    the match before is awaited (`check_ahead`). Two read buffers take turns;
    a match's own is free again when the next match is taken."""

    def __init__(self, data_dir: Path, rows: Iterator[StoredInstance]):
        self.data_dir = data_dir
        self._rows = rows
        self._buffers = (ReadBuffer(), ReadBuffer())
        self._turn = 0
        self._checker = ThreadPoolExecutor(1, thread_name_prefix="imaging-scp-check")
        self._current: Match | None = None
        self._ahead: Match | None = None  # the next match, its check started
        self._following: StoredInstance | None = None  # the next match, to be checked
        self._unread: Exception | None = None  # the cursor failed reading the next row

    def __iter__(self) -> "Matches":
        return self

    def __next__(self) -> Match:
        if self._current is not None:  # sent, or failed: its buffer is free
            self._current.close()
            self._current = None
        if self._ahead is None and self._following is None:  # the first, or none left
            if self._unread is not None:
                raise self._unread
            self._following = next(self._rows)  # StopIteration after the last
        self.check_ahead()
        self._current, self._ahead = self._ahead, None
        try:
            following = next(self._rows, None)
        except Exception as exc:  # the index's: raised in its turn, after this match
            self._unread = exc
        else:
            if following is not None:
                self._following = following
                if following.size >= _CHECK_AHEAD_FROM:
                    self.check_ahead()
        return self._current

    def check_ahead(self) -> None:
        """Check the next match's file now, if not started yet: called by the
        sender while it waits for the answer to the current match."""
        if self._following is not None:
            self._ahead, self._following = self._check(self._following), None

    def unsent(self) -> Iterator[StoredInstance]:
        """The matches not taken yet, unchecked (they are not to be sent)."""
        if self._ahead is not None:
            self._ahead.close()
            yield self._ahead.instance
            self._ahead = None
        if self._following is not None:
            yield self._following
            self._following = None
        yield from self._rows

    def close(self) -> None:
        for match in (self._current, self._ahead):
            if match is not None:
                match.close()
        self._current = self._ahead = self._following = None
        self._checker.shutdown()

    def _check(self, instance: StoredInstance) -> Match:
        buffer = self._buffers[self._turn]
        self._turn = 1 - self._turn
        if instance.size >= _CHECK_AHEAD_FROM:
            return Match(
                instance, self._checker.submit(open_dataset, self.data_dir, instance, buffer)
            )
        checked = Future()  # checked here and now, its outcome given in its turn as the thread's
        try:
            checked.set_result(open_dataset(self.data_dir, instance, buffer))
        except Exception as exc:
            checked.set_exception(exc)
        return Match(instance, checked)


def send_instance(
    send: Callable[[bytes, bytes], None],
    send_from: Callable[[bytes, Iterable[memoryview], int], None],
    match: Match,
    syntax: str,
    command: bytes,
) -> None:
    """Send the C-STORE-RQ `command` with the match's data set in `syntax`
    (`choose_syntax`'s): as stored (`send_from`, its pieces) when that is the
    syntax, else converted (`send`). Unsendable when it is not to be sent;
    OSError when its file fails while being read."""
    dataset = match.dataset()
    if syntax == match.instance.transfer_syntax:
        send_from(command, dataset.pieces(), dataset.length)
    else:
        send(command, dataset.converted(match.instance, syntax))


def proposals(contents: Iterable[tuple[str, str]]) -> list[Proposal]:
    """Presentation contexts for the (SOP class, stored transfer syntax) pairs a
    retrieve's matches hold: each class in each of its stored syntaxes, the
    uncompressed ones in Explicit and Implicit VR Little Endian beside."""
    wanted: dict[str, list[str]] = {}
    for sop_class, syntax in sorted(contents):
        syntaxes = wanted.setdefault(sop_class, [])
        if syntax not in syntaxes:
            syntaxes.append(syntax)
    found = []
    for sop_class, syntaxes in wanted.items():
        for syntax in syntaxes:
            found.append(Proposal(sop_class, (syntax,)))
        if any(not syntax_of(s).encapsulated for s in syntaxes):
            found.append(
                Proposal(sop_class, (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN))
            )
    return found


@dataclass
class Tally:
    """The sub-operations of one retrieve, counted; its responses encoded."""

    response_field: int  # C-MOVE-RSP or C-GET-RSP
    message_id: int
    sop_class_uid: str
    explicit: bool  # the identifier's VR encoding (the request's context)
    remaining: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    last_response: float = field(default_factory=time.monotonic)

    def succeeded(self, warned: bool = False) -> None:
        self.remaining -= 1
        if warned:
            self.warning += 1
        else:
            self.completed += 1

    def did_fail(self, sop_instance_uid: str) -> None:
        self.remaining -= 1
        self.failed += 1
        self.failed_uids.append(sop_instance_uid)

    def pending_due(self) -> tuple[bytes, bytes] | None:
        """A Pending response when the last response is PENDING_INTERVAL old."""
        now = time.monotonic()
        if now - self.last_response < PENDING_INTERVAL or self.remaining <= 0:
            return None
        self.last_response = now
        return self._response(PENDING, self.remaining), b""

    def final(self, cancelled: bool = False) -> tuple[int, tuple[bytes, bytes]]:
        """The final status, and the response that says it with the counts (and
        the Failed SOP Instance UID List when some failed)."""
        if cancelled:
            status = CANCEL
        elif self.failed == 0 and self.warning == 0:
            status = SUCCESS
        elif self.completed == 0 and self.warning == 0:
            status = UNABLE_TO_PERFORM_SUB_OPERATIONS
        else:
            status = WARNING
        identifier = b""
        if self.failed_uids and status != SUCCESS:
            value = pad("\\".join(self.failed_uids).encode("ascii"), b"\0")
            identifier = encode_element(
                _FAILED_SOP_INSTANCE_UID_LIST, "UI", value, explicit=self.explicit
            )
        remaining = self.remaining if cancelled else None
        return status, (self._response(status, remaining, bool(identifier)), identifier)

    def refusal(self, status: int, comment: str) -> tuple[bytes, bytes]:
        """The one response to a retrieve refused before any sub-operation."""
        return (
            dimse.response(
                self.response_field,
                self.message_id,
                status,
                sop_class_uid=self.sop_class_uid,
                error_comment=comment,
            ),
            b"",
        )

    def _response(self, status: int, remaining: int | None, with_dataset=False) -> bytes:
        return dimse.response(
            self.response_field,
            self.message_id,
            status,
            sop_class_uid=self.sop_class_uid,
            sub_operations=(remaining, self.completed, self.failed, self.warning),
            with_dataset=with_dataset,
        )


class Destination:
    """Sub-operations sent on associations of ours (a C-MOVE's, `send`'s) made
    by `connect`: the first at once (its AssociationError is the caller's).

    An association the destination aborts, or that breaks, while a match is
    sent fails that match only: the next goes on a new association. A peer that
    chokes on one data set (dcmtk's storescp aborts on an element longer than
    its item) so gets every other one. One that stops answering does not get
    another association: each would wait out the timeout."""

    def __init__(self, connect: Callable[[], RequestorAssociation], move_originator=None):
        self._connect = connect
        self.association: RequestorAssociation | None = connect()
        self.move_originator = move_originator  # (AE title, Message ID) of a C-MOVE
        self._message_ids = 0

    def store(self, match: Match, meanwhile: Callable[[], None]) -> tuple[int, str]:
        """Send one match; its C-STORE-RSP status and comment. `meanwhile` runs
        once it is sent, before the answer is read (`Matches.check_ahead`).
        Unsendable when it is not to be sent or the destination accepts it in
        no syntax we can send; AssociationError when the association broke
        while it was sent (the next match goes on a new one); DestinationLost
        when there is no association to send it on."""
        if self.association is None:
            try:
                self.association = self._connect()
            except AssociationError as exc:
                raise DestinationLost(str(exc)) from exc
        try:
            return self._store(self.association, match, meanwhile)
        except NoAnswer as exc:
            self.association = None
            raise DestinationLost(str(exc)) from exc
        except AssociationError:
            self.association = None
            raise

    def close(self) -> None:
        """The work is over: the association released."""
        if self.association is not None:
            association, self.association = self.association, None
            association.__exit__(None, None, None)

    def abort(self) -> None:
        """The work is cut short: the association aborted."""
        if self.association is not None:
            association, self.association = self.association, None
            association.abort()

    def _store(
        self, association: RequestorAssociation, match: Match, meanwhile: Callable[[], None]
    ) -> tuple[int, str]:
        instance = match.instance
        accepted = [
            cx for cx in association.contexts if cx.abstract_syntax == instance.sop_class_uid
        ]
        syntax = choose_syntax(instance, (cx.transfer_syntax for cx in accepted))
        context = next(cx for cx in accepted if cx.transfer_syntax == syntax)
        self._message_ids = self._message_ids % 0xFFFF + 1
        command = dimse.store_request(
            self._message_ids,
            instance.sop_class_uid,
            instance.sop_instance_uid,
            move_originator=self.move_originator,
        )
        try:
            send_instance(
                functools.partial(association.send, context),
                functools.partial(association.send_from, context),
                match, syntax, command,
            )  # fmt: skip
        except OSError as exc:  # the file, read while sending: the message is cut short
            association.abort()
            raise AssociationError(f"reading {instance.path} failed while sending: {exc}") from exc
        meanwhile()
        response = association.receive().command
        status = response.status if response.status is not None else 0xC000
        return status, response.text(dimse.ERROR_COMMENT)


def store_failure(status: int, comment: str) -> str | None:
    """Why a C-STORE-RSP status is a failure (PS3.4 B.2.3), or None for a
    success or a warning (0x0001, 0xBxxx)."""
    if status == SUCCESS or status == 0x0001 or (status & 0xF000) == 0xB000:
        return None
    return f"C-STORE status 0x{status:04X}" + (f": {comment}" if comment else "")
