"""An instance's header: the attributes the index keeps of it, read from the
dataset's encoded bytes (exactly as they came off the wire, no file meta).

Only the listed tags are decoded (`_TAGS`), and reading stops before the pixel
data, so the cost does not depend on the size of the image. The bytes are read
by the codec's one walk (`storage.codec.walk.ElementWalk`), which proves the
whole dataset complete as it reads (a dataset cut off in its pixel data must not
be stored as if whole): fed fragment by fragment as the dataset arrives
(`DatasetWalk`, ~30 µs for a 12 KB instance on a quiet machine), or given a
stored file at once (`read_header`, for rebuild and verify), so that a file is
read again as it was read when it arrived. pydicom reads what the walk does not
(`read_header_with_pydicom`): Explicit VR Big Endian, and a deflated dataset
that inflates past the cap. Big endian and deflated datasets are rare on the
wire, and a deflated one must be inflated before it can be walked, so both are
read from the stored file after arrival (see `walkable`), where their cost does
not hold up the association.
"""

import json
from dataclasses import dataclass, field
from typing import BinaryIO

from storage.attributes import ATTRIBUTES, INDEX_INTEGERS, index_text
from storage.codec.datasets import lenient_reading
from storage.codec.dates import normal_date, normal_time
from storage.codec.streams import encoded_bytes, inflate, read_with_pydicom
from storage.codec.syntax import transfer_syntax as syntax_of
from storage.codec.walk import (
    ElementWalk,
    check_structure,
    read_elements,
    wanted_tags,
)

# Inflating a deflated dataset only to read its header: cap the work a hostile
# "zip bomb" can cause. A dataset that inflates past the cap is indexed from its
# first MAX_INFLATED_HEADER_BYTES but not checked for completeness (see read_header).
MAX_INFLATED_HEADER_BYTES = 64 * 1024 * 1024

# The elements read: the indexed attributes, and the character set of their text.
_TAGS = {"SpecificCharacterSet": 0x00080005, **{a.keyword: a.tag for a in ATTRIBUTES}}
_SPECIFIC_TAGS = list(_TAGS.values())
# What the walk keeps: the tags above, the items of these sequences, and of
# those items the code (value, scheme, meaning), the issuer's entity IDs and
# the character set.
_WANTED = wanted_tags(
    _SPECIFIC_TAGS,
    (
        _TAGS["IssuerOfAccessionNumberSequence"],
        _TAGS["ProcedureCodeSequence"],
        _TAGS["ConceptNameCodeSequence"],
    ),
    (0x00080100, 0x00080102, 0x00080104, 0x00400031, 0x00400032, 0x00080005),
)


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
    from its current position (a BytesIO off the wire, or a file after its meta),
    with the walk that reads them as they arrive (see `DatasetWalk`), given all
    the bytes at once; offsets in messages count from the start of the stream.

    Raises HeaderError when the bytes are not a dataset in `transfer_syntax`, or
    when they are a truncated one (see `check_structure`). A deflated dataset is
    inflated first (at most MAX_INFLATED_HEADER_BYTES of it); one whose deflate
    stream ends early is truncated, and one that inflates past the cap is indexed
    by pydicom without the structural check, which would need all of it.
    Explicit VR Big Endian, which the walk does not read, is read by pydicom
    (`read_header_with_pydicom`).

    The stream's position is where it was when the call returns (or the dataset's
    end, for a deflated one).
    """
    syntax = syntax_of(transfer_syntax)
    if syntax.deflated:
        stream, whole = inflate(stream, MAX_INFLATED_HEADER_BYTES)
        if not whole:
            return read_header_with_pydicom(stream, transfer_syntax, checked=False)
    elif not syntax.little_endian:
        return read_header_with_pydicom(stream, transfer_syntax)
    with encoded_bytes(stream) as (buffer, start):
        elements = read_elements(buffer, start, implicit=syntax.implicit, wanted=_WANTED)
    with lenient_reading:
        return _header_from(elements)


def read_header_with_pydicom(
    stream: BinaryIO, transfer_syntax: str, *, checked: bool = True
) -> InstanceHeader:
    """The header as pydicom's reader reads it, after `check_structure` when
    `checked`: for what the walk does not read (see `read_header`), and the
    reference the walk is tested against. A deflated dataset is given inflated."""
    syntax = syntax_of(transfer_syntax)
    if checked:
        with encoded_bytes(stream) as (buffer, start):
            check_structure(
                buffer, start, implicit=syntax.implicit, little_endian=syntax.little_endian
            )
    with lenient_reading:
        elements = read_with_pydicom(
            stream,
            implicit=syntax.implicit,
            little_endian=syntax.little_endian,
            tags=_SPECIFIC_TAGS,
        )
        return _header_from(elements)


def _header_from(source) -> InstanceHeader:
    """The InstanceHeader of the elements read: `source.text(tag)` and
    `source.items(tag)` of the codec's walk (`WalkedElements`) or of pydicom's
    reading (`DatasetElements`)."""
    tags = _TAGS

    def text(keyword: str) -> str | None:
        value = source.text(tags[keyword])
        if value and "\0" in value:  # within the value: its padding is stripped
            return index_text(value)  # the file keeps it as sent
        return value

    def items(keyword: str) -> list:
        return source.items(tags[keyword])

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
    return value if value in INDEX_INTEGERS else None


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


def walkable(transfer_syntax: str) -> bool:
    """False for Explicit VR Big Endian and Deflated Explicit VR Little Endian: those are
    read with read_header (pydicom) from the stored file after arrival."""
    syntax = syntax_of(transfer_syntax)
    return syntax.little_endian and not syntax.deflated


class DatasetWalk:
    """The incremental reading of a dataset's header, fed as the bytes arrive.

    `finish()` returns what `read_header(io.BytesIO(all the bytes), syntax)`
    returns, and raises HeaderError where it raises (see the notes above).
    """

    def __init__(self, transfer_syntax: str):
        if not walkable(transfer_syntax):
            raise ValueError(f"{transfer_syntax} is read with read_header, not walked")
        self._walk = ElementWalk(syntax_of(transfer_syntax).implicit, _WANTED)
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
            self._walk.feed(view)
        finally:
            view.release()

    def finish(self) -> InstanceHeader:
        """After the last fragment. Raises HeaderError("dataset is truncated: ...") or
        HeaderError("dataset does not parse: ...") like read_header does."""
        if self._finished:
            raise RuntimeError("finish() was called already")
        self._finished = True
        elements = self._walk.finish()
        with lenient_reading:
            return _header_from(elements)
