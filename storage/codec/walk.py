"""The walk of an encoded dataset: it reads the elements asked for and proves
the dataset complete, in one pass, fed fragment by fragment as P-DATA arrives or
given a whole buffer.

Why the proof: pydicom accepts a value shorter than its declared length, and the
header read stops before the pixel data, so without it a dataset cut off in its
pixel data would be stored as if whole. The structure is proven element by
element: every element's declared length fits in the bytes and every
undefined-length element (sequence, item, encapsulated pixel data) has its
delimiter. Values not asked for are skipped by their length, so the cost does
not grow with their size (~10 µs for a 512x512 CT, whole or in 16 KiB fragments).

The encoding is read as pydicom reads it (it decides what we index): the first
element's VR bytes decide between explicit and implicit VR at the top level, an
item of a sequence in an explicit-VR dataset may be in implicit VR (as the
items of a UN of undefined length are), and an element whose VR bytes are not
letters is read as implicit VR.

- `ElementWalk` (and `read_elements`, a whole buffer): the one walk, reading
  (as pydicom's `read_dataset` would) and proving (as `StructureWalk` would);
  see the notes above it for where the two part.
- `StructureWalk` (and `check_structure`, a whole buffer): the proof alone, for
  Explicit VR Big Endian read by pydicom, and for the bytes where the reading
  and the structure part.
"""

import functools
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import DicomDictionary, dictionary_VR
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filereader import ENCODED_VR
from pydicom.tag import BaseTag
from pydicom.values import convert_string

from storage.codec.datasets import lenient_reading, value_text
from storage.codec.elements import LONG_LENGTH_VRS


class HeaderError(ValueError):
    """The dataset bytes cannot be parsed far enough to index the object."""


UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
LONG_LENGTH_VR_BYTES = frozenset(vr.encode() for vr in LONG_LENGTH_VRS)
_STRUCTS = {
    endian: (
        struct.Struct(endian + "HHI").unpack_from,  # tag, 4-byte length
        struct.Struct(endian + "HH2sH").unpack_from,  # tag, VR, 2-byte length
        struct.Struct(endian + "I").unpack_from,  # 4-byte length
    )
    for endian in "<>"
}
UNPACK_TAG_LENGTH_LE, UNPACK_EXPLICIT_LE, UNPACK_LONG_LE = _STRUCTS["<"]


def _truncated(message: str) -> HeaderError:
    return HeaderError(f"dataset is truncated: {message}")


def looks_implicit(buffer, pos: int, end: int, assumed: bool) -> bool:
    """pydicom's guess of an element's encoding: explicit when the two bytes
    after the tag are upper-case letters (a VR), implicit otherwise."""
    if end - pos < 6:
        return assumed
    first, second = buffer[pos + 4], buffer[pos + 5]
    return not (0x40 < first < 0x5B and 0x40 < second < 0x5B)


def check_structure(buffer, start: int = 0, *, implicit: bool, little_endian: bool = True) -> None:
    """Prove that the encoded dataset in `buffer[start:]` is complete (see the
    module's notes); offsets in messages count from the start of `buffer`.

    `buffer` is anything `struct.unpack_from` and indexing accept (bytes, a
    memoryview of a BytesIO or of an mmap); nothing is copied.

    Raises HeaderError("dataset is truncated: ...") when a length runs past the
    end of the bytes, an undefined-length element has no delimiter, or the bytes
    end inside an element header (trailing zero bytes, shorter than a header, are
    accepted as padding).
    """
    StructureWalk(implicit, little_endian).check_whole(buffer, start)


def _skip_implicit(buffer, pos: int, end: int, tag_and_length) -> int:
    """The fast path of the structural walk for implicit VR: skip whole elements of
    defined length; return the offset of the first one that needs more care."""
    limit = end - 8
    while pos <= limit:
        group, _, length = tag_and_length(buffer, pos)
        after = pos + 8 + length
        if after > end or group == 0xFFFE or length == UNDEFINED_LENGTH:
            return pos
        pos = after
    return pos


def _skip_explicit(buffer, pos: int, end: int, explicit_element, long_length) -> int:
    """The fast path of the structural walk for explicit VR (see _skip_implicit)."""
    limit = end - 12
    while pos <= limit:
        group, _, vr, length = explicit_element(buffer, pos)
        if group == 0xFFFE:  # an item or a delimiter: no VR
            return pos
        if vr in LONG_LENGTH_VR_BYTES:
            length = long_length(buffer, pos + 8)[0]
            after = pos + 12 + length
            if after > end or length == UNDEFINED_LENGTH:
                return pos
        elif b"AA" <= vr <= b"ZZ":
            after = pos + 8 + length
            if after > end:
                return pos
        else:  # an element without a VR
            return pos
        pos = after
    return pos


def _value_cut(tag: int, offset: int, length: int, left: int) -> HeaderError:
    """The element at `offset` announces `length` bytes and `left` remain. Its
    tag and offset first: they are what an ErrorComment keeps (scp.dimse)."""
    return _truncated(
        f"({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {offset}: length {length},"
        f" {max(left, 0)} bytes left"
    )


def _no_delimiter(open_value: tuple[int, int, bool, bool]) -> HeaderError:
    tag, offset, _, _ = open_value
    what = "item" if tag == ITEM else f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return _truncated(f"{what} at byte {offset}: undefined length without delimiter")


class FragmentWalk:
    """Feeds a byte-level walk: `_run(buffer, base, final)` consumes what it can
    of `buffer` (whose first byte is at offset `base` of the dataset) from
    `self.pos`; what is left of a unit it could not finish is kept (a few
    bytes) and given again with the next fragment. A walk that pauses
    (`paused`, see `StructureWalk`) only takes note of the bytes it is fed
    until `walk_fragment` is called again."""

    def __init__(self):
        self.pos = 0
        self.received = 0
        self.done = False
        self.paused = False
        self._carry = b""

    def feed(self, view: memoryview) -> None:
        base = self.received
        self.received = base + len(view)
        if not (self.done or self.paused):
            self.walk_fragment(view, base)

    def walk_fragment(self, view: memoryview, base: int) -> None:
        """Walk on from `self.pos` through `view`, the fragment received at `base`."""
        size = len(view)
        start = 0
        while True:
            if self._carry:
                take = min(size - start, 64)
                buffer = self._carry + view[start : start + take]
                buffer_base = self.pos
                self._carry = b""
                start += take
            else:
                skip = self.pos - (base + start)
                if skip >= size - start:
                    return  # inside a value that is skipped: nothing to do
                if skip > 0:
                    start += skip
                buffer = view[start:] if start else view
                buffer_base = base + start
                start = size
            self._run(buffer, buffer_base, False)
            if self.done or self.paused:
                return
            left = buffer_base + len(buffer) - self.pos
            if left > 0:
                self._carry = bytes(buffer[len(buffer) - left :])
            if start >= size:
                return

    def finish(self) -> None:
        if self.done:
            return
        buffer, self._carry = self._carry, b""
        if self.pos >= self.received:
            buffer = b""
        self._run(memoryview(buffer), self.received - len(buffer), True)


class StructureWalk(FragmentWalk):
    """The structural walk, fed fragment by fragment or given a whole buffer.

    Inside `ElementWalk` it walks only from where the reading and the structure
    can part: it pauses when it is back at the top level (at or after
    `pause_from`, inside the fragment being fed), so that the reading, arriving
    there too, can take the check over again."""

    def __init__(self, implicit: bool, little_endian: bool = True):
        super().__init__()
        self.implicit = implicit
        self.unpackers = _STRUCTS["<" if little_endian else ">"]
        self.open_values: list[tuple[int, int, bool, bool]] = []
        self.in_items = False
        self.guess = "top"  # the next element's encoding is to be guessed: "top", "item", None
        self.last_skip = None  # (tag, length, offset, header) of the value being skipped
        self.pause_from: int | None = None  # None: it never pauses

    def check_whole(self, buffer, start: int) -> None:
        """The dataset in `buffer[start:]` at once (see `check_structure`)."""
        self.pos = start
        self._run(buffer, 0, True)

    def finish(self) -> None:
        if not self.done and self.pos > self.received:
            tag, length, offset, header = self.last_skip
            raise _value_cut(tag, offset, length, self.received - offset - header)
        super().finish()

    def _run(self, buffer, base: int, final: bool) -> None:
        tag_and_length, explicit_element, long_length = self.unpackers
        end = len(buffer)
        pos = self.pos - base
        open_values = self.open_values
        implicit = self.implicit
        in_items = self.in_items
        try:
            while True:
                remaining = end - pos
                if in_items:
                    if remaining < 8:
                        if final:
                            raise _no_delimiter(open_values[-1])
                        return
                    group, element, length = tag_and_length(buffer, pos)
                    tag = group << 16 | element
                    if tag == SEQUENCE_DELIMITER:
                        pos += 8
                        _, _, implicit, in_items = open_values.pop()
                        if (
                            not open_values
                            and self.pause_from is not None
                            and base + pos >= self.pause_from
                        ):
                            self.paused = True
                            return
                        continue
                    if length == UNDEFINED_LENGTH:
                        open_values.append((tag, base + pos, implicit, True))
                        pos += 8
                        in_items = False
                        self.guess = "item"
                        continue
                    header = 8
                else:
                    if self.guess is not None:
                        if remaining < 6 and not final:
                            return
                        if self.guess == "top":
                            implicit = looks_implicit(buffer, pos, end, implicit)
                        else:
                            implicit = implicit or looks_implicit(buffer, pos, end, implicit)
                        self.guess = None
                    if implicit:
                        pos = _skip_implicit(buffer, pos, end, tag_and_length)
                    else:
                        pos = _skip_explicit(buffer, pos, end, explicit_element, long_length)
                    remaining = end - pos
                    if remaining < 8:
                        if not final:
                            return
                        if open_values:
                            raise _no_delimiter(open_values[-1])
                        if any(buffer[pos:end]):
                            raise _truncated(
                                f"{remaining} bytes at byte {base + pos} are no element header"
                            )
                        self.done = True
                        return
                    if implicit:
                        group, element, length = tag_and_length(buffer, pos)
                        header = 8
                    else:
                        group, element, vr, length = explicit_element(buffer, pos)
                        header = 8
                        if group == 0xFFFE:
                            length = long_length(buffer, pos + 4)[0]
                        elif vr in LONG_LENGTH_VR_BYTES:
                            if remaining < 12:
                                if not final:
                                    return
                                raise _truncated(
                                    f"({group:04X},{element:04X}) header cut short"
                                    f" at byte {base + pos}"
                                )
                            length = long_length(buffer, pos + 8)[0]
                            header = 12
                        elif not b"AA" <= vr <= b"ZZ":
                            length = long_length(buffer, pos + 4)[0]
                    tag = group << 16 | element
                    if tag == ITEM_DELIMITER:
                        if not open_values:
                            self.done = True
                            return
                        pos += header
                        _, _, implicit, in_items = open_values.pop()
                        continue
                    if length == UNDEFINED_LENGTH:
                        open_values.append((tag, base + pos, implicit, False))
                        pos += header
                        in_items = True
                        continue
                if length > remaining - header:
                    if final:
                        raise _value_cut(tag, base + pos, length, remaining - header)
                    self.last_skip = (tag, length, base + pos, header)
                    pos += header + length
                    return
                pos += header + length
        finally:
            self.pos = base + pos
            self.implicit = implicit
            self.in_items = in_items


# -- The walk that reads ---------------------------------------------------------
#
# `ElementWalk` reads the elements the caller wants the way pydicom's
# `read_dataset` reads them (with `specific_tags` and `stop_when` at the pixel
# data), so that it sees the same elements as pydicom even where two readings of
# hostile bytes differ, and fails where pydicom fails ("dataset does not parse").
# At the top level pydicom's reading and the structural walk take the same
# steps, so there the one walk also proves the structure (`checking`); past the
# pixel data it only proves it (pydicom's reading stops there). From an element
# where the two can part (one of undefined length: a sequence, encapsulated
# pixel data; an item tag in explicit VR; a failed reading) a `StructureWalk`
# proves the rest; when it comes back to the top level where the reading does
# too (the delimiter of a sequence, usually in the same fragment), the reading
# takes the check over again. A dataset without undefined-length elements is
# thus walked once, and one with sequences twice only inside them.

_MAX_WANTED_VALUE = 1024 * 1024  # a wanted value longer than this is left out
_MAX_UNDEFINED_VALUE = 4 * 1024 * 1024  # see ElementWalk: undefined-length non-SQ values
# pydicom's recursive reader fails (RecursionError) at ~190 levels of undefined-
# length sequences; we refuse sooner, at a depth no real object reaches.
MAX_SEQUENCE_DEPTH = 128
PIXEL_DATA_TAGS = frozenset((0x7FE00010, 0x7FE00009, 0x7FE00008))
SPECIFIC_CHARACTER_SET = 0x00080005
# The 2-byte VRs pydicom's reader knows.
_ENCODED_VR = frozenset(vr for vr in ENCODED_VR if len(vr) == 2)
_ENCODINGS_CACHE: dict = {}
_NOTHING = frozenset()
_WHOLE_BUFFER_FRAGMENT = 256 * 1024  # the receiver's largest P-DATA value, by default
_DELIMITER_BYTES = struct.pack("<HH", 0xFFFE, 0xE0DD)
_ITEM_BYTES = struct.pack("<HH", 0xFFFE, 0xE000)


@dataclass(frozen=True)
class WantedTags:
    """What `ElementWalk` keeps: `top`, the top-level elements (their values);
    `sequences`, those of them that are sequences (their items); `in_items`, the
    elements kept of those items; `vrs`, the dictionary VR of each top-level
    one (see `wanted_tags`)."""

    top: frozenset
    sequences: frozenset
    in_items: frozenset
    vrs: Mapping[int, str]


def wanted_tags(top, sequences, in_items) -> WantedTags:
    """What to keep: the tags of the top-level elements (the Specific Character
    Set, which decodes them, is added), of the sequences among them whose items
    are kept, and of the elements kept of those items."""
    top = frozenset(top) | {SPECIFIC_CHARACTER_SET}
    vrs = {tag: _dictionary_vr(tag) for tag in top}
    return WantedTags(top, frozenset(sequences), frozenset(in_items), vrs)


class _Unreadable(HeaderError):
    """Where pydicom's reader fails: "dataset does not parse"."""


def _does_not_parse(message: str) -> HeaderError:
    return _Unreadable(f"dataset does not parse: {message}")


class _Frame:
    """A dataset being read (pydicom's read_dataset)."""

    __slots__ = ("implicit", "end", "top", "store", "guess", "encoding", "charset")

    def __init__(self, implicit, end, top, store, encoding):
        self.implicit = implicit
        self.end = end  # offset where a defined-length item ends, or None
        self.top = top
        self.store = store  # {tag: raw} of the elements kept, or None
        self.guess = True  # the encoding is still to be guessed from the next bytes
        self.encoding = encoding  # the generator's encoding (for its sequences)
        self.charset = None  # the raw (0008,0005) of an item, to check it converts


class _Sequence:
    """An undefined-length sequence being read (pydicom's read_sequence)."""

    __slots__ = ("tag", "implicit", "items", "encoding", "collect")

    def __init__(self, tag, implicit, encoding, collect):
        self.tag = tag
        self.implicit = implicit
        self.items = [] if collect else None
        self.encoding = encoding  # the parent's encoding, for its items
        self.collect = collect


class _Undefined:
    """An undefined-length value that is not a sequence: pydicom walks it as
    encapsulated pixel data, and falls back to a scan for the delimiter."""

    __slots__ = ("tag", "vr", "implicit", "start", "data", "walk", "found", "keep", "scanned")

    def __init__(self, tag, vr, implicit, start, keep):
        self.tag, self.vr, self.implicit, self.start, self.keep = tag, vr, implicit, start, keep
        self.data = bytearray()
        self.walk = 0  # offset in data of the next fragment header of the walk
        self.found = -1  # offset of the first delimiter in data, -1: none yet
        self.scanned = 0  # where the scan for it goes on


class ElementWalk(FragmentWalk):
    """The one walk of a dataset in Explicit or Implicit VR Little Endian, fed
    fragment by fragment (`feed`) or given all of it at once: it proves the
    dataset complete as `check_structure` does, and keeps the `wanted` elements
    as pydicom's `read_dataset(stop_when=pixel data, specific_tags=wanted)`
    reads them (see the notes above).

    `finish()` raises HeaderError("dataset is truncated: ...") first, then
    HeaderError("dataset does not parse: ...") where pydicom fails, and returns
    the elements kept."""

    def __init__(self, implicit: bool, wanted: WantedTags):
        super().__init__()
        self.wanted = wanted
        self.top = {}
        self.stack: list = [_Frame(implicit, None, True, self.top, default_encoding)]
        self.depth = 0
        # (store, tag, vr, implicit, length, bytearray, left, offset, header)
        self.collecting = None
        self.error: HeaderError | None = None
        self.reading = True  # False past the pixel data, where only the check goes on
        # The structure is proven by this walk (`checking`) or by `structure`.
        self.checking = True
        self.structure: StructureWalk | None = None
        self.last_skip = None  # (tag, length, offset, header) of the value being skipped
        # The fragment being fed and where it starts; None once the last one is
        # in (the structure walk then never pauses: the reading cannot rejoin it).
        self._fragment: tuple[memoryview, int] | None = None

    def feed(self, view: memoryview) -> None:
        """The next fragment (bytes or a 1-D byte memoryview, kept no longer than
        the call: the caller reuses its buffer)."""
        base = self.received
        self._fragment = (view, base)
        structure = self.structure
        if structure is not None:  # ahead of the reading, to pause where it may rejoin
            structure.pause_from = None if self.done else base
            structure.feed(view)
        super().feed(view)
        self._fragment = None
        structure = self.structure
        if structure is not None:
            structure.pause_from = None
            if structure.paused:  # back at the top level where the reading is not
                structure.paused = False
                structure.walk_fragment(view, base)

    def finish(self) -> "WalkedElements":
        structure = self.structure
        if structure is not None:
            structure.finish()  # a truncation is reported before what pydicom says
        super().finish()  # the reading's last bytes (it may split off a structure walk)
        if self.structure is not None and self.structure is not structure:
            self.structure.finish()
        if self.error is not None:
            raise self.error
        return WalkedElements(self.top, self.wanted)

    def _split(self, buffer, base: int, at: int) -> None:
        """From `at` on, the structure is proven by a `StructureWalk` of its own."""
        structure = StructureWalk(self.stack[0].implicit)
        structure.guess = None
        structure.pos = structure.received = at
        self.structure = structure
        self.checking = False
        fragment = self._fragment
        if fragment is None:  # the last bytes, in `finish`
            structure.feed(buffer[at - base :])
            return
        view, fragment_base = fragment
        if not self.done:
            structure.pause_from = max(at, fragment_base)
        structure.feed(buffer[at - base :])
        fragment_end = fragment_base + len(view)
        if structure.received < fragment_end:  # `buffer` was the reading's carry
            structure.feed(view[structure.received - fragment_base :])

    def _rejoin(self, at: int) -> None:
        """The reading is back at the top level at `at`: it takes the check over
        again if the structure walk paused there too."""
        structure = self.structure
        if (
            structure is not None
            and structure.paused
            and structure.pos == at
            and structure.implicit == self.stack[0].implicit
        ):
            self.structure = None
            self.checking = True

    def _run(self, buffer, base: int, final: bool) -> None:  # noqa: C901
        end = len(buffer)
        pos = self.pos - base
        stack = self.stack
        wanted_in_items = self.wanted.in_items
        if self.reading:
            wanted_top, stop_tags = self.wanted.top, PIXEL_DATA_TAGS
        else:
            wanted_top = stop_tags = _NOTHING
        checking = self.checking  # changes only in _split and _rejoin
        recursed = False
        try:
            while not self.done:
                if self.collecting is not None:
                    store, tag, vr, implicit, length, value, left, offset, header = self.collecting
                    take = min(left, end - pos)
                    if take > 0:
                        value += buffer[pos : pos + take]
                        pos += take
                    if take < left and not final:
                        self.collecting = (
                            store, tag, vr, implicit, length, value, left - take, offset, header
                        )  # fmt: skip
                        return
                    if take < left and checking:
                        raise _value_cut(tag, offset, length, len(value))
                    self.collecting = None
                    self._keep(store, tag, vr, implicit, length, bytes(value))
                    continue
                frame = stack[-1]
                if isinstance(frame, _Undefined):
                    take = end - pos
                    if len(frame.data) + take > _MAX_UNDEFINED_VALUE:
                        raise _does_not_parse(
                            f"undefined-length value longer than {_MAX_UNDEFINED_VALUE} bytes"
                        )
                    frame.data += buffer[pos:end]
                    pos = end
                    resolved = self._resolve(frame, final)
                    if resolved is None:
                        return
                    rest = bytes(frame.data[resolved - frame.start :])
                    stack.pop()
                    if frame.found == -2:  # EOFError: the dataset holding it ends
                        self._dataset_read(stack.pop())
                    elif len(stack) == 1:
                        self._rejoin(resolved)
                        checking = self.checking
                    self.pos = resolved
                    recursed = True
                    self._run(memoryview(rest), resolved, final)
                    return
                remaining = end - pos
                if isinstance(frame, _Sequence):
                    if remaining < 8:
                        if final:
                            raise _does_not_parse(f"No tag to read at file position {base + end:X}")
                        return
                    group, element, length = UNPACK_TAG_LENGTH_LE(buffer, pos)
                    pos += 8
                    if group << 16 | element == SEQUENCE_DELIMITER:
                        stack.pop()
                        self.depth -= 1
                        self._sequence_read(frame)
                        if len(stack) == 1:
                            self._rejoin(base + pos)
                            checking = self.checking
                        continue
                    item_end = None if length == UNDEFINED_LENGTH else base + pos + length
                    store = {} if frame.collect else None
                    item = _Frame(frame.implicit, item_end, False, store, None)
                    stack.append(item)
                    continue
                # A dataset: pydicom's data_element_generator.
                if frame.guess:
                    if remaining < 6 and not final:
                        return
                    implicit = frame.implicit
                    if not (implicit and not frame.top):
                        implicit = looks_implicit(buffer, pos, end, implicit)
                    frame.implicit = implicit
                    frame.guess = False
                if frame.top:  # the fast path: skip what is not wanted
                    pos = _skip_unwanted(buffer, pos, end, frame.implicit, wanted_top, stop_tags)
                    remaining = end - pos
                elif frame.end is not None and base + pos >= frame.end:
                    self._dataset_read(stack.pop())
                    continue
                if remaining < 8:
                    if not final:
                        return
                    if checking:
                        self._check_end(buffer, base, pos, end)
                    pos = end
                    self._dataset_read(stack.pop())
                    continue
                header = 8
                if frame.implicit:
                    group, element, length = UNPACK_TAG_LENGTH_LE(buffer, pos)
                    vr = None
                else:
                    group, element, raw_vr, length = UNPACK_EXPLICIT_LE(buffer, pos)
                    if raw_vr in _ENCODED_VR:
                        vr = raw_vr.decode()
                        if raw_vr in LONG_LENGTH_VR_BYTES:
                            if remaining < 12:
                                if not final:
                                    return
                                if checking:
                                    raise _truncated(
                                        f"({group:04X},{element:04X}) header cut short"
                                        f" at byte {base + pos}"
                                    )
                                raise _does_not_parse("unpack requires a buffer of 4 bytes")
                            length = UNPACK_LONG_LE(buffer, pos + 8)[0]
                            header = 12
                    elif not b"AA" <= raw_vr <= b"ZZ":
                        vr = None
                        length = UNPACK_LONG_LE(buffer, pos + 4)[0]
                    else:
                        vr = raw_vr.decode("latin-1")
                tag = group << 16 | element
                if tag == ITEM_DELIMITER:
                    pos += header
                    self._dataset_read(stack.pop())
                    continue
                if frame.top:
                    if tag in stop_tags:  # pydicom's reading ends here; the check goes on
                        if not checking:
                            self.done = True
                            return
                        self.reading = False
                        wanted_top = stop_tags = _NOTHING
                    if checking and (
                        length == UNDEFINED_LENGTH or (group == 0xFFFE and not frame.implicit)
                    ):
                        self.done = not self.reading
                        self._split(buffer, base, base + pos)
                        checking = False
                        if self.done:
                            return
                store = frame.store
                if length != UNDEFINED_LENGTH:
                    if checking and length > remaining - header:  # runs past these bytes
                        if final:
                            raise _value_cut(tag, base + pos, length, remaining - header)
                        self.last_skip = (tag, length, base + pos, header)
                    keep = store is not None and (
                        tag in wanted_top if frame.top else tag in wanted_in_items
                    )
                    if not keep and tag == SPECIFIC_CHARACTER_SET and not frame.top:
                        keep = True  # pydicom converts an item's charset: it must convert
                        store = None
                    pos += header
                    if not keep:
                        pos += length
                        continue
                    if length > _MAX_WANTED_VALUE:
                        if store is not None:
                            store[tag] = None  # left out
                        pos += length
                        continue
                    if length <= end - pos:  # all here: no need to collect it piece by piece
                        value = bytes(buffer[pos : pos + length])
                        pos += length
                        self._keep(store, tag, vr, frame.implicit, length, value)
                        continue
                    offset = base + pos - header
                    self.collecting = (
                        store, tag, vr, frame.implicit, length, bytearray(), length, offset, header
                    )  # fmt: skip
                    continue
                # Undefined length.
                pos += header
                if vr == "UN":
                    vr = "SQ"
                if vr is None:
                    try:
                        vr = _dictionary_vr(tag)
                    except KeyError:
                        if end - pos < 4:
                            if not final:
                                pos -= header
                                return
                            raise _does_not_parse("unpack requires a buffer of 4 bytes") from None
                        next_group, next_element = struct.unpack_from("<HH", buffer, pos)
                        if next_group << 16 | next_element == ITEM:
                            vr = "SQ"
                keep = frame.top and tag in wanted_top
                if vr == "SQ":
                    self.depth += 1
                    if self.depth > MAX_SEQUENCE_DEPTH:
                        raise _does_not_parse(
                            f"sequences nest deeper than {MAX_SEQUENCE_DEPTH} levels"
                        )
                    encoding = frame.encoding if frame.top else None
                    collect = keep and tag in self.wanted.sequences
                    stack.append(_Sequence(tag, frame.implicit, encoding, collect))
                    if keep and not collect:
                        self.top[tag] = None  # a sequence where we want text: left out
                    continue
                stack.append(_Undefined(tag, vr, frame.implicit, base + pos, keep))
        except _Unreadable as error:
            # Kept as its message alone: its traceback and the exceptions chained
            # to it hold the frames that read, and the views of the bytes in them
            # (a view of a mapped file must not outlive the walk's reading).
            self.error = _Unreadable(str(error))
            self.done = True
            if checking:  # the structure is still to be proven
                self._split(buffer, base, base + pos)
        finally:
            if not recursed:
                self.pos = base + pos

    def _check_end(self, buffer, base: int, pos: int, end: int) -> None:
        """The last bytes of the dataset, at the top level (see `check_structure`)."""
        if pos > end:
            tag, length, offset, header = self.last_skip
            raise _value_cut(tag, offset, length, base + end - offset - header)
        if any(buffer[pos:end]):
            raise _truncated(f"{end - pos} bytes at byte {base + pos} are no element header")

    def _keep(self, store, tag, vr, implicit, length, value) -> None:
        frame = self.stack[-1]
        if tag == SPECIFIC_CHARACTER_SET:
            if frame.top:
                frame.encoding = _generator_encoding(value)
            else:
                frame.charset = (vr, implicit, length, value)
        if store is not None:
            store[tag] = (vr, implicit, length, value)

    def _dataset_read(self, frame: _Frame) -> None:
        if frame.top:
            self.done = True
            return
        sequence = self.stack[-1]
        if frame.charset is not None:
            dataset_encoding(frame.charset)  # raises as read_dataset does
        if sequence.items is not None:
            sequence.items.append(frame.store)

    def _sequence_read(self, sequence: _Sequence) -> None:
        frame = self.stack[-1]
        if frame.top and sequence.collect:
            self.top[sequence.tag] = ("items", sequence.items, sequence.encoding)

    def _resolve(self, frame: _Undefined, final: bool) -> int | None:
        """Where the undefined-length value ends (pydicom's
        read_undefined_length_value), or None while that is not known yet."""
        data = frame.data
        size = len(data)
        walk = frame.walk
        while walk is not None:
            if size - walk < 4:
                if not final:
                    frame.walk = walk
                    return None
                walk = None
                break
            marker = bytes(data[walk : walk + 4])
            if marker == _DELIMITER_BYTES:
                self._undefined_read(frame, bytes(data[:walk]))
                return frame.start + walk + 8
            if marker != _ITEM_BYTES:
                walk = None
                break
            if size - walk < 8:
                if not final:
                    frame.walk = walk
                    return None
                walk = None
                break
            walk += 8 + UNPACK_LONG_LE(data, walk + 4)[0]
        frame.walk = None
        if frame.found == -1:
            found = data.find(_DELIMITER_BYTES, frame.scanned)
            if found < 0:
                frame.scanned = max(size - 3, 0)
                if not final:
                    return None
                frame.found = -2  # EOFError: pydicom rewinds to the value's start
                return frame.start
            frame.found = found
        if frame.found == -2:
            return frame.start
        self._undefined_read(frame, bytes(data[: frame.found]))
        return frame.start + frame.found + 8

    def _undefined_read(self, frame: _Undefined, value: bytes) -> None:
        if frame.keep:
            self.top[frame.tag] = (
                (frame.vr, frame.implicit, UNDEFINED_LENGTH, value)
                if len(value) <= _MAX_WANTED_VALUE
                else None
            )


def read_elements(buffer, start: int, *, implicit: bool, wanted: WantedTags) -> "WalkedElements":
    """`ElementWalk` over the dataset in `buffer[start:]` (bytes, a BytesIO's
    buffer, a mapped file), fed in fragments as P-DATA brings them, so that what
    it copies stays bounded; offsets in messages count from the start of `buffer`."""
    walk = ElementWalk(implicit, wanted)
    walk.pos = walk.received = start
    # Released before `finish` may raise: a view of a mapped file that a
    # traceback still holds would keep the file from being unmapped.
    with memoryview(buffer) as view:
        for offset in range(start, len(view), _WHOLE_BUFFER_FRAGMENT):
            walk.feed(view[offset : offset + _WHOLE_BUFFER_FRAGMENT])
    return walk.finish()


def _skip_unwanted(
    buffer, pos: int, end: int, implicit: bool, wanted: frozenset, stop: frozenset
) -> int:
    """The fast path of `ElementWalk` at the top level: skip whole elements of
    defined length that are neither wanted nor where the reading stops and that
    end in `buffer`; return the offset of the first element that needs more care."""
    limit = end - 12
    if implicit:
        while pos <= limit:
            group, element, length = UNPACK_TAG_LENGTH_LE(buffer, pos)
            if length == UNDEFINED_LENGTH or group == 0xFFFE:
                return pos
            tag = group << 16 | element
            after = pos + 8 + length
            if tag in wanted or tag in stop or after > end:
                return pos
            pos = after
        return pos
    long_vrs = LONG_LENGTH_VR_BYTES
    encoded = _ENCODED_VR
    while pos <= limit:
        group, element, vr, length = UNPACK_EXPLICIT_LE(buffer, pos)
        if vr in long_vrs:
            length = UNPACK_LONG_LE(buffer, pos + 8)[0]
            if length == UNDEFINED_LENGTH:
                return pos
            after = pos + 12 + length
        elif vr in encoded:
            after = pos + 8 + length
        else:
            return pos
        tag = group << 16 | element
        if tag in wanted or tag in stop or after > end:
            return pos
        pos = after
    return pos


def _dictionary_vr(tag: int) -> str:
    """pydicom's dictionary VR of a tag (KeyError when it has none); the public
    `dictionary_VR` only for what the plain lookup misses (repeating groups)."""
    entry = DicomDictionary.get(tag)
    return entry[0] if entry is not None else dictionary_VR(tag)


def _generator_encoding(value: bytes):
    """The encoding pydicom's element generator takes up at a (0008,0005)."""
    key = ("generator", value)
    cached = _ENCODINGS_CACHE.get(key)
    if cached is None:
        try:
            with lenient_reading:
                cached = convert_encodings(convert_string(value or b"", True))
        except Exception as exc:
            raise _does_not_parse(str(exc)) from exc
        if len(_ENCODINGS_CACHE) < 256:
            _ENCODINGS_CACHE[key] = cached
    return cached


def dataset_encoding(charset):
    """The encoding read_dataset gives a dataset from its raw (0008,0005)."""
    key = ("dataset", *charset)
    cached = _ENCODINGS_CACHE.get(key)
    if cached is None:
        vr, implicit, length, value = charset
        raw = RawDataElement(BaseTag(SPECIFIC_CHARACTER_SET), vr, length, value, 0, implicit, True)
        try:
            with lenient_reading:
                cached = convert_encodings(convert_raw_data_element(raw).value)
        except Exception as exc:
            raise _does_not_parse(str(exc)) from exc
        if len(_ENCODINGS_CACHE) < 256:
            _ENCODINGS_CACHE[key] = cached
    return cached


# VRs whose pydicom conversion of a plain ASCII value (printable, no backslash,
# padded at most with spaces and NULs) is that value: the shortcut of `WalkedElements`.
_PLAIN_VRS = frozenset(
    ["AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UT"]
)
_PRINTABLE = bytes(range(0x20, 0x7F)).replace(b"\\", b"")
_PLAIN_INTEGER = re.compile(rb" *[+-]?[0-9]{1,12} *\x00?")


@functools.cache
def _vrs_read_as_ascii(encodings: tuple[str, ...]) -> frozenset[str]:
    """The VRs of _PLAIN_VRS whose printable ASCII pydicom reads as itself in
    `encodings`: all of them in every DICOM character set, but a Specific
    Character Set naming some other Python codec ("Uu", found by a random test)
    can make pydicom's conversion fail, and then `WalkedElements.text`'s
    shortcut must not read what pydicom does not."""
    plain = _PRINTABLE.replace(b"=", b"")  # "=" separates a PN's component groups

    def reads_as_itself(vr: str) -> bool:
        raw = RawDataElement(BaseTag(0x00100010), vr, len(plain), plain, 0, True, True)
        try:
            with lenient_reading:
                value = convert_raw_data_element(raw, encoding=list(encodings)).value
            return value_text(value) == plain.decode().strip()
        except Exception:
            return False

    return frozenset(vr for vr in _PLAIN_VRS if reads_as_itself(vr))


class WalkedElements:
    """The elements an `ElementWalk` kept, read as pydicom reads them: values
    converted with pydicom's own converters (`convert_raw_data_element`), or, for
    plain ASCII text, with a shortcut that gives the same strings. Read inside
    `with lenient_reading`."""

    def __init__(self, top: dict, wanted: WantedTags):
        self.top = top
        self.vrs = wanted.vrs
        charset = top.get(SPECIFIC_CHARACTER_SET)
        self.encoding = dataset_encoding(charset) if charset else default_encoding
        # Once per dataset: the check behind it runs once per character set.
        self._plain_vrs = _vrs_read_as_ascii(
            (self.encoding,) if isinstance(self.encoding, str) else tuple(self.encoding)
        )

    def text(self, tag: int) -> str | None:
        """The value as one string (see `value_text`), or None."""
        raw = self.top.get(tag)
        if raw is None:
            return None
        vr, implicit, length, value = raw
        if vr is None:
            vr = self.vrs.get(tag) or _dictionary_vr(tag)
        elif vr == "UN" and len(value) < 0xFFFF:
            vr = self.vrs.get(tag) or vr
        if vr in self._plain_vrs and length != UNDEFINED_LENGTH:
            body = value.rstrip(b" \x00")
            if not body.translate(None, _PRINTABLE):
                return body.decode("ascii").strip() or None
        elif vr == "IS" and _PLAIN_INTEGER.fullmatch(value):
            # What pydicom's IS makes of it has the same value, which is all
            # that is read of an IS (as a number).
            return value.decode("ascii").strip(" \x00")
        try:
            element = self._convert(tag, raw)
        except Exception:
            return None
        return value_text(element.value)

    def items(self, tag: int) -> list:
        """The items of a sequence, as pydicom Datasets of the elements kept."""
        raw = self.top.get(tag)
        if raw is None:
            return []
        if raw[0] == "items":
            _, stores, encoding = raw
            return [_item_dataset(store, encoding or default_encoding) for store in stores]
        try:
            value = self._convert(tag, raw).value
            return list(value) if value else []
        except Exception:
            return []

    def _convert(self, tag: int, raw):
        vr, implicit, length, value = raw
        encoding = default_encoding if tag == SPECIFIC_CHARACTER_SET else self.encoding
        element = RawDataElement(BaseTag(tag), vr, length, value, 0, implicit, True)
        return convert_raw_data_element(element, encoding=encoding)


def _item_dataset(store: dict, parent_encoding) -> Dataset:
    """An item as pydicom's read_dataset makes it (of the elements kept)."""
    elements = {
        BaseTag(tag): RawDataElement(BaseTag(tag), vr, length, value, 0, implicit, True)
        for tag, (vr, implicit, length, value) in ((t, r) for t, r in store.items() if r)
    }
    dataset = Dataset(elements, parent_encoding=parent_encoding)
    charset = store.get(SPECIFIC_CHARACTER_SET)
    encoding = dataset_encoding(charset) if charset else parent_encoding
    implicit = next((raw[1] for raw in store.values()), True)
    dataset.set_original_encoding(implicit, True, encoding)
    return dataset
