"""C-FIND over the index, asked by dcmtk's findscu (and pynetdicom), on an index
filled by real C-STOREs. Every STUDY-level answer is checked against what
`imaging-scp studies --json` says for the same filter."""

import json
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from scp.cli import main
from storage.catalog.schema import SCHEMA_VERSION
from tests.conftest import both_indexes, make_instance, send_files, start_server
from tests.test_hostile import (
    EXPLICIT_LE,
    VERIFICATION,
    RawAssociation,
    _uid,
    command_set,
    p_data,
)

STUDY_ROOT_FIND = str(StudyRootQueryRetrieveInformationModelFind)
FINDSCU = shutil.which("findscu") or "/usr/bin/findscu"
requires_findscu = pytest.mark.skipif(
    shutil.which("findscu") is None, reason="dcmtk's findscu not installed"
)
pytestmark = [requires_findscu, both_indexes]

STUDIES = [
    # patient id, name, study date, time, accession, description, [(modality, series, n)]
    ("PAT-1", "Doe^John", "20261101", "081500", "ACC-1", "CT chest", [("CT", 1, 3), ("SR", 2, 1)]),
    ("PAT-1", "Doe^John", "20261115", "143000", "ACC-2", "MR head", [("MR", 1, 2)]),
    ("PAT-2", "Müller^Jürgen", "20261130", "120000", "ACC-3", "CT abdomen", [("CT", 3, 2)]),
    ("PAT-3", "Roe^Jane", "20251231", "235959", "ACC-4", "XA", [("XA", 1, 1)]),
]  # fmt: skip


@pytest.fixture(scope="module")
def archive(tmp_path_factory, index_backend):
    """A server and what it was sent: study UID -> its attributes and series."""
    root = tmp_path_factory.mktemp("find")
    server = start_server(root / "data")
    sent, paths = {}, []
    for patient_id, name, date, time_, accession, description, series in STUDIES:
        study_uid = generate_uid()
        sent[study_uid] = {"patient_id": patient_id, "series": {}}
        for modality, number, count in series:
            series_uid = generate_uid()
            sent[study_uid]["series"][series_uid] = []
            for n in range(1, count + 1):
                path = make_instance(
                    root / "files",
                    study_uid=study_uid,
                    series_uid=series_uid,
                    modality=modality,
                    PatientID=patient_id,
                    PatientName=name,
                    SpecificCharacterSet="ISO_IR 192",
                    StudyDate=date,
                    StudyTime=time_,
                    AccessionNumber=accession,
                    StudyDescription=description,
                    SeriesNumber=number,
                    InstanceNumber=n,
                )
                paths.append(path)
                sop_uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
                sent[study_uid]["series"][series_uid].append(sop_uid)
    assert {s.status for s in send_files(server.port, paths)} == {0}
    yield server, sent
    server.stop()


def findscu(port: int, level: str, *keys: str, root: str = "-S", extra=(), check=True):
    """findscu's responses (the Pending identifiers) and its stderr."""
    out = Path(f"/tmp/findscu-{uuid.uuid4().hex}")
    out.mkdir()
    try:
        args = [FINDSCU, root, "-aec", "IMAGING_SCP", "-X", "-od", str(out), *extra,
                "-k", f"QueryRetrieveLevel={level}"]  # fmt: skip
        for key in keys:
            args += ["-k", key]
        result = subprocess.run(
            [*args, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60
        )
        if check:
            assert result.returncode == 0, result.stderr
        return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))], result
    finally:
        shutil.rmtree(out)


def studies_json(server, *args: str) -> set[str]:
    result = CliRunner().invoke(main, ["studies", *server.index_flags, *args, "--json"])
    assert result.exit_code == 0, result.output
    return {study["uid"] for study in json.loads(result.output)}


def uids(responses, keyword: str = "StudyInstanceUID") -> set[str]:
    return {str(r.get(keyword)) for r in responses}


@pytest.mark.parametrize(
    "keys, cli_filter",
    [
        (["PatientID=PAT-1"], ["--patient-id", "PAT-1"]),
        (["PatientName=doe^j*"], ["--patient-name", "doe^j*"]),  # PN: case-insensitive
        (["PatientName=?oe^*"], ["--patient-name", "?oe^*"]),
        (["StudyDate=20261101-20261120"], ["--from", "2026-11-01", "--to", "2026-11-20"]),
        (["StudyDate=20261115-"], ["--from", "2026-11-15"]),
        (["StudyDate=-20261231"], ["--to", "2026-12-31"]),
        (["StudyDate=20261130"], ["--from", "2026-11-30", "--to", "2026-11-30"]),
        (["ModalitiesInStudy=CT"], ["--modality", "CT"]),
        (["AccessionNumber=ACC-2"], ["--accession", "ACC-2"]),
        ([], []),  # universal: every study
    ],
)
def test_study_level_matches_what_the_admin_command_lists(archive, keys, cli_filter):
    server, _ = archive
    responses, _ = findscu(server.port, "STUDY", "StudyInstanceUID", *keys)
    assert uids(responses) == studies_json(server, *cli_filter)


def test_study_level_returns_the_index_counts_and_modalities(archive):
    server, sent = archive
    responses, _ = findscu(
        server.port,
        "STUDY",
        "PatientID=PAT-1",
        "StudyInstanceUID",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "InstanceAvailability",
        "StudyDescription",
        "PatientName",
    )
    assert len(responses) == 2
    for response in responses:
        study = sent[response.StudyInstanceUID]
        assert response.NumberOfStudyRelatedSeries == len(study["series"])
        assert response.NumberOfStudyRelatedInstances == sum(
            len(s) for s in study["series"].values()
        )
        assert response.InstanceAvailability == "ONLINE"
        assert response.RetrieveAETitle == "IMAGING_SCP"
        assert response.PatientName == "Doe^John"
    elements = [response["ModalitiesInStudy"] for response in responses]
    modalities = {tuple(e.value) if e.VM > 1 else (e.value,) for e in elements}
    assert modalities == {("CT", "SR"), ("MR",)}


def test_a_list_of_uids_and_a_combined_date_time_range(archive):
    server, sent = archive
    wanted = list(sent)[:2]
    responses, _ = findscu(server.port, "STUDY", f"StudyInstanceUID={chr(92).join(wanted)}")
    assert uids(responses) == set(wanted)
    # 1 Nov 09:00 to 30 Nov 12:00: the 1 Nov 08:15 study is out, the 30 Nov 12:00 one in.
    responses, _ = findscu(
        server.port, "STUDY", "StudyInstanceUID", "StudyDate=20261101-20261130",
        "StudyTime=0900-1200",
    )  # fmt: skip
    dates = {str(r.StudyDate) for r in responses}
    assert dates == {"20261115", "20261130"}


def test_patient_level_in_the_patient_root(archive):
    server, sent = archive
    responses, _ = findscu(
        server.port,
        "PATIENT",
        "PatientID",
        "PatientName",
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
        root="-P",
    )
    by_id = {r.PatientID: r for r in responses}
    assert set(by_id) == {"PAT-1", "PAT-2", "PAT-3"}
    pat1 = [s for s in sent.values() if s["patient_id"] == "PAT-1"]
    assert by_id["PAT-1"].NumberOfPatientRelatedStudies == 2
    assert by_id["PAT-1"].NumberOfPatientRelatedSeries == sum(len(s["series"]) for s in pat1)
    assert by_id["PAT-1"].NumberOfPatientRelatedInstances == 6
    assert by_id["PAT-2"].PatientName == "Müller^Jürgen"
    assert by_id["PAT-2"].SpecificCharacterSet == "ISO_IR 192"


def test_series_and_image_levels_in_both_roots(archive):
    server, sent = archive
    study_uid, study = next(iter(sent.items()))  # PAT-1, CT + SR
    series, _ = findscu(
        server.port, "SERIES", f"StudyInstanceUID={study_uid}", "SeriesInstanceUID",
        "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances",
    )  # fmt: skip
    assert uids(series, "SeriesInstanceUID") == set(study["series"])
    assert {(r.Modality, r.NumberOfSeriesRelatedInstances) for r in series} == {
        ("CT", 3),
        ("SR", 1),
    }
    ct = next(r.SeriesInstanceUID for r in series if r.Modality == "CT")
    for root, patient in (("-S", []), ("-P", ["PatientID=PAT-1"])):
        images, _ = findscu(
            server.port, "IMAGE", *patient, f"StudyInstanceUID={study_uid}",
            f"SeriesInstanceUID={ct}", "SOPInstanceUID", "SOPClassUID", "InstanceNumber",
            root=root,
        )  # fmt: skip
        assert uids(images, "SOPInstanceUID") == set(study["series"][ct])
        assert sorted(r.InstanceNumber for r in images) == [1, 2, 3]
        assert {r.SOPClassUID for r in images} == {"1.2.840.10008.5.1.4.1.1.2"}
    only_mr, _ = findscu(server.port, "SERIES", f"StudyInstanceUID={study_uid}", "Modality=MR")
    assert only_mr == []


def test_a_wildcard_on_a_number_key_matches_its_digits(archive):
    """Viewers send `*` for the keys they want back, IS ones too: on PostgreSQL
    that was LIKE on a BIGINT column, a failed query (0xC000)."""
    server, sent = archive
    study_uid, study = next(iter(sent.items()))  # PAT-1: CT series 1, SR series 2
    for pattern, modalities in (("*", {"CT", "SR"}), ("?", {"CT", "SR"}), ("2*", {"SR"})):
        series, _ = findscu(
            server.port, "SERIES", f"StudyInstanceUID={study_uid}", "Modality",
            f"SeriesNumber={pattern}",
        )  # fmt: skip
        assert {r.Modality for r in series} == modalities, pattern
    images, _ = findscu(
        server.port, "IMAGE", f"StudyInstanceUID={study_uid}",
        f"SeriesInstanceUID={next(iter(study['series']))}", "InstanceNumber=*",
    )  # fmt: skip
    assert sorted(r.InstanceNumber for r in images) == [1, 2, 3]


def test_a_query_that_breaks_the_rules_gets_a_failure_and_the_association_goes_on(archive):
    server, _ = archive
    # Patient Root, STUDY level, no PatientID: twice over one association.
    responses, result = findscu(
        server.port, "STUDY", "StudyInstanceUID", root="-P", extra=["-v", "--repeat", "2"]
    )
    assert responses == []
    assert result.stderr.count("Final Find Response (Error: DataSetDoesNotMatchSOPClass)") == 2
    refused = [e for e in server.events("find.refused") if "PatientID" in (e.get("reason") or "")]
    assert len(refused) >= 2
    assert len({e["assoc"] for e in refused[-2:]}) == 1  # the same association went on


def test_unknown_keys_come_back_empty_with_ff01(archive):
    server, _ = archive
    responses, result = findscu(
        server.port, "STUDY", "PatientID=PAT-3", "StudyInstanceUID", "PatientBirthTime",
        extra=["-v"],
    )  # fmt: skip
    assert len(responses) == 1
    assert responses[0].PatientBirthTime == ""
    assert "(Pending: WarningUnsupportedOptionalKeys)" in result.stderr


def latin1_study_find(server, **keys: str) -> list:
    """A STUDY-level C-FIND from pynetdicom, its identifier in ISO_IR 100 (Latin-1):
    the (status, identifier) pairs it got."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="IMAGING_SCP")
    try:
        query = pydicom.Dataset()
        query.SpecificCharacterSet = "ISO_IR 100"
        query.QueryRetrieveLevel = "STUDY"
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        query.StudyInstanceUID = ""
        return list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()


def test_a_latin1_request_matches_a_utf8_name(archive, tmp_path):
    server, _ = archive
    answers = latin1_study_find(server, PatientName="müller^*")
    pending = [identifier for status, identifier in answers if status.Status in (0xFF00, 0xFF01)]
    assert [str(i.PatientName) for i in pending] == ["Müller^Jürgen"]
    assert answers[-1][0].Status == 0x0000


def raw_find(assoc, identifier: bytes, message_id: int = 7) -> bytes:
    """A C-FIND-RQ (Study Root, context 1) and its identifier, as PDUs."""
    find_rq = command_set({
        0x0002: _uid(STUDY_ROOT_FIND),
        0x0100: struct.pack("<H", 0x0020),  # C-FIND-RQ
        0x0110: struct.pack("<H", message_id),
        0x0700: struct.pack("<H", 0),
        0x0800: struct.pack("<H", 0x0000),  # an identifier follows
    })  # fmt: skip
    return p_data(1, find_rq, command=True) + p_data(1, identifier, command=False)


RAW_CONTEXTS = [(1, STUDY_ROOT_FIND, [EXPLICIT_LE]), (3, VERIFICATION, [EXPLICIT_LE])]


@pytest.mark.parametrize(
    "identifier, status, says",
    [
        (b"\x20\x00\x0d\x00UI\x00\x00", 0xA900, "QueryRetrieveLevel"),  # no level
        (b"\x08\x00\x52\x00CS\x06\x00SERIES", 0xA900, "StudyInstanceUID"),  # hierarchy
        (b"\x08\x00\x52\x00CS\x06\x00WARD  ", 0xA900, "WARD"),  # no such level
        (b"\x08\x00\x52\x00CS\x06\x00STUDY \x10\x00\x10\x00ZZ\x04\x00abcd", 0xC000,
         "does not decode"),  # no such VR
        (b"\x08\x00\x52\x00CS\x06\x00STUDY \x08\x00\x20\x00DA\x08\x002026-1-x",
         0xA900, "StudyDate"),  # a date that is none
        (b"\x08\x00\x52\x00CS\x06\x00STUDY \x10\x00\x20\x00LO\x04\x00A\x00BC",
         0xA900, "NUL"),  # a query PostgreSQL cannot take: was 0xC000, "query failed"
    ],
)  # fmt: skip
def test_a_malformed_identifier_gets_a_failure_with_a_reason(archive, identifier, status, says):
    server, _ = archive
    with RawAssociation(server.port, RAW_CONTEXTS) as assoc:
        assoc.sock.sendall(raw_find(assoc, identifier))
        response = assoc.next_response()
        assert response.status == status
        assert says in response.comment
        assert assoc.echo(3).status == 0x0000  # the association goes on
        assoc.release()


def test_a_find_on_another_sop_class_is_refused_as_not_supported(archive):
    server, _ = archive
    ct = "1.2.840.10008.5.1.4.1.1.2"
    with RawAssociation(server.port, [(1, ct, [EXPLICIT_LE])]) as assoc:
        find_rq = command_set({
            0x0002: _uid(ct),
            0x0100: struct.pack("<H", 0x0020),
            0x0110: struct.pack("<H", 3),
            0x0800: struct.pack("<H", 0x0000),
        })  # fmt: skip
        identifier = b"\x08\x00\x52\x00CS\x06\x00STUDY "
        assoc.sock.sendall(p_data(1, find_rq, command=True) + p_data(1, identifier, command=False))
        response = assoc.next_response()
        assert response.status == 0x0122
        assert response.comment == f"{ct} is no Patient or Study Root FIND model"
        assoc.release()


def test_cancel_ends_the_query_within_one_response(archive):
    """A C-CANCEL-RQ that is there before the first response: at most one
    Pending goes out, then Cancel (0xFE00), and the association goes on."""
    server, _ = archive
    with RawAssociation(server.port, RAW_CONTEXTS) as assoc:
        identifier = b"\x08\x00\x52\x00CS\x06\x00STUDY \x20\x00\x0d\x00UI\x00\x00"
        cancel_rq = command_set({
            0x0100: struct.pack("<H", 0x0FFF),  # C-CANCEL-RQ
            0x0120: struct.pack("<H", 7),
            0x0800: struct.pack("<H", 0x0101),
        })  # fmt: skip
        assoc.sock.sendall(raw_find(assoc, identifier) + p_data(1, cancel_rq, command=True))
        statuses = []
        while not statuses or statuses[-1] in (0xFF00, 0xFF01):
            statuses.append(assoc.next_response().status)
        assert statuses[-1] == 0xFE00
        assert len(statuses) <= 2  # the 4 studies would give 4 Pendings and a Success
        assert assoc.echo(3).status == 0x0000
        assoc.release()
    assert server.wait_for_event("find.end")[-1]["cancelled"] is True
    # findscu --cancel after the first response: the query ends, the association is released.
    _, result = findscu(server.port, "STUDY", "StudyInstanceUID", extra=["--cancel", "1"])
    assert result.returncode == 0


def test_availability_is_answered_as_set_and_as_verify_found_it(tmp_path):
    server = start_server(tmp_path / "data")
    try:
        study_uid, series_uid = generate_uid(), generate_uid()
        paths = [make_instance(tmp_path / "f", study_uid=study_uid, series_uid=series_uid)
                 for _ in range(2)]  # fmt: skip
        send_files(server.port, paths)
        runner = CliRunner()
        data = server.index_flags
        runner.invoke(main, ["availability", "set", "--study", study_uid, "nearline", *data])
        study, _ = findscu(server.port, "STUDY", "StudyInstanceUID", "InstanceAvailability")
        assert [r.InstanceAvailability for r in study] == ["NEARLINE"]
        stored = server.index().execute("SELECT path FROM instances LIMIT 1").fetchone()[0]
        (server.data_dir / stored).unlink()
        runner.invoke(main, ["verify", *data])
        series, _ = findscu(server.port, "SERIES", f"StudyInstanceUID={study_uid}",
                            "InstanceAvailability")  # fmt: skip
        assert [r.InstanceAvailability for r in series] == ["UNAVAILABLE"]
        study, _ = findscu(server.port, "STUDY", "StudyInstanceUID", "InstanceAvailability")
        assert [r.InstanceAvailability for r in study] == ["UNAVAILABLE"]
    finally:
        server.stop()


def test_an_unknown_caller_is_refused_and_find_limit_ends_a_long_answer(tmp_path):
    server = start_server(tmp_path / "data", "--allowed-callers", "FINDSCU@127.0.0.1",
                          "--find-limit", "2")  # fmt: skip
    try:
        study_uid = generate_uid()
        paths = [make_instance(tmp_path / "f", study_uid=study_uid, series_uid=generate_uid())
                 for _ in range(3)]  # fmt: skip
        send_files(server.port, paths, calling="FINDSCU")
        _, refused = findscu(server.port, "STUDY", extra=["-aet", "STRANGER"], check=False)
        assert refused.returncode != 0
        assert (
            "calling AE title not allowed"
            in server.wait_for_event("association.rejected")[0]["reason"]
        )
        series, result = findscu(
            server.port, "SERIES", f"StudyInstanceUID={study_uid}", extra=["-v"]
        )
        assert len(series) == 2
        assert "Final Find Response (Refused: OutOfResources)" in result.stderr
    finally:
        server.stop()


# --- names in every script, SOP classes in a study -----------------------------

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"

NAMED_STUDIES = [
    # patient id, Specific Character Set, patient name, referrer, [(modality, SOP class, n)]
    ("NAME-1", "ISO_IR 100", "Test-Éü^Anna", "Ødegård^Åse", [("CT", CT_IMAGE, 2)]),
    ("NAME-2", "ISO_IR 192", "Σίσυφος^Κώστας", None,
     [("CT", CT_IMAGE, 2), ("OT", SECONDARY_CAPTURE, 1)]),
    ("NAME-3", "ISO_IR 144", "Иванов^Пётр", None, [("CT", CT_IMAGE, 1)]),
    # Decomposed: Zoe followed by U+0308 COMBINING DIAERESIS.
    ("NAME-4", "ISO_IR 192", "Straße^Zoe\u0308", None, [("CT", CT_IMAGE, 1)]),
    ("NAME-5", None, "Doe^John", None, [("CT", CT_IMAGE, 1)]),
]  # fmt: skip


@pytest.fixture(scope="module")
def named_archive(tmp_path_factory, index_backend):
    """A server sent NAMED_STUDIES, each name in its own character set: patient
    id -> study UID."""
    root = tmp_path_factory.mktemp("names")
    server = start_server(root / "data")
    studies, paths = {}, []
    for patient_id, charset, name, referrer, series in NAMED_STUDIES:
        studies[patient_id] = study_uid = generate_uid()
        for modality, sop_class, count in series:
            series_uid = generate_uid()
            for n in range(1, count + 1):
                paths.append(
                    make_instance(
                        root / "files",
                        study_uid=study_uid,
                        series_uid=series_uid,
                        modality=modality,
                        sop_class_uid=sop_class,
                        SpecificCharacterSet=charset,
                        PatientID=patient_id,
                        PatientName=name,
                        ReferringPhysicianName=referrer,
                        InstanceNumber=n,
                    )
                )
    # The names went out in their own character sets (Latin-1: É is C9, ü FC).
    assert b"Test-\xc9\xfc^Anna" in paths[0].read_bytes()
    assert {s.status for s in send_files(server.port, paths)} == {0}
    yield server, studies
    server.stop()


@pytest.mark.parametrize(
    "name, patient_ids",
    [
        ("test-ÉÜ*", {"NAME-1"}),  # stored in Latin-1 as Test-Éü
        ("TEST-ÉÜ^ANNA", {"NAME-1"}),
        ("σίσυφος*", {"NAME-2"}),  # stored as Σίσυφος: final sigma
        ("ΣΊΣΥΦΟΣ^κώστας", {"NAME-2"}),
        ("иванов^пётр", {"NAME-3"}),  # stored in ISO 8859-5
        ("STRASSE^ZOË", {"NAME-4"}),  # ß folds to ss; Ë composed, stored decomposed
        ("straße*", {"NAME-4"}),
        ("doe^*", {"NAME-5"}),
        ("?oe^JOHN", {"NAME-5"}),
        ("σίσυφο", set()),  # no wildcard: the whole name
    ],
)
def test_person_names_match_in_any_case_in_every_script(named_archive, name, patient_ids):
    server, studies = named_archive
    responses, _ = findscu(
        server.port, "STUDY", "SpecificCharacterSet=ISO_IR 192", f"PatientName={name}",
        "PatientID", "StudyInstanceUID",
    )  # fmt: skip
    assert {str(r.PatientID) for r in responses} == patient_ids
    assert uids(responses) == {studies[p] for p in patient_ids}
    # The admin command's filter matches names the same way.
    assert studies_json(server, "--patient-name", name) == {studies[p] for p in patient_ids}


def test_names_come_back_as_stored_and_a_latin1_request_folds_too(named_archive):
    server, studies = named_archive
    answers = latin1_study_find(server, PatientName="TEST-éÜ*", ReferringPhysicianName="øDEGÅRD*")
    pending = [identifier for status, identifier in answers if status.Status == 0xFF00]
    assert answers[-1][0].Status == 0x0000
    assert [(i.StudyInstanceUID, str(i.PatientName)) for i in pending] == [
        (studies["NAME-1"], "Test-Éü^Anna")
    ]
    assert str(pending[0].ReferringPhysicianName) == "Ødegård^Åse"
    # Greek, as sent (UTF-8): the folded form is only what matching reads.
    responses, _ = findscu(server.port, "STUDY", "PatientID=NAME-2", "PatientName")
    assert str(responses[0].PatientName) == "Σίσυφος^Κώστας"


def sop_classes(response) -> list[str]:
    element = response["SOPClassesInStudy"]
    return list(element.value) if element.VM > 1 else [element.value] if element.VM else []


def test_sop_classes_in_study_are_the_distinct_classes_of_its_instances(named_archive):
    server, studies = named_archive
    responses, result = findscu(
        server.port, "STUDY", "StudyInstanceUID", "PatientID", "SOPClassesInStudy", extra=["-v"]
    )
    by_patient = {str(r.PatientID): r for r in responses}
    assert set(by_patient) == {p for p, *_ in NAMED_STUDIES}
    # Two CT images and a secondary capture: two classes, each once, a UI of VM 2.
    assert by_patient["NAME-2"]["SOPClassesInStudy"].VR == "UI"
    assert sorted(sop_classes(by_patient["NAME-2"])) == [CT_IMAGE, SECONDARY_CAPTURE]
    assert sop_classes(by_patient["NAME-1"]) == [CT_IMAGE]
    assert "WarningUnsupportedOptionalKeys" not in result.stderr
    # In the Patient Root model too.
    responses, _ = findscu(
        server.port, "STUDY", "PatientID=NAME-2", "StudyInstanceUID", "SOPClassesInStudy",
        root="-P",
    )  # fmt: skip
    assert [sorted(sop_classes(r)) for r in responses] == [[CT_IMAGE, SECONDARY_CAPTURE]]
    # Matching: a UID, or a list of them, finds the studies holding one of them.
    for wanted in (SECONDARY_CAPTURE, f"{MR_IMAGE}\\{SECONDARY_CAPTURE}"):
        responses, _ = findscu(
            server.port, "STUDY", "StudyInstanceUID", f"SOPClassesInStudy={wanted}"
        )
        assert uids(responses) == {studies["NAME-2"]}
    responses, _ = findscu(
        server.port, "STUDY", "StudyInstanceUID", f"SOPClassesInStudy={MR_IMAGE}"
    )
    assert responses == []


def test_sop_classes_in_study_below_study_level_is_an_unsupported_key(named_archive):
    server, studies = named_archive
    responses, result = findscu(
        server.port, "SERIES", f"StudyInstanceUID={studies['NAME-2']}", "SeriesInstanceUID",
        "SOPClassesInStudy", extra=["-v"],
    )  # fmt: skip
    assert len(responses) == 2
    assert all(r.SOPClassesInStudy == "" for r in responses)
    assert "(Pending: WarningUnsupportedOptionalKeys)" in result.stderr


def test_an_index_of_schema_version_2_gets_its_names_folded(server_factory, tmp_path):
    server = server_factory()
    path = make_instance(
        tmp_path / "files", study_uid=generate_uid(), series_uid=generate_uid(),
        SpecificCharacterSet="ISO_IR 100", PatientName="Test-Éü^Anna",
        ReferringPhysicianName="Ødegård^Åse",
    )  # fmt: skip
    assert [s.status for s in send_files(server.port, [path])] == [0]
    server.stop()
    # Take the index back to what version 2 held: no folded names.
    with server.index() as db:
        db.execute("DROP INDEX IF EXISTS idx_studies_patient_name_folded")
        for column in ("patient_name_folded", "referrer_folded"):
            db.execute(f"ALTER TABLE studies DROP COLUMN {column}")
        db.set_schema_version(2)
    server = server_factory(data_dir=server.data_dir)
    utf8 = "SpecificCharacterSet=ISO_IR 192"
    responses, _ = findscu(
        server.port, "STUDY", utf8, "PatientName=TEST-ÉÜ*", "ReferringPhysicianName"
    )
    assert [str(r.ReferringPhysicianName) for r in responses] == ["Ødegård^Åse"]
    responses, _ = findscu(server.port, "STUDY", utf8, "ReferringPhysicianName=ødegård^åse")
    assert len(responses) == 1
    with server.index() as db:
        assert db.schema_version() == SCHEMA_VERSION


def test_a_name_a_later_instance_fills_in_is_folded_and_disagreements_name_it_once(
    server_factory, tmp_path
):
    server = server_factory()
    study, series = generate_uid(), generate_uid()
    names = [None, "Σίσυφος^Κώστας", "Roe^Jane"]  # the first instance has no name
    paths = [
        make_instance(tmp_path / "files", study_uid=study, series_uid=series,
                      SpecificCharacterSet="ISO_IR 192", PatientName=name)
        for name in names
    ]  # fmt: skip
    for path in paths:  # one at a time: the second fills in, the third disagrees
        assert [s.status for s in send_files(server.port, [path])] == [0]
    responses, _ = findscu(
        server.port, "STUDY", "SpecificCharacterSet=ISO_IR 192", "PatientName=ΣΊΣΥΦΟΣ*",
        "StudyInstanceUID",
    )  # fmt: skip
    assert uids(responses) == {study}
    server.wait_for_event("association.end", count=3)  # the stores' events are all out
    disagreements = server.events("index.disagreement")
    assert [(e["field"], e["kept"], e["received"]) for e in disagreements] == [
        ("patient_name", "Σίσυφος^Κώστας", "Roe^Jane")
    ]
