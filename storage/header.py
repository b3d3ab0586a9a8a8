"""Read the header attributes the index needs from a dataset's encoded bytes.

The bytes are the dataset exactly as it came off the wire (no file meta). Only the
listed tags are decoded, and reading stops before the pixel data, so the cost does
not depend on the size of the image.
"""

import io
import json
import zlib
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
# "zip bomb" can cause.
MAX_INFLATED_HEADER_BYTES = 64 * 1024 * 1024

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

    Raises HeaderError when the bytes are not a dataset in `transfer_syntax`.
    """
    dataset = _parse(stream, transfer_syntax)
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


def _parse(stream: BinaryIO, transfer_syntax: str) -> Dataset:
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    little = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            stream = io.BytesIO(inflater.decompress(stream.read(), MAX_INFLATED_HEADER_BYTES))
        except zlib.error as exc:
            raise HeaderError(f"deflated dataset does not inflate: {exc}") from exc
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
        return int(float(text.split("\\")[0]))
    except ValueError:
        return None


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
