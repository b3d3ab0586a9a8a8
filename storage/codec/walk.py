"""The structural walk of an encoded dataset: is it complete?

pydicom accepts a value shorter than its declared length, and the header read
stops before the pixel data, so without this walk a dataset cut off in its pixel
data would be stored as if whole. The walk proves, element by element, that
every element's declared length fits in the bytes and every undefined-length
element (sequence, item, encapsulated pixel data) has its delimiter. It reads
tags and lengths only and skips defined-length values by their length, so it
costs well under a microsecond per element whatever the size of the values
(measured: ~10 µs for a 512x512 CT, whole or in 16 KiB fragments).

One walk, `StructureWalk`, serves both uses: fed fragment by fragment as P-DATA
arrives (`feed`, `finish`), or given a whole buffer (`check_structure`). The
encoding is read as pydicom reads it (it decides what we index): the first
element's VR bytes decide between explicit and implicit VR at the top level, an
item of a sequence in an explicit-VR dataset may be in implicit VR (as the
items of a UN of undefined length are), and an element whose VR bytes are not
letters is read as implicit VR.
"""

import struct

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
    bytes) and given again with the next fragment."""

    def __init__(self):
        self.pos = 0
        self.received = 0
        self.done = False
        self._carry = b""

    def feed(self, view: memoryview) -> None:
        base = self.received
        size = len(view)
        self.received = base + size
        if self.done:
            return
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
            if self.done:
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
    """The structural walk, fed fragment by fragment or given a whole buffer."""

    def __init__(self, implicit: bool, little_endian: bool = True):
        super().__init__()
        self.implicit = implicit
        self.unpackers = _STRUCTS["<" if little_endian else ">"]
        self.open_values: list[tuple[int, int, bool, bool]] = []
        self.in_items = False
        self.guess = "top"  # the next element's encoding is to be guessed: "top", "item", None
        self.last_skip = None  # (tag, length, offset, header) of the value being skipped

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
