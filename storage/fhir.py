"""ImagingStudy resources rendered from index rows, for FHIR DSTU2, R4 and R5.

Each element comes from the DICOM attribute the ImagingStudy pages map it to
(Study Instance UID → ``uid``, Modalities in Study → ``modalityList``/
``modality``, Instance Availability → ``availability``, …). Four shapes: ``dstu2`` is the
published DSTU2, FHIR 1.0.2 (Coding modalities, series ``started``, instance
``sopClass``: what DSTU2 clients parse, validated with fhirclient 1.0.3's
models); ``dstu2-ballot`` is the v0.5.0 ballot page the project started from
(modality codes as strings, series ``dateTime``, ``sopclass``); both have
``availability`` and ``url`` on study and series. R4 is 4.0.1 (validated with
the R4B model, identical for ImagingStudy) and R5 is 5.0.0.
The output is plain JSON-ready dicts; empty values are left out because FHIR
rejects empty strings, arrays and objects.

Extensions this module defines (docs/admin.md lists them):

``AVAILABILITY_EXTENSION_URL``
    ``valueCode`` ONLINE | NEARLINE | OFFLINE | UNAVAILABLE (DICOM Instance
    Availability) on the study and on each series. R4 and R5 only: DSTU2 has
    native ``availability`` elements, and R4/R5 ``status`` only says whether the
    study is available at all.
``STATE_EXTENSION_URL``
    ``valueCode`` receiving | stable | complete | incomplete on the study and
    on each series, in all versions: whether more instances are still expected
    (complete: a storage commitment request covered it, all committed).
``INCOMPLETE_REASON_EXTENSION_URL``
    ``valueString``, next to a state of ``incomplete``: why the study or series
    is known to be incomplete (an aborted association, a commitment failure).

Each resource's ``id`` is the Study Instance UID: the index only holds UIDs of at
most 64 digits and dots (``storage.uids``), which is a valid FHIR id.

Absent required values (a series without Modality, a study without any patient
identification) carry the standard data-absent-reason extension instead of
being invented or dropped.
"""

import json
import re
from collections.abc import Callable, Iterator
from datetime import datetime
from zoneinfo import ZoneInfo

from pydicom.uid import UID

from storage.catalog.reads import CatalogReader, StudyFilter
from storage.codec.dates import calendar_date, time_of_day

VERSIONS = ("dstu2", "dstu2-ballot", "r4", "r5")

EXTENSION_BASE = "https://imaging-scp.example/fhir/StructureDefinition/"
AVAILABILITY_EXTENSION_URL = EXTENSION_BASE + "availability"
STATE_EXTENSION_URL = EXTENSION_BASE + "state"
INCOMPLETE_REASON_EXTENSION_URL = EXTENSION_BASE + "incomplete-reason"
DATA_ABSENT_REASON_URL = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"

DICOM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED_SYSTEM = "http://snomed.info/sct"
DICOM_UID_SYSTEM = "urn:dicom:uid"
URI_SYSTEM = "urn:ietf:rfc:3986"
IDENTIFIER_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
CONNECTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"

# Modality defined terms (PS3.3 C.7.3.1.1.1) of objects made from other objects
# or about them, not acquired from the patient (cf. PS3.16 CID 32). R4 and DSTU2
# list acquisition modalities only; a deny list keeps modalities newer than this
# code, which are acquisitions far more often than not.
NON_ACQUISITION_MODALITIES = frozenset(
    {
        "ANN",  # annotation
        "ASMT",  # content assessment results
        "CTPROTOCOL",
        "DOC",  # encapsulated document
        "FID",  # spatial fiducials
        "HC",  # hard copy
        "KO",  # key object selection
        "M3D",  # model for 3D manufacturing
        "PLAN",
        "PR",  # presentation state
        "REG",  # registration
        "RTDOSE",
        "RTINTENT",
        "RTPLAN",
        "RTRAD",
        "RTRECORD",
        "RTSEGANN",
        "RTSTRUCT",
        "RWV",  # real world value map
        "SEG",
        "SR",
        "XAPROTOCOL",
    }
)

# R4/R5 status tells a client whether it can fetch the images now; NEARLINE
# ones are retrievable, only slower.
STATUS_BY_AVAILABILITY = {
    "ONLINE": "available",
    "NEARLINE": "available",
    "OFFLINE": "registered",
    "UNAVAILABLE": "registered",
}

LATERALITY_CODES = {
    "R": ("24028007", "Right"),
    "L": ("7771000", "Left"),
    "B": ("51440002", "Right and left"),
    "U": ("66459002", "Unilateral"),
}

# DICOM Coding Scheme Designators whose FHIR system URI is certain; codes from
# other schemes keep code and display but no system rather than a guessed one.
CODING_SYSTEMS = {
    "DCM": DICOM_SYSTEM,
    "SCT": SNOMED_SYSTEM,
    "LN": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
}

MAX_UNSIGNED_INT = 2**31 - 1

_OFFSET = re.compile(r"([+-])(\d{2})(\d{2})")

Instances = dict[str, list[dict]] | None

_PATIENT_ID = "patient"
_ENDPOINT_ID = "wado-rs"


def render_imaging_study(
    study: dict,
    series: list[dict],
    instances: Instances,
    version: str,
    *,
    wado_base_url: str = "",
    site_timezone: str = "",
) -> dict:
    """One ImagingStudy resource from a `studies` row and its `series` rows.

    `study` and each series row carry a "state" key (receiving | stable |
    complete | incomplete), the study also "incomplete_reason". `instances` maps a series
    UID to its `instances` rows; None leaves the instance elements out.
    `wado_base_url` adds the DICOMweb retrieve location (DSTU2 `url`, R4/R5
    `endpoint`); `site_timezone` (IANA name) gives times whose instances carry
    no TimezoneOffsetFromUTC an offset.
    """
    _check_version(version)
    clock = _Clock(study.get("timezone_offset"), site_timezone)
    base = wado_base_url.rstrip("/")
    ordered = sorted(series, key=_by_number("series_uid"))
    if version.startswith("dstu2"):
        published = version == "dstu2"
        resource = _dstu2_study(study, ordered, instances, clock, base, published=published)
    else:
        resource = _study(study, ordered, instances, clock, base, r5=version == "r5")
    return _pruned(resource)


_BATCH = 500  # studies whose series are read in one query


def imaging_study(
    reader: CatalogReader, study_uid: str, version: str, *, stable_after: float, **rendering
) -> dict | None:
    """One study of the index as an ImagingStudy, instances included; None when
    the index does not know it. `rendering`: wado_base_url, site_timezone."""
    found = reader.study(study_uid, stable_after, with_instances=True)
    if found is None:
        return None
    instances = {s["series_uid"]: s["instances"] for s in found["series"]}
    return render_imaging_study(found, found["series"], instances, version, **rendering)


def imaging_studies(
    reader: CatalogReader,
    filters: StudyFilter,
    version: str,
    *,
    stable_after: float,
    with_instances: bool,
    **rendering,
) -> Iterator[dict]:
    """The studies `filters` selects as ImagingStudy resources, one at a time
    (their series read a batch of studies per query)."""

    batch: list[dict] = []
    for found in reader.studies(filters, stable_after):
        batch.append(found)
        if len(batch) == _BATCH:
            yield from _render_batch(
                reader, batch, version, stable_after, with_instances, rendering
            )
            batch = []
    yield from _render_batch(reader, batch, version, stable_after, with_instances, rendering)


def _render_batch(reader, batch, version, stable_after, with_instances, rendering):
    all_series = reader.series_of(
        [s["study_uid"] for s in batch], stable_after, with_instances=with_instances
    )
    for found in batch:
        series = all_series[found["study_uid"]]
        instances = {s["series_uid"]: s["instances"] for s in series} if with_instances else None
        yield render_imaging_study(found, series, instances, version, **rendering)


def render_bundle(resources: list[dict], version: str) -> dict:
    """A searchset Bundle of already rendered resources, all matches."""
    _check_version(version)
    return _pruned(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(resources),
            "entry": [
                {"resource": resource, "search": {"mode": "match"}} for resource in resources
            ],
        }
    )


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ValueError(f"unknown FHIR version {version!r}; expected one of {', '.join(VERSIONS)}")


# R4 and R5 ------------------------------------------------------------------


def _study(
    study: dict, series: list[dict], instances: Instances, clock: "_Clock", base: str, *, r5: bool
) -> dict:
    uid = study["study_uid"]
    modalities = _modalities(study)
    if not r5:
        modalities = [m for m in modalities if m not in NON_ACQUISITION_MODALITIES]
    procedures = [_procedure_concept(code) for code in _procedure_codes(study)]
    reasons = [{"text": text} for text in _values(study.get("reason"))]
    resource = {
        "resourceType": "ImagingStudy",
        "id": uid,
        "contained": [_endpoint(base, r5=r5)] if base else None,
        "extension": [
            _availability_extension(study.get("availability")),
            *_state_extensions(study),
        ],
        "identifier": [
            {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"},
            _accession_identifier(study),
            _study_id_identifier(study),
        ],
        "status": STATUS_BY_AVAILABILITY.get(study.get("availability"), "unknown"),
        "modality": [_modality(m, r5=r5) for m in modalities],
        "subject": _subject(study),
        "started": clock.date_time(study.get("study_date"), study.get("study_time")),
        "referrer": _display_reference(_person_name(study.get("referrer"))),
        "endpoint": [{"reference": f"#{_ENDPOINT_ID}"}] if base else None,
        "numberOfSeries": _unsigned(study.get("number_of_series")),
        "numberOfInstances": _unsigned(study.get("number_of_instances")),
        "location": _display_reference(_location(study)),
        "description": study.get("description"),
        "series": [_series(row, instances, clock, r5=r5) for row in series],
    }
    if r5:
        resource["procedure"] = [{"concept": concept} for concept in procedures]
        resource["reason"] = [{"concept": concept} for concept in reasons]
    else:
        resource["interpreter"] = [
            {"display": name} for name in _person_names(study.get("interpreter"))
        ]
        resource["procedureCode"] = procedures
        resource["reasonCode"] = reasons
    return resource


def _series(row: dict, instances: Instances, clock: "_Clock", *, r5: bool) -> dict:
    body_part = row.get("body_part")
    laterality = _laterality(row.get("laterality"))
    return {
        "extension": [
            _availability_extension(row.get("availability")),
            *_state_extensions(row),
        ],
        "uid": row["series_uid"],
        "number": _unsigned(row.get("number")),
        "modality": _modality(row.get("modality"), r5=r5),
        "description": row.get("description"),
        "numberOfInstances": _unsigned(row.get("number_of_instances")),
        # BodyPartExamined is a DICOM defined term, not a SNOMED code: text only.
        "bodySite": ({"concept": {"text": body_part}} if r5 else {"display": body_part})
        if body_part
        else None,
        "laterality": {"coding": [laterality]} if r5 and laterality else laterality,
        "started": clock.date_time(row.get("series_date"), row.get("series_time")),
        "performer": [{"actor": {"display": name}} for name in _person_names(row.get("performer"))],
        "instance": _instances(row, instances, _instance),
    }


def _instance(row: dict) -> dict:
    return {
        "uid": row["sop_instance_uid"],
        "sopClass": {"system": URI_SYSTEM, "code": f"urn:oid:{row['sop_class_uid']}"},
        "number": _unsigned(row.get("number")),
        "title": row.get("title"),
    }


def _modality(code: str | None, *, r5: bool) -> dict:
    """Series modality is required in R4/R5 though DICOM senders may omit it."""
    coding = {"system": DICOM_SYSTEM, "code": code} if code else _data_absent()
    return {"coding": [coding]} if r5 and code else coding


def _subject(study: dict) -> dict:
    """The patient by business identifier: no Patient resource exists to point at.

    Without a PatientID the name alone identifies the patient for a reader; the
    study is still rendered, since `subject` is required.
    """
    name = _person_name(study.get("patient_name"))
    patient_id = study.get("patient_id")
    if not (patient_id or name):
        return _data_absent()
    return {
        "type": "Patient" if patient_id else None,
        "identifier": _identifier(patient_id, study.get("issuer_of_patient_id")),
        "display": name,
    }


def _accession_identifier(study: dict) -> dict | None:
    accession = _identifier(study.get("accession"), study.get("accession_issuer"))
    if accession is None:
        return None
    return {
        "type": {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": "ACSN"}]},
        **accession,
    }


def _endpoint(base: str, *, r5: bool) -> dict:
    """The contained WADO-RS Endpoint; R5 made connectionType a CodeableConcept
    list and moved the payload into a backbone element."""
    connection = {"system": CONNECTION_TYPE_SYSTEM, "code": "dicom-wado-rs"}
    payload_type = [{"text": "DICOM WADO-RS"}]
    endpoint = {"resourceType": "Endpoint", "id": _ENDPOINT_ID, "status": "active"}
    if r5:
        endpoint["connectionType"] = [{"coding": [connection]}]
        endpoint["payload"] = [{"type": payload_type, "mimeType": ["application/dicom"]}]
    else:
        endpoint["connectionType"] = connection
        endpoint["payloadType"] = payload_type
        endpoint["payloadMimeType"] = ["application/dicom"]
    endpoint["address"] = base
    return endpoint


def _procedure_concept(code: dict) -> dict:
    return {"coding": [_coding(code)], "text": code.get("display")}


def _location(study: dict) -> str | None:
    parts = [study.get("institution"), study.get("department")]
    return ", ".join(part for part in parts if part) or None


# DSTU2 ------------------------------------------------------------------------


def _dstu2_study(
    study: dict,
    series: list[dict],
    instances: Instances,
    clock: "_Clock",
    base: str,
    *,
    published: bool,
) -> dict:
    """DSTU2: the published 1.0.2 shape, or (not `published`) the v0.5.0 ballot's."""
    uid = study["study_uid"]
    patient = _dstu2_patient(study)
    modalities = [m for m in _modalities(study) if m not in NON_ACQUISITION_MODALITIES]
    interpreters = _person_names(study.get("interpreter"))
    study_url = f"{base}/studies/{uid}" if base else None
    codes = _procedure_codes(study)
    return {
        "resourceType": "ImagingStudy",
        "id": uid,
        "contained": [patient] if patient else None,
        "extension": _state_extensions(study),
        "started": clock.date_time(study.get("study_date"), study.get("study_time")),
        "patient": _dstu2_patient_reference(study, patient),
        "uid": f"urn:oid:{uid}",
        "accession": _identifier(study.get("accession"), study.get("accession_issuer")),
        "identifier": [_study_id_identifier(study)],
        "modalityList": [_modality(m, r5=False) for m in modalities] if published else modalities,
        "referrer": _display_reference(_person_name(study.get("referrer"))),
        "availability": study.get("availability"),
        "url": study_url,
        "numberOfSeries": _unsigned(study.get("number_of_series")),
        "numberOfInstances": _unsigned(study.get("number_of_instances")),
        # 1.0.2 has no clinicalInformation, and its procedure is a Reference.
        "clinicalInformation": None if published else "; ".join(_values(study.get("reason"))),
        "procedure": [_display_reference(code.get("display") or code.get("code")) for code in codes]
        if published
        else [_coding(code) for code in codes],
        # 0..1 in DSTU2: the first reader named.
        "interpreter": _display_reference(interpreters[0] if interpreters else None),
        "description": study.get("description"),
        "series": [
            _dstu2_series(row, instances, clock, study_url, published=published) for row in series
        ],
    }


def _dstu2_series(
    row: dict, instances: Instances, clock: "_Clock", study_url: str | None, *, published: bool
) -> dict:
    uid = row["series_uid"]
    modality = row.get("modality")
    body_part = row.get("body_part")
    started = clock.date_time(row.get("series_date"), row.get("series_time"))
    if published:  # a Coding, required: data-absent inside it when unknown
        modality_elements = {"modality": _modality(modality, r5=False)}
    else:  # a code: a required primitive without a value carries its extension in `_modality`
        modality_elements = {
            "modality": modality,
            "_modality": None if modality else _data_absent(),
        }
    return {
        "extension": _state_extensions(row),
        "number": _unsigned(row.get("number")),
        **modality_elements,
        "uid": f"urn:oid:{uid}",
        "description": row.get("description"),
        "numberOfInstances": _unsigned(row.get("number_of_instances")),
        "availability": row.get("availability"),
        "url": f"{study_url}/series/{uid}" if study_url else None,
        "bodySite": {"display": body_part} if body_part else None,
        "laterality": _laterality(row.get("laterality")),
        ("started" if published else "dateTime"): started,
        "instance": _instances(
            row, instances, _dstu2_instance if published else _dstu2_ballot_instance
        ),
    }


def _dstu2_instance(row: dict) -> dict:
    instance = _dstu2_ballot_instance(row)
    instance["sopClass"] = instance.pop("sopclass")
    return instance


def _dstu2_ballot_instance(row: dict) -> dict:
    sop_class = row["sop_class_uid"]
    name = UID(sop_class).name
    return {
        "number": _unsigned(row.get("number")),
        "uid": f"urn:oid:{row['sop_instance_uid']}",
        "sopclass": f"urn:oid:{sop_class}",
        # pydicom names an unknown UID by the UID itself, which is no name.
        "type": name if name != sop_class else None,
        "title": row.get("title"),
    }


def _dstu2_patient(study: dict) -> dict | None:
    """A contained Patient: DSTU2 references cannot carry an identifier."""
    patient_id = study.get("patient_id")
    if not patient_id:
        return None
    name = study.get("patient_name")
    family, given, middle = (_name_components(name or "") + ["", "", ""])[:3]
    return {
        "resourceType": "Patient",
        "id": _PATIENT_ID,
        "identifier": [_identifier(patient_id, study.get("issuer_of_patient_id"))],
        "name": [{"text": _person_name(name), "family": [family], "given": [given, middle]}],
    }


def _dstu2_patient_reference(study: dict, patient: dict | None) -> dict:
    name = _person_name(study.get("patient_name"))
    if patient:
        return {"reference": f"#{_PATIENT_ID}", "display": name}
    return {"display": name} if name else _data_absent()


# Shared -------------------------------------------------------------------------


class _Clock:
    """Turns DICOM date and time values into FHIR dateTimes.

    A time is only meaningful with its UTC offset, and validators reject a time
    without one: TimezoneOffsetFromUTC applies first, then the site's zone; with
    neither, the date alone is given.
    """

    def __init__(self, timezone_offset: str | None, site_timezone: str):
        self.offset = _offset(timezone_offset)
        self.zone = ZoneInfo(site_timezone) if site_timezone else None

    def date_time(self, dicom_date: str | None, dicom_time: str | None) -> str | None:
        day = calendar_date(dicom_date)
        if day is None:
            return None
        parsed = time_of_day(dicom_time)
        if parsed is None:
            return day.isoformat()
        moment, fraction = parsed
        offset = self.offset or self._zone_offset(datetime.combine(day, moment))
        if offset is None:
            return day.isoformat()
        return f"{day.isoformat()}T{moment:%H:%M:%S}{fraction}{offset}"

    def _zone_offset(self, moment: datetime) -> str | None:
        if self.zone is None:
            return None
        minutes = round(self.zone.utcoffset(moment).total_seconds() / 60)
        return _format_offset(minutes)


def _offset(value: str | None) -> str | None:
    """TimezoneOffsetFromUTC ("+0100") as "+01:00"; None if absent or out of
    FHIR's range (-14:00..+14:00)."""
    match = _OFFSET.fullmatch(value or "")
    if match is None:
        return None
    sign, hours, minutes = match.groups()
    total = int(hours) * 60 + int(minutes)
    if int(minutes) >= 60 or total > 14 * 60:
        return None
    return _format_offset(-total if sign == "-" else total)


def _format_offset(minutes: int) -> str:
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{minutes:02d}"


def _modalities(study: dict) -> list[str]:
    return json.loads(study.get("modalities") or "[]")


def _procedure_codes(study: dict) -> list[dict]:
    return json.loads(study.get("procedure_codes") or "[]")


def _coding(code: dict) -> dict:
    """A DICOM code item (designator in "system") as a FHIR Coding."""
    return {
        "system": CODING_SYSTEMS.get(code.get("system")),
        "code": code.get("code"),
        "display": code.get("display"),
    }


def _laterality(value: str | None) -> dict | None:
    if value not in LATERALITY_CODES:
        return None
    code, display = LATERALITY_CODES[value]
    return {"system": SNOMED_SYSTEM, "code": code, "display": display}


def _identifier(value: str | None, issuer: str | None) -> dict | None:
    """An Identifier; the DICOM issuer is a name, not a URI, so it names the assigner."""
    if not value:
        return None
    return {"value": value, "assigner": _display_reference(issuer)}


def _study_id_identifier(study: dict) -> dict | None:
    study_id = study.get("study_id")
    return {"type": {"text": "DICOM Study ID"}, "value": study_id} if study_id else None


def _availability_extension(availability: str | None) -> dict | None:
    if not availability:
        return None
    return {"url": AVAILABILITY_EXTENSION_URL, "valueCode": availability}


def _state_extensions(row: dict) -> list[dict]:
    """The completeness state, and why it is incomplete when it is; a reason left
    over on a row that is no longer incomplete would mislead, so it is not shown."""
    state = row.get("state")
    if not state:
        return []
    extensions = [{"url": STATE_EXTENSION_URL, "valueCode": state}]
    reason = row.get("incomplete_reason")
    if state == "incomplete" and reason:
        extensions.append({"url": INCOMPLETE_REASON_EXTENSION_URL, "valueString": reason})
    return extensions


def _data_absent() -> dict:
    return {"extension": [{"url": DATA_ABSENT_REASON_URL, "valueCode": "unknown"}]}


def _display_reference(display: str | None) -> dict | None:
    return {"display": display} if display else None


def _instances(
    series_row: dict, instances: Instances, render: Callable[[dict], dict]
) -> list[dict] | None:
    if instances is None:
        return None
    rows = instances.get(series_row["series_uid"], [])
    return [render(row) for row in sorted(rows, key=_by_number("sop_instance_uid"))]


def _by_number(uid_column: str) -> Callable[[dict], tuple]:
    """Order rows by their DICOM number (absent last), then UID, so that the
    same index renders the same document."""
    return lambda row: (row.get("number") is None, row.get("number") or 0, row[uid_column])


def _unsigned(value: object) -> int | None:
    """FHIR unsignedInt holds 0..2^31-1; a value outside (a negative SeriesNumber)
    is left out rather than make the resource invalid."""
    if isinstance(value, int) and 0 <= value <= MAX_UNSIGNED_INT:
        return value
    return None


def _values(text: str | None) -> list[str]:
    """The values of a multi-valued DICOM string (backslash-separated)."""
    return [part.strip() for part in (text or "").split("\\") if part.strip()]


def _name_components(name: str) -> list[str]:
    """The components of a DICOM PN's first non-empty representation
    (alphabetic before ideographic and phonetic)."""
    groups = [group for group in name.split("=") if group.strip("^ ")]
    return [part.strip() for part in groups[0].split("^")] if groups else []


def _person_name(name: str | None) -> str | None:
    """A DICOM PN (Family^Given^Middle^Prefix^Suffix) as a person writes it."""
    components = _name_components(name or "") + [""] * 5
    family, given, middle, prefix, suffix = components[:5]
    return " ".join(part for part in (prefix, given, middle, family, suffix) if part) or None


def _person_names(names: str | None) -> list[str]:
    return [name for name in map(_person_name, _values(names)) if name]


def _pruned(value):
    """Drop None, empty strings, lists and objects at every level: FHIR forbids them.

    Written as plain loops: it runs on every element of every exported resource
    (a quarter of `export`'s time with comprehensions and tuple comparisons).
    """
    if isinstance(value, dict):
        kept = {}
        for key, item in value.items():
            if isinstance(item, dict | list):
                item = _pruned(item)
                if not item:
                    continue
            elif item is None or item == "":
                continue
            kept[key] = item
        return kept
    if isinstance(value, list):
        kept = []
        for item in value:
            if isinstance(item, dict | list):
                item = _pruned(item)
                if not item:
                    continue
            elif item is None or item == "":
                continue
            kept.append(item)
        return kept
    return value
