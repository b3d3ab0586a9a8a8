"""Read the header attributes the index needs from a dataset's encoded bytes.

The bytes are the dataset exactly as it came off the wire (no file meta). Only the
listed tags are decoded, and reading stops before the pixel data, so the cost does
not depend on the size of the image.

Before that, the structural walk of `storage.codec.walk` proves the whole
encoded dataset complete (a dataset cut off in its pixel data must not be stored
as if whole); it costs a few µs against ~400-800 µs for the pydicom header read
that follows.

On the receive path the header is read by `DatasetWalk` instead, fed fragment by
fragment as the dataset arrives: a hand-written walk that reads elements as
pydicom's reader does and converts only the indexed values (~30 µs for a 12 KB
instance). pydicom (`read_header`) is only the fallback, for Explicit VR Big
Endian and Deflated Explicit VR Little Endian (see `walkable`): those are rare
on the wire, and a deflated dataset must be inflated before it can be walked,
so they are read from the stored file after arrival, where their cost does not
hold up the association.
"""

import contextlib
import io
import json
import mmap
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import DicomDictionary, dictionary_VR
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filereader import ENCODED_VR, read_dataset
from pydicom.tag import BaseTag
from pydicom.values import convert_string

from storage.attributes import ATTRIBUTES
from storage.codec.datasets import lenient_reading
from storage.codec.dates import normal_date, normal_time
from storage.codec.syntax import TransferSyntax
from storage.codec.syntax import transfer_syntax as syntax_of
from storage.codec.walk import (
    ITEM,
    ITEM_DELIMITER,
    LONG_LENGTH_VR_BYTES,
    SEQUENCE_DELIMITER,
    UNDEFINED_LENGTH,
    UNPACK_EXPLICIT_LE,
    UNPACK_LONG_LE,
    UNPACK_TAG_LENGTH_LE,
    FragmentWalk,
    HeaderError,
    StructureWalk,
    check_structure,
    looks_implicit,
)

# Inflating a deflated dataset only to read its header: cap the work a hostile
# "zip bomb" can cause. A dataset that inflates past the cap is indexed from its
# first MAX_INFLATED_HEADER_BYTES but not checked for completeness (see read_header).
MAX_INFLATED_HEADER_BYTES = 64 * 1024 * 1024
_INFLATE_CHUNK = 1024 * 1024

# The elements read: the indexed attributes, and the character set of their text.
_TAGS = {"SpecificCharacterSet": 0x00080005, **{a.keyword: a.tag for a in ATTRIBUTES}}
_SPECIFIC_TAGS = list(_TAGS.values())


@dataclass(frozen=True)
class InstanceHeader:
    """What the index keeps of one instance, split by the level it describes.

    Values that the dataset lacks are None; UIDs may be None too and are
    validated by the caller, which decides what a missing one means.
    """

    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_uid: str | None
    series_uid: str | None
    study: dict = field(default_factory=dict)
    series: dict = field(default_factory=dict)
    instance: dict = field(default_factory=dict)


def read_header(stream: BinaryIO, transfer_syntax: str) -> InstanceHeader:
    """Decode the indexed attributes of the encoded dataset that `stream` holds
    from its current position (a BytesIO off the wire, or a file after its meta).

    Raises HeaderError when the bytes are not a dataset in `transfer_syntax`, or
    when they are a truncated one (see `check_structure`). A deflated dataset is
    inflated first (at most MAX_INFLATED_HEADER_BYTES of it); one whose deflate
    stream ends early is truncated, and one that inflates past the cap is indexed
    without the structural check, which would need all of it.

    The stream's position is where it was when the call returns (or the dataset's
    end, for a deflated one).
    """
    syntax = syntax_of(transfer_syntax)
    checked = True
    if syntax.deflated:
        stream, checked = _inflate(stream)
    if checked:
        with _encoded_bytes(stream) as (buffer, start):
            check_structure(
                buffer, start, implicit=syntax.implicit, little_endian=syntax.little_endian
            )
    with lenient_reading:
        dataset = _parse(stream, syntax.implicit, syntax.little_endian)
        return _header_from(_DatasetSource(dataset))


class _DatasetSource:
    """The indexed values of a pydicom Dataset (what read_header reads)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def text(self, keyword: str) -> str | None:
        return _text(self.dataset, keyword)

    def items(self, keyword: str) -> list:
        return _items(self.dataset, keyword)


def _header_from(source) -> InstanceHeader:
    """The InstanceHeader of a source of values: `source.text(keyword)` (see
    `_text`) and `source.items(keyword)` (see `_items`). Shared by read_header
    (a pydicom Dataset) and DatasetWalk (the elements the walk kept)."""
    text, items = source.text, source.items
    header = InstanceHeader(
        sop_class_uid=text("SOPClassUID"),
        sop_instance_uid=text("SOPInstanceUID"),
        study_uid=text("StudyInstanceUID"),
        series_uid=text("SeriesInstanceUID"),
        study={
            "patient_id": text("PatientID"),
            "issuer_of_patient_id": text("IssuerOfPatientID"),
            "patient_name": text("PatientName"),
            "patient_birth_date": text("PatientBirthDate"),
            "patient_sex": text("PatientSex"),
            "study_date": text("StudyDate"),
            "study_time": text("StudyTime"),
            "timezone_offset": text("TimezoneOffsetFromUTC"),
            "accession": text("AccessionNumber"),
            "accession_issuer": _accession_issuer(items("IssuerOfAccessionNumberSequence")),
            "study_id": text("StudyID"),
            "description": text("StudyDescription"),
            "referrer": text("ReferringPhysicianName"),
            "interpreter": text("NameOfPhysiciansReadingStudy"),
            "procedure_codes": _codes(items("ProcedureCodeSequence")),
            "reason": text("ReasonForTheRequestedProcedure")
            or text("AdmittingDiagnosesDescription"),
            "institution": text("InstitutionName"),
            "department": text("InstitutionalDepartmentName"),
        },
        series={
            "modality": text("Modality"),
            "number": _integer(text, "SeriesNumber"),
            "description": text("SeriesDescription"),
            "body_part": text("BodyPartExamined"),
            "laterality": text("Laterality") or text("ImageLaterality"),
            "series_date": text("SeriesDate"),
            "series_time": text("SeriesTime"),
            "performer": text("PerformingPhysicianName") or text("OperatorsName"),
        },
        instance={
            "number": _integer(text, "InstanceNumber"),
            "title": _title(text, items("ConceptNameCodeSequence")),
            "number_of_frames": _integer(text, "NumberOfFrames"),
        },
    )
    _normalize_dates(header.study, ("patient_birth_date", "study_date"), ("study_time",))
    _normalize_dates(header.series, ("series_date",), ("series_time",))
    return header


def _normalize_dates(values: dict, dates: tuple[str, ...], times: tuple[str, ...]) -> None:
    """Dates and times in one form, for the index's filters, tables, C-FIND and
    FHIR alike; the value as sent kept beside (`<name>_raw`) when it differs."""
    for names, normal in ((dates, normal_date), (times, normal_time)):
        for name in names:
            raw = values[name]
            values[name] = normal(raw) if raw is not None else None
            values[name + "_raw"] = raw if raw != values[name] else None


def _inflate(stream: BinaryIO) -> tuple[io.BytesIO, bool]:
    """The inflated dataset, and whether it is all of it (False: the cap was hit).

    Raises HeaderError when the deflate stream is corrupt or ends before its
    final block (the dataset is truncated).
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = bytearray()
    try:
        while not inflater.eof:
            room = MAX_INFLATED_HEADER_BYTES - len(inflated)
            if room <= 0:
                return io.BytesIO(inflated), False
            data = inflater.unconsumed_tail or stream.read(_INFLATE_CHUNK)
            if not data:
                raise HeaderError(
                    f"dataset is truncated: deflate stream ends early,"
                    f" after {len(inflated)} inflated bytes"
                )
            inflated += inflater.decompress(data, room)
    except zlib.error as exc:
        raise HeaderError(f"deflated dataset does not inflate: {exc}") from exc
    return io.BytesIO(inflated), True


def _parse(stream: BinaryIO, implicit: bool, little: bool) -> Dataset:
    try:
        dataset = read_dataset(
            stream,
            is_implicit_VR=implicit,
            is_little_endian=little,
            stop_when=_at_pixel_data,
            specific_tags=_SPECIFIC_TAGS,
        )
    except Exception as exc:  # pydicom raises many kinds on malformed input
        raise HeaderError(f"dataset does not parse: {exc}") from exc
    return dataset


def _at_pixel_data(tag, vr, length) -> bool:
    return tag in (0x7FE00010, 0x7FE00009, 0x7FE00008)


def _text(dataset: Dataset, keyword: str) -> str | None:
    """Return the element's value as one string (multiple values joined by a
    backslash, as DICOM writes them), or None when absent or empty."""
    try:
        element = dataset.get(_TAGS[keyword])
        if element is None:
            return None
        value = element.value
    except Exception:
        return None
    return _value_text(value)


def _value_text(value) -> str | None:
    """`_text` of an element's converted value."""
    if value is None:
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(item) for item in value)
    text = str(value).strip().strip("\x00").strip()
    return text or None


def _integer(text_of, keyword: str) -> int | None:
    text = text_of(keyword)
    if text is None:
        return None
    try:
        value = int(float(text.split("\\")[0]))
    except (ValueError, OverflowError):  # "abc", "NaN"; "1e400" is infinite
        return None
    # An IS holds at most 12 characters: a value SQLite cannot store as an
    # INTEGER is no number of ours, and would fail the index write.
    return value if -(2**63) <= value < 2**63 else None


def _items(dataset: Dataset, keyword: str) -> list[Dataset]:
    try:
        element = dataset.get(_TAGS[keyword])
        return list(element.value) if element is not None and element.value else []
    except Exception:
        return []


def _item_value(item, keyword: str):
    """An item's value, or None where pydicom cannot convert it (an unknown VR
    raises NotImplementedError, a bad value anything): a sender's odd item must
    not stop us from storing its object."""
    try:
        return item.get(keyword)
    except Exception:
        return None


def _codes(items: list) -> str | None:
    """A code sequence as JSON: [{"code", "system", "display"}], or None."""
    codes = []
    for item in items:
        code = {
            "code": _item_value(item, "CodeValue"),
            "system": _item_value(item, "CodingSchemeDesignator"),
            "display": _item_value(item, "CodeMeaning"),
        }
        codes.append({k: str(v) for k, v in code.items() if v})
    codes = [code for code in codes if code]
    return json.dumps(codes) if codes else None


def _accession_issuer(items: list) -> str | None:
    for item in items:
        for keyword in ("UniversalEntityID", "LocalNamespaceEntityID"):
            value = _item_value(item, keyword)
            if value:
                return str(value)
    return None


def _title(text_of, items: list) -> str | None:
    label = text_of("ContentLabel")
    if label:
        return label
    for item in items:
        meaning = _item_value(item, "CodeMeaning")
        if meaning:
            return str(meaning)
    return text_of("DocumentTitle")


@contextlib.contextmanager
def _encoded_bytes(stream: BinaryIO) -> Iterator[tuple[object, int]]:
    """(buffer, start): bytes holding the dataset of `stream` from `start`, for
    `check_structure`, without copying them. The stream's position is unchanged.

    A BytesIO lends its buffer (released on exit, so the BytesIO may grow
    again); a file is mapped, so a large object received to disk is not read
    into memory; anything else is read and the position restored.
    """
    start = stream.tell()
    if isinstance(stream, io.BytesIO):
        with stream.getbuffer() as view:
            yield view, start
        return
    try:
        fileno = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fileno = None
    if fileno is not None:
        flush = getattr(stream, "flush", None)
        if flush is not None and getattr(stream, "writable", lambda: False)():
            flush()  # a spool file still being written: map what it holds
        if os.fstat(fileno).st_size <= start:
            yield b"", 0  # nothing after the position (mmap refuses an empty file)
            return
        with (
            mmap.mmap(fileno, 0, access=mmap.ACCESS_READ) as mapped,
            memoryview(mapped) as view,
        ):
            yield view, start
        return
    data = stream.read()
    stream.seek(start)
    yield data, 0


# -- Incremental walk --------------------------------------------------------------
#
# `DatasetWalk` is fed the dataset bytes as they arrive and yields what
# `read_header` yields, without pydicom's reader. It runs two walks over the same
# bytes: the codec's `StructureWalk` (it decides "dataset is truncated"), and
# `_ReaderWalk`, which reads the elements the way pydicom's `read_dataset` does
# (with the same `specific_tags` and `stop_when`), so that it sees the same
# elements as `read_header` even where the two readings of hostile bytes differ,
# and fails where pydicom fails ("dataset does not parse"). Values are converted
# with pydicom's own converters (`convert_raw_data_element`), or, for plain ASCII
# text, with a shortcut that gives the same strings.

_MAX_WANTED_VALUE = 1024 * 1024  # a wanted value longer than this is left out
_MAX_UNDEFINED_VALUE = 4 * 1024 * 1024  # see _ReaderWalk: undefined-length non-SQ values
# pydicom's recursive reader fails (RecursionError) at ~190 levels of undefined-
# length sequences; we refuse sooner, at a depth no real object reaches.
MAX_SEQUENCE_DEPTH = 128
_STOP_TAGS = frozenset((0x7FE00010, 0x7FE00009, 0x7FE00008))
_CHARSET = 0x00080005
_WANTED_TOP = frozenset(_SPECIFIC_TAGS) | {_CHARSET}
_SEQUENCE_KEYWORDS = (
    "IssuerOfAccessionNumberSequence",
    "ProcedureCodeSequence",
    "ConceptNameCodeSequence",
)
_WANTED_SEQUENCES = frozenset(_TAGS[k] for k in _SEQUENCE_KEYWORDS)
_WANTED_IN_ITEMS = frozenset((0x00080100, 0x00080102, 0x00080104, 0x00400031, 0x00400032, _CHARSET))
# The 2-byte VRs pydicom's reader knows.
_ENCODED_VR = frozenset(vr for vr in ENCODED_VR if len(vr) == 2)
# VRs whose pydicom conversion of a plain ASCII value (printable, no backslash,
# padded at most with spaces and NULs) is that value: the shortcut of `_WalkResult`.
_PLAIN_VRS = frozenset(
    ["AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UT"]
)
_PRINTABLE = bytes(range(0x20, 0x7F)).replace(b"\\", b"")
_PLAIN_INTEGER = re.compile(rb" *[+-]?[0-9]{1,12} *\x00?")
_ENCODINGS_CACHE: dict = {}


def walkable(transfer_syntax: str) -> bool:
    """False for Explicit VR Big Endian and Deflated Explicit VR Little Endian: those are
    read with read_header (pydicom) from the stored file after arrival."""
    return _walks(syntax_of(transfer_syntax))


def _walks(syntax: TransferSyntax) -> bool:
    return syntax.little_endian and not syntax.deflated


def _does_not_parse(message: str) -> HeaderError:
    return HeaderError(f"dataset does not parse: {message}")


class _Frame:
    """A dataset being read by `_ReaderWalk` (pydicom's read_dataset)."""

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


_DELIMITER_BYTES = struct.pack("<HH", 0xFFFE, 0xE0DD)
_ITEM_BYTES = struct.pack("<HH", 0xFFFE, 0xE000)


class _ReaderWalk(FragmentWalk):
    """pydicom's `read_dataset(stop_when=_at_pixel_data, specific_tags=_TAGS)`,
    fed fragment by fragment, keeping only the elements the header needs.

    Its errors are kept in `self.error` (read_header checks the structure first,
    and a truncation is reported before anything pydicom says)."""

    def __init__(self, implicit: bool):
        super().__init__()
        self.top = {}
        self.stack: list = [_Frame(implicit, None, True, self.top, default_encoding)]
        self.depth = 0
        self.collecting = None  # (store, tag, vr, implicit, length, bytearray, left)
        self.error: HeaderError | None = None

    def _fail(self, error: HeaderError) -> None:
        self.error = error
        self.done = True

    def _run(self, buffer, base: int, final: bool) -> None:
        try:
            self._read(buffer, base, final)
        except HeaderError as error:
            self._fail(error)

    def _read(self, buffer, base: int, final: bool) -> None:  # noqa: C901
        end = len(buffer)
        pos = self.pos - base
        stack = self.stack
        recursed = False
        try:
            while not self.done:
                if self.collecting is not None:
                    store, tag, vr, implicit, length, value, left = self.collecting
                    take = min(left, end - pos)
                    if take > 0:
                        value += buffer[pos : pos + take]
                        pos += take
                    if take < left and not final:
                        self.collecting = (store, tag, vr, implicit, length, value, left - take)
                        return
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
                    self.pos = resolved
                    recursed = True
                    self._read(memoryview(rest), resolved, final)
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
                    pos = _skip_unwanted(buffer, pos, end, frame.implicit)
                    remaining = end - pos
                elif frame.end is not None and base + pos >= frame.end:
                    self._dataset_read(stack.pop())
                    continue
                if remaining < 8:
                    if not final:
                        return
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
                if frame.top and tag in _STOP_TAGS:
                    self.done = True
                    return
                store = frame.store
                if length != UNDEFINED_LENGTH:
                    keep = store is not None and (
                        tag in _WANTED_TOP if frame.top else tag in _WANTED_IN_ITEMS
                    )
                    if not keep and tag == _CHARSET and not frame.top:
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
                        self._keep(
                            store,
                            tag,
                            vr,
                            frame.implicit,
                            length,
                            bytes(buffer[pos : pos + length]),
                        )
                        pos += length
                        continue
                    self.collecting = (store, tag, vr, frame.implicit, length, bytearray(), length)
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
                wanted = frame.top and tag in _WANTED_TOP
                if vr == "SQ":
                    self.depth += 1
                    if self.depth > MAX_SEQUENCE_DEPTH:
                        raise _does_not_parse(
                            f"sequences nest deeper than {MAX_SEQUENCE_DEPTH} levels"
                        )
                    encoding = frame.encoding if frame.top else None
                    stack.append(
                        _Sequence(
                            tag, frame.implicit, encoding, wanted and tag in _WANTED_SEQUENCES
                        )
                    )
                    if wanted and tag not in _WANTED_SEQUENCES:
                        self.top[tag] = None  # a sequence where we want text: left out
                    continue
                stack.append(_Undefined(tag, vr, frame.implicit, base + pos, wanted))
        finally:
            if not recursed:
                self.pos = base + pos

    def _keep(self, store, tag, vr, implicit, length, value) -> None:
        frame = self.stack[-1]
        if tag == _CHARSET:
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
            _dataset_encoding(frame.charset)  # raises as read_dataset does
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


def _skip_unwanted(buffer, pos: int, end: int, implicit: bool) -> int:
    """The fast path of `_ReaderWalk` at the top level: skip whole elements of
    defined length that are not wanted; return the offset of the first element
    that needs more care."""
    limit = end - 12
    wanted = _WANTED_TOP
    stop = _STOP_TAGS
    if implicit:
        while pos <= limit:
            group, element, length = UNPACK_TAG_LENGTH_LE(buffer, pos)
            if length == UNDEFINED_LENGTH or group == 0xFFFE:
                return pos
            tag = group << 16 | element
            if tag in wanted or tag in stop:
                return pos
            pos += 8 + length
        return pos
    long_vrs = LONG_LENGTH_VR_BYTES
    encoded = _ENCODED_VR
    while pos <= limit:
        group, element, vr, length = UNPACK_EXPLICIT_LE(buffer, pos)
        if vr in long_vrs:
            length = UNPACK_LONG_LE(buffer, pos + 8)[0]
            if length == UNDEFINED_LENGTH:
                return pos
            header = 12
        elif vr in encoded:
            header = 8
        else:
            return pos
        tag = group << 16 | element
        if tag in wanted or tag in stop:
            return pos
        pos += header + length
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


def _dataset_encoding(charset):
    """The encoding read_dataset gives a dataset from its raw (0008,0005)."""
    key = ("dataset", *charset)
    cached = _ENCODINGS_CACHE.get(key)
    if cached is None:
        vr, implicit, length, value = charset
        raw = RawDataElement(BaseTag(_CHARSET), vr, length, value, 0, implicit, True)
        try:
            with lenient_reading:
                cached = convert_encodings(convert_raw_data_element(raw).value)
        except Exception as exc:
            raise _does_not_parse(str(exc)) from exc
        if len(_ENCODINGS_CACHE) < 256:
            _ENCODINGS_CACHE[key] = cached
    return cached


class DatasetWalk:
    """The incremental reading of a dataset's header, fed as the bytes arrive.

    `finish()` returns what `read_header(io.BytesIO(all the bytes), syntax)`
    returns, and raises HeaderError where it raises (see the notes above).
    """

    def __init__(self, transfer_syntax: str):
        syntax = syntax_of(transfer_syntax)
        if not _walks(syntax):
            raise ValueError(f"{transfer_syntax} is read with read_header, not walked")
        implicit = syntax.implicit
        self._structure = StructureWalk(implicit)
        self._reader = _ReaderWalk(implicit)
        self._finished = False

    def feed(self, data) -> None:
        """data: bytes or memoryview of any length (0 included). The caller REUSES its buffer
        after feed returns, so do not keep references to `data` (copy what you keep)."""
        if not data:
            return
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        try:
            self._structure.feed(view)
            self._reader.feed(view)
        finally:
            view.release()

    def finish(self) -> InstanceHeader:
        """After the last fragment. Raises HeaderError("dataset is truncated: ...") or
        HeaderError("dataset does not parse: ...") like read_header does."""
        if self._finished:
            raise RuntimeError("finish() was called already")
        self._finished = True
        self._structure.finish()
        reader = self._reader
        reader.finish()
        if reader.error is not None:
            raise reader.error
        with lenient_reading:
            return _header_from(_WalkResult(reader.top))


class _WalkResult:
    """The elements `_ReaderWalk` kept, read as read_header reads its Dataset."""

    def __init__(self, top: dict):
        self.top = top
        charset = top.get(_CHARSET)
        self.encoding = _dataset_encoding(charset) if charset else default_encoding

    def text(self, keyword: str) -> str | None:
        tag = _TAGS[keyword]
        raw = self.top.get(tag)
        if raw is None:
            return None
        vr, implicit, length, value = raw
        if vr is None:
            vr = _DICTIONARY_VRS.get(tag) or _dictionary_vr(tag)
        elif vr == "UN" and len(value) < 0xFFFF:
            vr = _DICTIONARY_VRS.get(tag) or vr
        if vr in _PLAIN_VRS and length != UNDEFINED_LENGTH:
            body = value.rstrip(b" \x00")
            if not body.translate(None, _PRINTABLE):
                return body.decode("ascii").strip() or None
        elif vr == "IS" and _PLAIN_INTEGER.fullmatch(value):
            # What pydicom's IS makes of it has the same value, which is all
            # that is read of an IS (`_integer`).
            return value.decode("ascii").strip(" \x00")
        try:
            element = self._convert(tag, raw)
        except Exception:
            return None
        return _value_text(element.value)

    def _convert(self, tag: int, raw):
        vr, implicit, length, value = raw
        encoding = default_encoding if tag == _CHARSET else self.encoding
        element = RawDataElement(BaseTag(tag), vr, length, value, 0, implicit, True)
        return convert_raw_data_element(element, encoding=encoding)

    def items(self, keyword: str) -> list:
        tag = _TAGS[keyword]
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


def _item_dataset(store: dict, parent_encoding) -> Dataset:
    """An item as pydicom's read_dataset makes it (of the elements kept)."""
    elements = {
        BaseTag(tag): RawDataElement(BaseTag(tag), vr, length, value, 0, implicit, True)
        for tag, (vr, implicit, length, value) in ((t, r) for t, r in store.items() if r)
    }
    dataset = Dataset(elements, parent_encoding=parent_encoding)
    charset = store.get(_CHARSET)
    encoding = _dataset_encoding(charset) if charset else parent_encoding
    implicit = next((raw[1] for raw in store.values()), True)
    dataset.set_original_encoding(implicit, True, encoding)
    return dataset


_DICTIONARY_VRS = {tag: _dictionary_vr(tag) for tag in _SPECIFIC_TAGS}
