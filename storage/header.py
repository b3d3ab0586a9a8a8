"""Read the header attributes the index needs from a dataset's encoded bytes.

The bytes are the dataset exactly as it came off the wire (no file meta). Only the
listed tags are decoded, and reading stops before the pixel data, so the cost does
not depend on the size of the image.

Before that, `check_structure` walks the whole encoded dataset, element by
element, to prove that it is complete: pydicom accepts a value shorter than its
declared length, and the header read stops before the pixel data, so without the
walk a dataset cut off in its pixel data would be stored as if whole. The walk
reads tags and lengths only and skips defined-length values by their length, so
it costs well under a microsecond per element whatever the size of the values
(measured: ~20 µs for a 512x512 CT of 57 elements, ~8 µs for a 12 KB instance,
against ~400-800 µs for the pydicom header read that follows).
"""

import contextlib
import io
import json
import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import pydicom.config
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

# A sender's odd value (an IS of "abc") must not stop us from storing its object:
# we read what we can and leave the rest empty.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"

# Inflating a deflated dataset only to read its header: cap the work a hostile
# "zip bomb" can cause. A dataset that inflates past the cap is indexed from its
# first MAX_INFLATED_HEADER_BYTES but not checked for completeness (see read_header).
MAX_INFLATED_HEADER_BYTES = 64 * 1024 * 1024
_INFLATE_CHUNK = 1024 * 1024

_TAGS = {
    "SpecificCharacterSet": 0x00080005,
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "StudyDate": 0x00080020,
    "SeriesDate": 0x00080021,
    "StudyTime": 0x00080030,
    "SeriesTime": 0x00080031,
    "AccessionNumber": 0x00080050,
    "IssuerOfAccessionNumberSequence": 0x00080051,
    "Modality": 0x00080060,
    "InstitutionName": 0x00080080,
    "ReferringPhysicianName": 0x00080090,
    "TimezoneOffsetFromUTC": 0x00080201,
    "StudyDescription": 0x00081030,
    "ProcedureCodeSequence": 0x00081032,
    "SeriesDescription": 0x0008103E,
    "InstitutionalDepartmentName": 0x00081040,
    "PerformingPhysicianName": 0x00081050,
    "NameOfPhysiciansReadingStudy": 0x00081060,
    "OperatorsName": 0x00081070,
    "AdmittingDiagnosesDescription": 0x00081080,
    "PatientName": 0x00100010,
    "PatientID": 0x00100020,
    "IssuerOfPatientID": 0x00100021,
    "PatientBirthDate": 0x00100030,
    "PatientSex": 0x00100040,
    "BodyPartExamined": 0x00180015,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "StudyID": 0x00200010,
    "SeriesNumber": 0x00200011,
    "InstanceNumber": 0x00200013,
    "Laterality": 0x00200060,
    "ImageLaterality": 0x00200062,
    "NumberOfFrames": 0x00280008,
    "ReasonForRequestedProcedure": 0x00401002,
    "DocumentTitle": 0x00420010,
    "ConceptNameCodeSequence": 0x0040A043,
    "ContentLabel": 0x00700080,
}
_SPECIFIC_TAGS = list(_TAGS.values())


class HeaderError(ValueError):
    """The dataset bytes cannot be parsed far enough to index the object."""


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
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    little = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    checked = True
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        stream, checked = _inflate(stream)
    if checked:
        with _encoded_bytes(stream) as (buffer, start):
            check_structure(buffer, start, implicit=implicit, little_endian=little)
    dataset = _parse(stream, implicit, little)
    return InstanceHeader(
        sop_class_uid=_text(dataset, "SOPClassUID"),
        sop_instance_uid=_text(dataset, "SOPInstanceUID"),
        study_uid=_text(dataset, "StudyInstanceUID"),
        series_uid=_text(dataset, "SeriesInstanceUID"),
        study={
            "patient_id": _text(dataset, "PatientID"),
            "issuer_of_patient_id": _text(dataset, "IssuerOfPatientID"),
            "patient_name": _text(dataset, "PatientName"),
            "patient_birth_date": _text(dataset, "PatientBirthDate"),
            "patient_sex": _text(dataset, "PatientSex"),
            "study_date": _text(dataset, "StudyDate"),
            "study_time": _text(dataset, "StudyTime"),
            "timezone_offset": _text(dataset, "TimezoneOffsetFromUTC"),
            "accession": _text(dataset, "AccessionNumber"),
            "accession_issuer": _accession_issuer(dataset),
            "study_id": _text(dataset, "StudyID"),
            "description": _text(dataset, "StudyDescription"),
            "referrer": _text(dataset, "ReferringPhysicianName"),
            "interpreter": _text(dataset, "NameOfPhysiciansReadingStudy"),
            "procedure_codes": _codes(dataset, "ProcedureCodeSequence"),
            "reason": _text(dataset, "ReasonForRequestedProcedure")
            or _text(dataset, "AdmittingDiagnosesDescription"),
            "institution": _text(dataset, "InstitutionName"),
            "department": _text(dataset, "InstitutionalDepartmentName"),
        },
        series={
            "modality": _text(dataset, "Modality"),
            "number": _integer(dataset, "SeriesNumber"),
            "description": _text(dataset, "SeriesDescription"),
            "body_part": _text(dataset, "BodyPartExamined"),
            "laterality": _text(dataset, "Laterality") or _text(dataset, "ImageLaterality"),
            "series_date": _text(dataset, "SeriesDate"),
            "series_time": _text(dataset, "SeriesTime"),
            "performer": _text(dataset, "PerformingPhysicianName")
            or _text(dataset, "OperatorsName"),
        },
        instance={
            "number": _integer(dataset, "InstanceNumber"),
            "title": _title(dataset),
            "number_of_frames": _integer(dataset, "NumberOfFrames"),
        },
    )


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
    if value is None:
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(item) for item in value)
    text = str(value).strip().strip("\x00").strip()
    return text or None


def _integer(dataset: Dataset, keyword: str) -> int | None:
    text = _text(dataset, keyword)
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


def _codes(dataset: Dataset, keyword: str) -> str | None:
    """A code sequence as JSON: [{"code", "system", "display"}], or None."""
    codes = []
    for item in _items(dataset, keyword):
        code = {
            "code": item.get("CodeValue"),
            "system": item.get("CodingSchemeDesignator"),
            "display": item.get("CodeMeaning"),
        }
        codes.append({k: str(v) for k, v in code.items() if v})
    codes = [code for code in codes if code]
    return json.dumps(codes) if codes else None


def _accession_issuer(dataset: Dataset) -> str | None:
    for item in _items(dataset, "IssuerOfAccessionNumberSequence"):
        for keyword in ("UniversalEntityID", "LocalNamespaceEntityID"):
            value = item.get(keyword)
            if value:
                return str(value)
    return None


def _title(dataset: Dataset) -> str | None:
    label = _text(dataset, "ContentLabel")
    if label:
        return label
    for item in _items(dataset, "ConceptNameCodeSequence"):
        meaning = item.get("CodeMeaning")
        if meaning:
            return str(meaning)
    return _text(dataset, "DocumentTitle")


# -- Structural check ------------------------------------------------------------

_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
# Explicit VRs with 2 reserved bytes and a 4-byte length (PS3.5 table 7.1-1);
# every other VR has a 2-byte length.
_LONG_LENGTH_VRS = frozenset(
    vr.encode()
    for vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV")
)
_STRUCTS = {
    endian: (
        struct.Struct(endian + "HHI").unpack_from,  # tag, 4-byte length
        struct.Struct(endian + "HH2sH").unpack_from,  # tag, VR, 2-byte length
        struct.Struct(endian + "I").unpack_from,  # 4-byte length
    )
    for endian in "<>"
}


def _truncated(message: str) -> HeaderError:
    return HeaderError(f"dataset is truncated: {message}")


def _looks_implicit(buffer, pos: int, end: int, assumed: bool) -> bool:
    """pydicom's guess of an element's encoding: explicit when the two bytes
    after the tag are upper-case letters (a VR), implicit otherwise."""
    if end - pos < 6:
        return assumed
    first, second = buffer[pos + 4], buffer[pos + 5]
    return not (0x40 < first < 0x5B and 0x40 < second < 0x5B)


def check_structure(buffer, start: int = 0, *, implicit: bool, little_endian: bool = True) -> None:
    """Prove that the encoded dataset in `buffer[start:]` is complete: every
    element's declared length fits in the bytes, and every undefined-length
    element (sequence, item, encapsulated pixel data) has its delimiter.

    `buffer` is anything `struct.unpack_from` and indexing accept (bytes, a
    memoryview of a BytesIO or of an mmap); nothing is copied. Values of defined
    length are skipped by their length, without being read; only undefined-length
    values are descended into, to find where they end. The encoding is read as
    pydicom reads it (it decides what we index): the first element's VR bytes
    decide between explicit and implicit VR at the top level, an item of a
    sequence in an explicit-VR dataset may be in implicit VR (as the items of a
    UN of undefined length are), and an element whose VR bytes are not letters
    is read as implicit VR.

    Raises HeaderError("dataset is truncated: ...") when a length runs past the
    end of the bytes, an undefined-length element has no delimiter, or the bytes
    end inside an element header (trailing zero bytes, shorter than a header, are
    accepted as padding).
    """
    tag_and_length, explicit_element, long_length = _STRUCTS["<" if little_endian else ">"]
    end = len(buffer)
    pos = start
    implicit = _looks_implicit(buffer, pos, end, implicit)
    # The undefined-length values and items we are inside, innermost last:
    # (tag, offset of its header, encoding around it, whether it holds items).
    open_values: list[tuple[int, int, bool, bool]] = []
    in_items = False  # reading the items of an undefined-length value, not elements
    while True:
        remaining = end - pos
        if in_items:
            if remaining < 8:
                raise _no_delimiter(open_values[-1])
            group, element, length = tag_and_length(buffer, pos)
            tag = group << 16 | element
            if tag == _SEQUENCE_DELIMITER:
                pos += 8
                _, _, implicit, in_items = open_values.pop()
                continue
            if length == _UNDEFINED_LENGTH:  # an item that is a dataset up to its delimiter
                open_values.append((tag, pos, implicit, True))
                pos += 8
                in_items = False
                implicit = implicit or _looks_implicit(buffer, pos, end, implicit)
                continue
            header = 8
        else:
            if implicit:
                pos = _skip_implicit(buffer, pos, end, tag_and_length)
            else:
                pos = _skip_explicit(buffer, pos, end, explicit_element, long_length)
            remaining = end - pos
            # Only what the skipping loop leaves comes here: the end, delimiters,
            # undefined lengths, elements without a VR, and truncation.
            if remaining < 8:
                if open_values:
                    raise _no_delimiter(open_values[-1])
                if any(buffer[pos:end]):
                    raise _truncated(f"{remaining} bytes at byte {pos} are no element header")
                return  # the end, or zero padding shorter than an element header
            if implicit:
                group, element, length = tag_and_length(buffer, pos)
                header = 8
            else:
                group, element, vr, length = explicit_element(buffer, pos)
                header = 8
                if group == 0xFFFE:  # items and delimiters have no VR
                    length = long_length(buffer, pos + 4)[0]
                elif vr in _LONG_LENGTH_VRS:
                    if remaining < 12:
                        raise _truncated(
                            f"({group:04X},{element:04X}) header cut short at byte {pos}"
                        )
                    length = long_length(buffer, pos + 8)[0]
                    header = 12
                elif not b"AA" <= vr <= b"ZZ":  # no VR: pydicom reads it as implicit
                    length = long_length(buffer, pos + 4)[0]
            tag = group << 16 | element
            if tag == _ITEM_DELIMITER:
                if not open_values:
                    return  # pydicom stops reading the top-level dataset here
                pos += header
                _, _, implicit, in_items = open_values.pop()
                continue
            if length == _UNDEFINED_LENGTH:
                open_values.append((tag, pos, implicit, False))
                pos += header
                in_items = True
                continue
        if length > remaining - header:
            raise _truncated(
                f"({tag >> 16:04X},{tag & 0xFFFF:04X}) length {length},"
                f" {max(remaining - header, 0)} bytes left, at byte {pos}"
            )
        pos += header + length


def _skip_implicit(buffer, pos: int, end: int, tag_and_length) -> int:
    """The fast path of `check_structure` for implicit VR: skip whole elements of
    defined length; return the offset of the first one that needs more care."""
    limit = end - 8
    while pos <= limit:
        group, _, length = tag_and_length(buffer, pos)
        after = pos + 8 + length
        if after > end or group == 0xFFFE or length == _UNDEFINED_LENGTH:
            return pos
        pos = after
    return pos


def _skip_explicit(buffer, pos: int, end: int, explicit_element, long_length) -> int:
    """The fast path of `check_structure` for explicit VR (see _skip_implicit)."""
    limit = end - 12
    while pos <= limit:
        group, _, vr, length = explicit_element(buffer, pos)
        if group == 0xFFFE:  # an item or a delimiter: no VR
            return pos
        if vr in _LONG_LENGTH_VRS:
            length = long_length(buffer, pos + 8)[0]
            after = pos + 12 + length
            if after > end or length == _UNDEFINED_LENGTH:
                return pos
        elif b"AA" <= vr <= b"ZZ":
            after = pos + 8 + length
            if after > end:
                return pos
        else:  # an element without a VR
            return pos
        pos = after
    return pos


def _no_delimiter(open_value: tuple[int, int, bool, bool]) -> HeaderError:
    tag, offset, _, _ = open_value
    what = "item" if tag == 0xFFFEE000 else f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return _truncated(f"{what} of undefined length at byte {offset} has no delimiter")


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
