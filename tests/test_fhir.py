"""ImagingStudy rendering from a real index: instances are stored through the real
storage code (files and SQLite), then the rows are rendered and checked against the
FHIR models (R4 via R4B, R5) and against the DSTU2 ballot's element list."""

import logging
from pathlib import Path

import pytest
from fhir.resources.bundle import Bundle as R5Bundle
from fhir.resources.imagingstudy import ImagingStudy as R5ImagingStudy
from fhir.resources.R4B.bundle import Bundle as R4Bundle
from fhir.resources.R4B.imagingstudy import ImagingStudy as R4ImagingStudy
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from storage.catalog import Catalog, Provenance
from storage.catalog.engines import IndexLocation
from storage.fhir import (
    AVAILABILITY_EXTENSION_URL,
    DATA_ABSENT_REASON_URL,
    INCOMPLETE_REASON_EXTENSION_URL,
    SNOMED_SYSTEM,
    STATE_EXTENSION_URL,
    render_bundle,
    render_imaging_study,
)
from storage.files import prepare_data_dir
from storage.store import DuplicatePolicy, InstanceStore, StoreRefused
from tests.conftest import (
    both_indexes,
    bundled_test_files,
    index_url_for,
    make_instance,
    receive_file,
)

pytestmark = both_indexes

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
WADO = "https://pacs.example.org/dicomweb"

# Elements of ImagingStudy in FHIR v0.5.0 (DSTU2 ballot 2, seed page 000), as paths
# below ImagingStudy.
DSTU2_SEED_ELEMENTS = {
    "started",
    "patient",
    "uid",
    "accession",
    "identifier",
    "order",
    "modalityList",
    "referrer",
    "availability",
    "url",
    "numberOfSeries",
    "numberOfInstances",
    "clinicalInformation",
    "procedure",
    "interpreter",
    "description",
    "series",
    "series.number",
    "series.modality",
    "series.uid",
    "series.description",
    "series.numberOfInstances",
    "series.availability",
    "series.url",
    "series.bodySite",
    "series.laterality",
    "series.dateTime",
    "series.instance",
    "series.instance.number",
    "series.instance.uid",
    "series.instance.sopclass",
    "series.instance.type",
    "series.instance.title",
    "series.instance.content",
}
# DiagnosticOrder references and instance renderings are nothing a C-STORE carries.
DSTU2_NOT_IN_INDEX = {"order", "series.instance.content"}
# Resource-level machinery, not ImagingStudy elements.
RESOURCE_KEYS = {"resourceType", "id", "contained", "extension"}


class Receiver:
    """A data directory that instances are stored into as the receiver does."""

    def __init__(self, directory: Path):
        self.data_dir = directory / "data"
        self.sources = directory / "sources"
        prepare_data_dir(self.data_dir, "test")
        self.index = Catalog.open(IndexLocation(self.data_dir, index_url_for(self.data_dir)))
        self.store = InstanceStore(
            self.data_dir, self.index, DuplicatePolicy.KEEP_FIRST, node="test"
        )

    def receive_file(self, path: Path) -> None:
        receive_file(self.store, path, Provenance("TEST"))

    def receive(self, **attributes) -> None:
        self.receive_file(make_instance(self.sources, **attributes))

    def rows(self, study_uid: str, state: str = "stable", reason: str | None = None):
        """What the query layer hands the renderer: rows plus their state."""
        study = dict(self.select("studies", "study_uid", study_uid)[0], state=state)
        study["incomplete_reason"] = reason
        series = [dict(row, state=state) for row in self.select("series", "study_uid", study_uid)]
        instances = {
            row["series_uid"]: self.select("instances", "series_uid", row["series_uid"])
            for row in series
        }
        return study, series, instances

    def select(self, table: str, column: str, uid: str) -> list[dict]:
        rows = self.index.conn.execute(f"SELECT * FROM {table} WHERE {column} = ?", (uid,))
        return [dict(row) for row in rows]

    def set(self, table: str, column: str, uid: str, **values) -> None:
        assignments = ", ".join(f"{name} = ?" for name in values)
        self.index.conn.execute(
            f"UPDATE {table} SET {assignments} WHERE {column} = ?", (*values.values(), uid)
        )

    def render(self, study_uid: str, version: str, *, with_instances=True, **options) -> dict:
        """Render a stored study; R4 and R5 renderings must pass their FHIR model."""
        study, series, instances = self.rows(study_uid)
        resource = render_imaging_study(
            study, series, instances if with_instances else None, version, **options
        )
        return validated(resource, version)


def validated(resource: dict, version: str) -> dict:
    model = {"r4": R4ImagingStudy, "r5": R5ImagingStudy}.get(version)
    if model is not None:
        model.model_validate(resource)
    return resource


def extension_values(element: dict, url: str) -> list:
    return [
        value
        for extension in element.get("extension", [])
        if extension["url"] == url
        for key, value in extension.items()
        if key.startswith("value")
    ]


def empty_values(value, path="$") -> list[str]:
    """Paths of empty strings, lists and objects and of nulls: FHIR forbids them."""
    if value in (None, "", [], {}):
        return [path]
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in empty_values(item, f"{path}.{key}")]
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in empty_values(item, f"{path}[{i}]")]
    return []


@pytest.fixture
def receiver(tmp_path):
    receiver = Receiver(tmp_path)
    yield receiver
    receiver.index.close()


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """An index of every bundled pydicom test file the receiver accepts."""
    receiver = Receiver(tmp_path_factory.mktemp("bundled"))
    for path in bundled_test_files():
        try:
            receiver.receive_file(path)
        except StoreRefused:
            continue  # no Study/Series UID, or UIDs that contradict each other
    yield receiver
    receiver.index.close()


@pytest.fixture
def full_study(receiver) -> str:
    """A study carrying every attribute the index keeps: a CT series of two images,
    an SR and a KO series."""
    study_uid = generate_uid()
    common = {
        "study_uid": study_uid,
        "PatientID": "PAT-1",
        "IssuerOfPatientID": "GENERAL-HOSPITAL",
        "PatientName": "Doe^Jane",
        "StudyDate": "20260322",
        "StudyTime": "101500",
        "TimezoneOffsetFromUTC": "+0100",
        "AccessionNumber": "ACC-7",
        "StudyID": "S-42",
        "StudyDescription": "CT chest",
        "ReferringPhysicianName": "Watson^John",
        "NameOfPhysiciansReadingStudy": "House^Gregory",
        "ProcedureCodeSequence": [
            Dataset.from_json(
                {
                    "00080100": {"vr": "SH", "Value": ["24627-2"]},
                    "00080102": {"vr": "SH", "Value": ["LN"]},
                    "00080104": {"vr": "LO", "Value": ["CT Chest"]},
                }
            )
        ],
        "ReasonForTheRequestedProcedure": "Persistent cough",
        "InstitutionName": "General Hospital",
        "InstitutionalDepartmentName": "Radiology",
    }
    ct_series = generate_uid()
    for number in (2, 1):
        receiver.receive(
            **common,
            series_uid=ct_series,
            SeriesNumber=3,
            SeriesDescription="Axial 5mm",
            BodyPartExamined="CHEST",
            Laterality="L",
            SeriesDate="20260322",
            SeriesTime="1020",
            PerformingPhysicianName="Tech^Terry",
            InstanceNumber=number,
            ContentLabel="AXIAL" if number == 1 else None,
        )
    receiver.receive(
        **common,
        series_uid=generate_uid(),
        modality="SR",
        sop_class_uid=BASIC_TEXT_SR,
        SeriesNumber=100,
    )
    receiver.receive(
        **common,
        series_uid=generate_uid(),
        modality="KO",
        sop_class_uid=KEY_OBJECT_SELECTION,
        SeriesNumber=101,
    )
    return study_uid


@pytest.mark.filterwarnings("ignore:Expected explicit VR")  # a bundled file's own quirk
def test_every_bundled_study_renders_valid_r4_and_r5(bundled):
    study_uids = [row[0] for row in bundled.index.conn.execute("SELECT study_uid FROM studies")]
    # Enough variety to mean something: legacy dates, no patient, no modality...
    assert len(study_uids) >= 15
    rendered = {"r4": [], "r5": [], "dstu2": [], "dstu2-ballot": []}
    for uid in study_uids:
        for options in ({}, {"wado_base_url": WADO, "site_timezone": "Europe/Vienna"}):
            for version, resources in rendered.items():
                resource = bundled.render(uid, version, **options)
                assert resource["id"] == uid
                assert empty_values(resource) == []
                resources.append(resource)
    R4Bundle.model_validate(render_bundle(rendered["r4"], "r4"))
    R5Bundle.model_validate(render_bundle(rendered["r5"], "r5"))
    for resource in rendered["dstu2"]:
        assert_valid_dstu2(resource)


def assert_valid_dstu2(resource: dict) -> None:
    """What a DSTU2 client reads: fhirclient 1.0.3's models (generated from FHIR
    1.0.2) take every element — they only log a superfluous or missing one, so
    their warnings are errors here — and give the same JSON back."""
    from fhirclient.models.imagingstudy import ImagingStudy

    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        parsed = ImagingStudy(resource)
    finally:
        logging.getLogger().removeHandler(handler)
    assert warnings == [], warnings
    assert parsed.as_json() == resource


def test_dstu2_is_the_published_1_0_2_that_clients_parse(receiver, full_study):
    """Issue 13 #7: fhirclient 1.0.3 rejected every study of the ballot shape."""
    resource = receiver.render(full_study, "dstu2", wado_base_url=WADO)
    assert_valid_dstu2(resource)
    assert resource["modalityList"][0]["system"] == "http://dicom.nema.org/resources/ontology/DCM"
    series = resource["series"][0]
    assert set(series["modality"]) == {"system", "code"}
    assert "started" in series and "dateTime" not in series
    assert "sopClass" in series["instance"][0]
    ballot = receiver.render(full_study, "dstu2-ballot", wado_base_url=WADO)
    assert isinstance(ballot["modalityList"][0], str)
    assert "dateTime" in ballot["series"][0]
    with pytest.raises(Exception, match="JSON dictionary, got CT"):  # fhirclient's verdict
        assert_valid_dstu2(ballot)


def test_bundle_lists_every_resource_as_a_match(bundled):
    uids = [row[0] for row in bundled.index.conn.execute("SELECT study_uid FROM studies")][:3]
    bundle = render_bundle([bundled.render(uid, "r4") for uid in uids], "r4")
    assert bundle["type"] == "searchset"
    assert bundle["total"] == 3
    assert [entry["resource"]["id"] for entry in bundle["entry"]] == uids
    assert {entry["search"]["mode"] for entry in bundle["entry"]} == {"match"}
    empty = render_bundle([], "r5")
    assert empty["total"] == 0 and "entry" not in empty
    R5Bundle.model_validate(empty)


def test_dstu2_ballot_carries_every_seed_element_the_index_supports(receiver, full_study):
    resource = receiver.render(full_study, "dstu2-ballot", wado_base_url=WADO + "/")

    paths = set(resource) - RESOURCE_KEYS
    for series in resource["series"]:
        paths |= {f"series.{key}" for key in set(series) - {"extension"}}
        for instance in series.get("instance", []):
            paths |= {f"series.instance.{key}" for key in instance}
    assert paths == DSTU2_SEED_ELEMENTS - DSTU2_NOT_IN_INDEX
    assert empty_values(resource) == []

    study_url = f"{WADO}/studies/{full_study}"
    assert resource["uid"] == f"urn:oid:{full_study}"
    assert resource["accession"] == {"value": "ACC-7"}
    assert resource["identifier"][0]["value"] == "S-42"
    assert resource["modalityList"] == ["CT"]
    assert resource["started"] == "2026-03-22T10:15:00+01:00"
    assert resource["referrer"] == {"display": "John Watson"}
    assert resource["interpreter"] == {"display": "Gregory House"}
    assert resource["availability"] == "ONLINE"
    assert resource["url"] == study_url
    assert (resource["numberOfSeries"], resource["numberOfInstances"]) == (3, 4)
    assert resource["clinicalInformation"] == "Persistent cough"
    assert resource["procedure"] == [
        {"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}
    ]
    assert resource["description"] == "CT chest"
    patient = next(c for c in resource["contained"] if c["id"] == "patient")
    assert resource["patient"] == {"reference": "#patient", "display": "Jane Doe"}
    assert patient["identifier"] == [
        {"value": "PAT-1", "assigner": {"display": "GENERAL-HOSPITAL"}}
    ]

    ct, sr, ko = resource["series"]
    ct_uid = ct["uid"].removeprefix("urn:oid:")
    assert (ct["number"], ct["modality"], ct["description"]) == (3, "CT", "Axial 5mm")
    assert ct["numberOfInstances"] == 2
    assert ct["availability"] == "ONLINE"
    assert ct["url"] == f"{study_url}/series/{ct_uid}"
    assert ct["bodySite"] == {"display": "CHEST"}
    assert ct["laterality"] == {"system": SNOMED_SYSTEM, "code": "7771000", "display": "Left"}
    assert ct["dateTime"] == "2026-03-22T10:20:00+01:00"
    first, second = ct["instance"]
    assert first["number"] == 1 and second["number"] == 2
    assert first["uid"].startswith("urn:oid:")
    assert first["sopclass"] == "urn:oid:1.2.840.10008.5.1.4.1.1.2"
    assert first["type"] == "CT Image Storage"
    assert first["title"] == "AXIAL" and "title" not in second
    assert (sr["modality"], ko["modality"]) == ("SR", "KO")
    assert sr["instance"][0]["type"] == "Basic Text SR Storage"


def test_r4_lists_acquisition_modalities_only_and_r5_all(receiver, full_study):
    r4 = receiver.render(full_study, "r4")
    r5 = receiver.render(full_study, "r5")
    assert [coding["code"] for coding in r4["modality"]] == ["CT"]
    assert [concept["coding"][0]["code"] for concept in r5["modality"]] == ["CT", "SR", "KO"]
    # The series themselves keep their modality in both.
    assert [s["modality"]["code"] for s in r4["series"]] == ["CT", "SR", "KO"]
    assert [s["modality"]["coding"][0]["code"] for s in r5["series"]] == ["CT", "SR", "KO"]


def test_r4_and_r5_map_the_study_attributes(receiver, full_study):
    for version in ("r4", "r5"):
        resource = receiver.render(full_study, version)
        identifiers = resource["identifier"]
        assert {"system": "urn:dicom:uid", "value": f"urn:oid:{full_study}"} in identifiers
        accession = next(i for i in identifiers if i["value"] == "ACC-7")
        assert accession["type"]["coding"][0]["code"] == "ACSN"
        assert resource["subject"] == {
            "type": "Patient",
            "identifier": {"value": "PAT-1", "assigner": {"display": "GENERAL-HOSPITAL"}},
            "display": "Jane Doe",
        }
        assert resource["started"] == "2026-03-22T10:15:00+01:00"
        assert (resource["numberOfSeries"], resource["numberOfInstances"]) == (3, 4)
        assert resource["location"] == {"display": "General Hospital, Radiology"}
        ct = resource["series"][0]
        assert ct["uid"] == ct["uid"].removeprefix("urn:oid:")
        assert ct["started"] == "2026-03-22T10:20:00+01:00"
        assert ct["performer"] == [{"actor": {"display": "Terry Tech"}}]
        assert ct["instance"][0]["sopClass"] == {
            "system": "urn:ietf:rfc:3986",
            "code": "urn:oid:1.2.840.10008.5.1.4.1.1.2",
        }
        assert ct["instance"][0]["title"] == "AXIAL"
        assert "availability" not in resource and "availability" not in ct

    r4 = receiver.render(full_study, "r4")
    assert r4["procedureCode"][0]["coding"][0]["code"] == "24627-2"
    assert r4["reasonCode"] == [{"text": "Persistent cough"}]
    assert r4["interpreter"] == [{"display": "Gregory House"}]
    r5 = receiver.render(full_study, "r5")
    assert r5["procedure"][0]["concept"]["coding"][0]["code"] == "24627-2"
    assert r5["reason"] == [{"concept": {"text": "Persistent cough"}}]
    assert "interpreter" not in r5  # removed in R5


def test_body_part_is_not_coded_as_snomed_but_laterality_is(receiver, full_study):
    r4 = receiver.render(full_study, "r4")["series"][0]
    r5 = receiver.render(full_study, "r5")["series"][0]
    assert r4["bodySite"] == {"display": "CHEST"}
    assert r5["bodySite"] == {"concept": {"text": "CHEST"}}
    left = {"system": SNOMED_SYSTEM, "code": "7771000", "display": "Left"}
    assert r4["laterality"] == left
    assert r5["laterality"] == {"coding": [left]}


@pytest.mark.parametrize(
    ("letter", "code"),
    [("R", "24028007"), ("L", "7771000"), ("B", "51440002"), ("U", "66459002"), ("X", None)],
)
def test_laterality_codes(receiver, letter, code):
    study_uid = generate_uid()
    receiver.receive(study_uid=study_uid, series_uid=generate_uid(), Laterality=letter)
    series = receiver.render(study_uid, "r4")["series"][0]
    assert series.get("laterality", {}).get("code") == code


@pytest.mark.parametrize(
    ("study_date", "study_time", "offset", "site_timezone", "expected"),
    [
        # TimezoneOffsetFromUTC wins over the site's zone.
        ("20260322", "101500", "-0500", "Europe/Berlin", "2026-03-22T10:15:00-05:00"),
        # Site zone, winter, HHMM padded to seconds.
        ("20260115", "1015", None, "Europe/Berlin", "2026-01-15T10:15:00+01:00"),
        # Site zone on a daylight-saving date, HH padded.
        ("20260715", "10", None, "Europe/Berlin", "2026-07-15T10:00:00+02:00"),
        # Fractional seconds are kept as written.
        ("20260715", "101500.25", "+0530", "", "2026-07-15T10:15:00.25+05:30"),
        # ACR-NEMA date and time forms, daylight saving in New York.
        ("1997.04.24", "14:04:38", None, "America/New_York", "1997-04-24T14:04:38-04:00"),
        # No offset known: the date alone, never a time without an offset.
        ("20260715", "101500", None, "", "2026-07-15"),
        ("20260715", None, "+0100", "", "2026-07-15"),
        # An offset outside -14:00..+14:00 is no offset.
        ("20260715", "101500", "+1600", "", "2026-07-15"),
        ("20261345", "101500", "+0100", "", None),
    ],
)
def test_started(receiver, study_date, study_time, offset, site_timezone, expected):
    study_uid = generate_uid()
    receiver.receive(
        study_uid=study_uid,
        series_uid=generate_uid(),
        StudyDate=study_date,
        StudyTime=study_time,
        SeriesDate=study_date,
        SeriesTime=study_time,
        TimezoneOffsetFromUTC=offset,
    )
    for version, series_element in (
        ("r4", "started"),
        ("r5", "started"),
        ("dstu2", "started"),
        ("dstu2-ballot", "dateTime"),
    ):
        resource = receiver.render(study_uid, version, site_timezone=site_timezone)
        assert resource.get("started") == expected
        assert resource["series"][0].get(series_element) == expected


@pytest.mark.parametrize(
    ("availability", "status"),
    [
        ("ONLINE", "available"),
        ("NEARLINE", "available"),
        ("OFFLINE", "registered"),
        ("UNAVAILABLE", "registered"),
    ],
)
def test_availability(receiver, availability, status):
    study_uid, series_uid = generate_uid(), generate_uid()
    receiver.receive(study_uid=study_uid, series_uid=series_uid)
    receiver.set("studies", "study_uid", study_uid, availability=availability)
    receiver.set("series", "series_uid", series_uid, availability=availability)

    for version in ("r4", "r5"):
        resource = receiver.render(study_uid, version)
        assert resource["status"] == status
        assert extension_values(resource, AVAILABILITY_EXTENSION_URL) == [availability]
        series = resource["series"][0]
        assert extension_values(series, AVAILABILITY_EXTENSION_URL) == [availability]
    dstu2 = receiver.render(study_uid, "dstu2")
    assert dstu2["availability"] == availability
    assert dstu2["series"][0]["availability"] == availability


def test_state_extensions(receiver):
    study_uid, series_uid = generate_uid(), generate_uid()
    receiver.receive(study_uid=study_uid, series_uid=series_uid)
    receiver.set("series", "series_uid", series_uid, incomplete_reason="association aborted")

    for version in ("r4", "r5", "dstu2"):
        study, series, instances = receiver.rows(study_uid, "incomplete", "series incomplete")
        resource = validated(render_imaging_study(study, series, instances, version), version)
        assert extension_values(resource, STATE_EXTENSION_URL) == ["incomplete"]
        assert extension_values(resource, INCOMPLETE_REASON_EXTENSION_URL) == ["series incomplete"]
        rendered_series = resource["series"][0]
        assert extension_values(rendered_series, STATE_EXTENSION_URL) == ["incomplete"]
        assert extension_values(rendered_series, INCOMPLETE_REASON_EXTENSION_URL) == [
            "association aborted"
        ]

        # A reason that outlived the incompleteness is not shown.
        study, series, instances = receiver.rows(study_uid, "stable", "series incomplete")
        resource = validated(render_imaging_study(study, series, instances, version), version)
        assert extension_values(resource, STATE_EXTENSION_URL) == ["stable"]
        assert extension_values(resource, INCOMPLETE_REASON_EXTENSION_URL) == []
        assert extension_values(resource["series"][0], INCOMPLETE_REASON_EXTENSION_URL) == []


def test_retrieve_location_only_with_a_wado_base_url(receiver, full_study):
    for version in ("r4", "r5"):
        without = receiver.render(full_study, version)
        assert "endpoint" not in without and "contained" not in without
        with_url = receiver.render(full_study, version, wado_base_url=WADO)
        reference = with_url["endpoint"][0]["reference"]
        endpoint = next(c for c in with_url["contained"] if f"#{c['id']}" == reference)
        assert endpoint["resourceType"] == "Endpoint"
        assert endpoint["address"] == WADO
        connection = endpoint["connectionType"]
        codings = [connection] if version == "r4" else connection[0]["coding"]
        assert [coding["code"] for coding in codings] == ["dicom-wado-rs"]

    without = receiver.render(full_study, "dstu2")
    assert "url" not in without
    assert all("url" not in series for series in without["series"])
    with_url = receiver.render(full_study, "dstu2", wado_base_url=WADO)
    assert with_url["url"] == f"{WADO}/studies/{full_study}"
    assert all(s["url"].startswith(with_url["url"] + "/series/") for s in with_url["series"])


def test_instances_left_out_on_request_counts_stay(receiver, full_study):
    for version in ("r4", "r5", "dstu2"):
        resource = receiver.render(full_study, version, with_instances=False)
        assert all("instance" not in series for series in resource["series"])
        assert resource["numberOfInstances"] == 4
        assert [series["numberOfInstances"] for series in resource["series"]] == [2, 1, 1]


def test_no_patient_id_still_yields_a_subject(receiver):
    study_uid = generate_uid()
    receiver.receive(study_uid=study_uid, series_uid=generate_uid(), PatientID=None)
    for version in ("r4", "r5"):
        assert receiver.render(study_uid, version)["subject"] == {"display": "Patient Test"}
    assert receiver.render(study_uid, "dstu2")["patient"] == {"display": "Patient Test"}


def test_no_patient_at_all_is_marked_absent_not_dropped(receiver):
    study_uid = generate_uid()
    receiver.receive(
        study_uid=study_uid, series_uid=generate_uid(), PatientID=None, PatientName="^^^^"
    )
    absent = {"extension": [{"url": DATA_ABSENT_REASON_URL, "valueCode": "unknown"}]}
    for version in ("r4", "r5"):
        assert receiver.render(study_uid, version)["subject"] == absent
    assert receiver.render(study_uid, "dstu2")["patient"] == absent


def test_missing_modality_is_marked_absent(receiver):
    study_uid = generate_uid()
    receiver.receive(study_uid=study_uid, series_uid=generate_uid(), Modality=None)
    absent = {"extension": [{"url": DATA_ABSENT_REASON_URL, "valueCode": "unknown"}]}
    assert receiver.render(study_uid, "r4")["series"][0]["modality"] == absent
    assert receiver.render(study_uid, "r5")["series"][0]["modality"] == absent
    assert receiver.render(study_uid, "dstu2")["series"][0]["modality"] == absent
    ballot_series = receiver.render(study_uid, "dstu2-ballot")["series"][0]
    assert "modality" not in ballot_series and ballot_series["_modality"] == absent


def test_numbers_outside_unsigned_int_are_left_out(receiver):
    study_uid = generate_uid()
    receiver.receive(
        study_uid=study_uid, series_uid=generate_uid(), SeriesNumber=-5, InstanceNumber=2**31
    )
    for version in ("r4", "r5", "dstu2"):
        series = receiver.render(study_uid, version)["series"][0]
        assert "number" not in series
        assert "number" not in series["instance"][0]


def test_unknown_version_is_refused(receiver, full_study):
    study, series, instances = receiver.rows(full_study)
    with pytest.raises(ValueError, match="stu3"):
        render_imaging_study(study, series, instances, "stu3")
    with pytest.raises(ValueError, match="R4"):
        render_bundle([], "R4")
