"""The indexed attributes: every DICOM element the index keeps a value of, one
line each, as data. The header read takes its tags from here, the index its
columns, C-FIND its keys, the admin commands' JSON its plain names; FHIR
rendering reads the columns by the names given here (its element for each is
noted). Adding an indexed attribute is one line below and a schema version
step (storage.catalog.index.SCHEMA_VERSION): the column is created, and the
instances received before it are read again by `rebuild`.

Rules the list follows, which its readers rely on:
- A column is at the level of the rows it is kept in: PATIENT and STUDY
  attributes in `studies` (a patient's as its first instance of the study gave
  them), SERIES in `series`, INSTANCE in `instances`.
- Several elements may fill one column: the first of them present in a dataset
  gives its value (Laterality, else ImageLaterality), in the order listed; the
  first of them is the column's C-FIND key, when it has one. How a sequence is
  read (a code's meaning, an issuer) is the header read's (storage.header).
- VR DA and TM columns hold the value normalised (storage.codec.dates), and
  `<column>_raw` beside it the value as sent when it differs; IS columns hold
  integers, every other column text. A `folded` name has `<column>_folded`
  beside it, case folded (storage.names.fold_name), which matching reads.
- UI attributes are the rows' keys and references: their columns are part of
  the tables' fixed layout, not fields filled in by later instances.
"""

from dataclasses import dataclass

PATIENT, STUDY, SERIES, INSTANCE = "patient", "study", "series", "instance"

# The integers an IS column holds (SQLite's INTEGER, PostgreSQL's BIGINT): the
# header read keeps no other, and a query for another can match nothing.
INDEX_INTEGERS = range(-(2**63), 2**63)


def index_text(value: str) -> str:
    """A text value as the index holds it: a NUL within it (no text VR has one,
    and PostgreSQL's text holds none) as U+FFFD, on either engine."""
    return value.replace("\0", "\ufffd")


@dataclass(frozen=True)
class Attribute:
    keyword: str  # the DICOM keyword
    tag: int
    vr: str
    level: str  # PATIENT, STUDY, SERIES or INSTANCE
    column: str  # the index column it fills
    # C-FIND matches and returns it (storage.catalog.find).
    key: bool = False
    # A person name that C-FIND and the admin filters match case-insensitively.
    folded: bool = False
    # The ImagingStudy element it feeds (R4 name, below the study, series or
    # instance), where it feeds one.
    fhir: str | None = None
    # Its name in the admin commands' JSON (storage.documents), where it is
    # shown as indexed; the ImagingStudy element's name where there is one.
    json: str | None = None

    @property
    def python_type(self) -> type:
        """The type of its column's values."""
        return int if self.vr == "IS" else str


A = Attribute
ATTRIBUTES = (
    A("PatientID", 0x00100020, "LO", PATIENT, "patient_id", key=True, fhir="subject.identifier"),
    A("IssuerOfPatientID", 0x00100021, "LO", PATIENT, "issuer_of_patient_id", key=True,
      fhir="subject.identifier.assigner"),
    A("PatientName", 0x00100010, "PN", PATIENT, "patient_name", key=True, folded=True,
      fhir="subject.display"),
    A("PatientBirthDate", 0x00100030, "DA", PATIENT, "patient_birth_date", key=True),
    A("PatientSex", 0x00100040, "CS", PATIENT, "patient_sex", key=True),
    A("StudyInstanceUID", 0x0020000D, "UI", STUDY, "study_uid", key=True, fhir="identifier",
      json="uid"),
    A("StudyDate", 0x00080020, "DA", STUDY, "study_date", key=True, fhir="started"),
    A("StudyTime", 0x00080030, "TM", STUDY, "study_time", key=True, fhir="started"),
    A("TimezoneOffsetFromUTC", 0x00080201, "SH", STUDY, "timezone_offset", fhir="started"),
    A("AccessionNumber", 0x00080050, "SH", STUDY, "accession", key=True, fhir="identifier",
      json="accession"),
    A("IssuerOfAccessionNumberSequence", 0x00080051, "SQ", STUDY, "accession_issuer",
      fhir="identifier.assigner"),
    A("StudyID", 0x00200010, "SH", STUDY, "study_id", key=True, fhir="identifier"),
    A("StudyDescription", 0x00081030, "LO", STUDY, "description", key=True, fhir="description",
      json="description"),
    A("ReferringPhysicianName", 0x00080090, "PN", STUDY, "referrer", key=True, folded=True,
      fhir="referrer", json="referrer"),
    A("NameOfPhysiciansReadingStudy", 0x00081060, "PN", STUDY, "interpreter",
      fhir="interpreter"),
    A("ProcedureCodeSequence", 0x00081032, "SQ", STUDY, "procedure_codes",
      fhir="procedureCode"),
    A("ReasonForTheRequestedProcedure", 0x00401002, "LO", STUDY, "reason", fhir="reasonCode"),
    A("AdmittingDiagnosesDescription", 0x00081080, "LO", STUDY, "reason", fhir="reasonCode"),
    A("InstitutionName", 0x00080080, "LO", STUDY, "institution", fhir="location"),
    A("InstitutionalDepartmentName", 0x00081040, "LO", STUDY, "department", fhir="location"),
    A("SeriesInstanceUID", 0x0020000E, "UI", SERIES, "series_uid", key=True, fhir="uid",
      json="uid"),
    A("Modality", 0x00080060, "CS", SERIES, "modality", key=True, fhir="modality",
      json="modality"),
    A("SeriesNumber", 0x00200011, "IS", SERIES, "number", key=True, fhir="number",
      json="number"),
    A("SeriesDescription", 0x0008103E, "LO", SERIES, "description", key=True,
      fhir="description", json="description"),
    A("BodyPartExamined", 0x00180015, "CS", SERIES, "body_part", key=True, fhir="bodySite",
      json="bodySite"),
    A("Laterality", 0x00200060, "CS", SERIES, "laterality", key=True, fhir="laterality",
      json="laterality"),
    A("ImageLaterality", 0x00200062, "CS", SERIES, "laterality", fhir="laterality"),
    A("SeriesDate", 0x00080021, "DA", SERIES, "series_date", key=True, fhir="started"),
    A("SeriesTime", 0x00080031, "TM", SERIES, "series_time", key=True, fhir="started"),
    A("PerformingPhysicianName", 0x00081050, "PN", SERIES, "performer", fhir="performer"),
    A("OperatorsName", 0x00081070, "PN", SERIES, "performer", fhir="performer"),
    A("SOPInstanceUID", 0x00080018, "UI", INSTANCE, "sop_instance_uid", key=True, fhir="uid",
      json="uid"),
    A("SOPClassUID", 0x00080016, "UI", INSTANCE, "sop_class_uid", key=True, fhir="sopClass",
      json="sopClass"),
    A("InstanceNumber", 0x00200013, "IS", INSTANCE, "number", key=True, fhir="number",
      json="number"),
    A("ContentLabel", 0x00700080, "CS", INSTANCE, "title", fhir="title", json="title"),
    A("ConceptNameCodeSequence", 0x0040A043, "SQ", INSTANCE, "title", fhir="title"),
    A("DocumentTitle", 0x00420010, "ST", INSTANCE, "title", fhir="title"),
    A("NumberOfFrames", 0x00280008, "IS", INSTANCE, "number_of_frames", key=True),
)  # fmt: skip
del A


def columns(*levels: str) -> dict[str, type]:
    """The columns that the attributes of `levels` fill in, as the index lays
    them out: each column once, in the order listed, with the values as sent
    of the dates and times after the last of them, and the folded names at the
    end (UIDs are the tables' own)."""
    kept = [a for a in ATTRIBUTES if a.level in levels and a.vr != "UI"]
    dated = [a for a in kept if a.vr in ("DA", "TM")]
    found = {}
    for attribute in kept:
        found.setdefault(attribute.column, attribute.python_type)
        if dated and attribute is dated[-1]:
            found |= {f"{a.column}_raw": str for a in dated}
    return found | {f"{a.column}_folded": str for a in kept if a.folded}


def shown(*levels: str) -> list[Attribute]:
    """The attributes of `levels` that the admin commands' JSON shows as indexed."""
    return [a for a in ATTRIBUTES if a.level in levels and a.json is not None]
