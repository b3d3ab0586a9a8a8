"""The admin CLI against an index filled by real C-STOREs, while `serve` runs."""

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from click.testing import CliRunner
from fhir.resources.bundle import Bundle as R5Bundle
from fhir.resources.imagingstudy import ImagingStudy as R5ImagingStudy
from fhir.resources.R4B.bundle import Bundle as R4Bundle
from fhir.resources.R4B.imagingstudy import ImagingStudy as R4ImagingStudy
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from scp.cli import main
from storage.catalog.engines import IndexLocation
from tests.conftest import (
    CT_IMAGE_STORAGE,
    INDEX_URLS,
    both_indexes,
    bundled_test_files,
    dataset_bytes,
    index_url_for,
    make_instance,
    send_files,
)

pytestmark = both_indexes


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str, data_dir: Path | None = None, check: bool = True) -> Result:
    """An admin command, run in-process (click's CliRunner): no server is needed
    to ask the index, and a process per call cost this file most of its time."""
    command = [*args]
    if data_dir is not None:
        command += ["--data-dir", str(data_dir)]
        if INDEX_URLS.get(Path(data_dir)):  # the PostgreSQL index its server was given
            command += ["--index-url", INDEX_URLS[Path(data_dir)]]
    outcome = CliRunner().invoke(main, command, catch_exceptions=False)
    result = Result(outcome.exit_code, outcome.stdout, outcome.stderr)
    if check:
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


def cli_json(*args: str, data_dir: Path):
    return json.loads(cli(*args, "--json", data_dir=data_dir).stdout)


def one_error_line(result: Result, code: int, text: str) -> None:
    assert result.returncode == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr


def index_of(data: Path):
    return IndexLocation(data, index_url_for(data)).open()


@pytest.fixture(scope="module")
def archive(tmp_path_factory, index_backend):
    """A running server holding two generated studies and every bundled pydicom file."""
    from tests.conftest import start_server

    root = tmp_path_factory.mktemp("archive")
    server = start_server(root / "data")
    studies = {
        "ct": dict(study_uid=generate_uid(), PatientID="P-100", PatientName="Doe^Jane",
                   AccessionNumber="ACC-1", StudyDate="20240301"),
        "mr": dict(study_uid=generate_uid(), PatientID="P-200", PatientName="Roe^Richard",
                   AccessionNumber="ACC-2", StudyDate="20250615"),
    }  # fmt: skip
    ct_series = [(generate_uid(), "CT", 3), (generate_uid(), "SR", 1)]
    files = [
        make_instance(root / "src", series_uid=uid, modality=mod, SeriesNumber=n, **studies["ct"])
        for n, (uid, mod, count) in enumerate(ct_series, 1)
        for _ in range(count)
    ]
    send_files(server.port, files)
    time.sleep(0.01)  # the second study is received later: newest first
    mr_series = generate_uid()
    send_files(
        server.port,
        [
            make_instance(root / "src", series_uid=mr_series, modality="MR", **studies["mr"])
            for _ in range(2)
        ],
    )
    bundled = bundled_test_files()
    for start in range(0, len(bundled), 40):
        send_files(server.port, bundled[start : start + 40])
    yield {
        "server": server,
        "data": server.data_dir,
        "ct": studies["ct"]["study_uid"],
        "mr": studies["mr"]["study_uid"],
        "ct_series": ct_series,
        "mr_series": mr_series,
    }
    server.stop()


def test_studies_filters_and_outputs(archive):
    data = archive["data"]
    newest_first = cli_json("studies", data_dir=data)
    all_uids = [s["uid"] for s in newest_first]
    assert all_uids.index(archive["mr"]) < all_uids.index(archive["ct"])
    assert [s["uid"] for s in cli_json("studies", "--patient-id", "P-100", data_dir=data)] == [
        archive["ct"]
    ]
    for pattern in ("doe^*", "D?E*", "*jane*"):
        found = cli_json("studies", "--patient-name", pattern, data_dir=data)
        assert [s["uid"] for s in found] == [archive["ct"]], pattern
    ranged = cli_json("studies", "--from", "2025-01-01", "--to", "20251231", data_dir=data)
    assert [s["uid"] for s in ranged] == [archive["mr"]]
    assert archive["ct"] in [
        s["uid"] for s in cli_json("studies", "--modality", "sr", data_dir=data)
    ]
    assert [s["uid"] for s in cli_json("studies", "--accession", "ACC-2", data_dir=data)] == [
        archive["mr"]
    ]
    assert len(cli_json("studies", "--received-since", "1h", data_dir=data)) == len(all_uids)
    assert cli_json("studies", "--received-since", "2999-01-01", data_dir=data) == []
    assert len(cli_json("studies", "--limit", "2", data_dir=data)) == 2

    ct = next(s for s in newest_first if s["uid"] == archive["ct"])
    assert (ct["numberOfSeries"], ct["numberOfInstances"], ct["modality"]) == (2, 4, ["CT", "SR"])
    assert (ct["availability"], ct["state"]) == ("ONLINE", "receiving")
    assert ct["patient"] == {"id": "P-100", "name": "Doe^Jane"}

    lines = cli("studies", "--ndjson", data_dir=data).stdout.splitlines()
    assert [json.loads(line)["uid"] for line in lines] == all_uids
    table = cli("studies", "--patient-id", "P-100", data_dir=data).stdout
    assert "Doe^Jane" in table and "CT,SR" in table and "ACC-1" in table
    one_error_line(cli("studies", "--from", "yesterday", data_dir=data, check=False), 2, "--from")


def test_study_shows_series_and_instance_paths(archive):
    data = archive["data"]
    shown = cli_json("study", archive["ct"], "--instances", data_dir=data)
    assert shown["numberOfInstances"] == 4
    assert [(s["uid"], s["numberOfInstances"], s["modality"]) for s in shown["series"]] == [
        (uid, count, mod) for uid, mod, count in archive["ct_series"]
    ]
    for series in shown["series"]:
        for instance in series["instance"]:
            assert (data / instance["path"]).is_file()
    table = cli("study", archive["ct"], "--instances", data_dir=data).stdout
    assert archive["ct_series"][0][0] in table and str(data) in table
    one_error_line(cli("study", "1.2.3.4", data_dir=data, check=False), 1, "no study 1.2.3.4")


def test_fhir_of_every_ingested_study_validates(archive):
    data = archive["data"]
    uids = [s["uid"] for s in cli_json("studies", data_dir=data)]
    assert len(uids) > 10
    for uid in uids:
        r4 = json.loads(cli("fhir", uid, data_dir=data).stdout)
        R4ImagingStudy.model_validate(r4)
        R5ImagingStudy.model_validate(
            json.loads(cli("fhir", uid, "--version", "r5", data_dir=data).stdout)
        )
        dstu2 = json.loads(cli("fhir", uid, "--version", "dstu2", data_dir=data).stdout)
        assert dstu2["uid"] == f"urn:oid:{uid}"
        assert dstu2["numberOfInstances"] == r4["numberOfInstances"]
    ct = json.loads(cli("fhir", archive["ct"], data_dir=data).stdout)
    assert (ct["numberOfSeries"], ct["numberOfInstances"]) == (2, 4)
    assert [m["code"] for m in ct["modality"]] == ["CT"]  # R4: acquisition modalities only


def test_export_bundle_and_ndjson(archive, tmp_path):
    data = archive["data"]
    count = len(cli_json("studies", data_dir=data))
    bundle_file = tmp_path / "bundle.json"
    cli("export", "--version", "r4", "-o", str(bundle_file), data_dir=data)
    bundle = json.loads(bundle_file.read_text())
    R4Bundle.model_validate(bundle)
    assert bundle["type"] == "searchset" and len(bundle["entry"]) == count
    r5 = json.loads(
        cli("export", "--version", "r5", "--instances", "--modality", "CT", data_dir=data).stdout
    )
    R5Bundle.model_validate(r5)
    lines = cli(
        "export", "--format", "ndjson", "--patient-id", "P-200", data_dir=data
    ).stdout.splitlines()
    assert [json.loads(line)["id"] for line in lines] == [archive["mr"]]


def test_empty_results_say_so_in_one_line(archive):
    data = archive["data"]
    assert cli("studies", "--patient-id", "NOBODY", data_dir=data).stdout == (
        "no studies match these filters\n"
    )
    assert cli("commitments", data_dir=data).stdout == "no commitment requests\n"
    assert cli("conflicts", "--study", "1.2.3", data_dir=data).stdout == (
        "no conflicts in study 1.2.3\n"
    )


def test_stats(archive):
    totals = cli_json("stats", data_dir=archive["data"])
    conn = index_of(archive["data"])
    assert totals["instances"] == conn.execute("SELECT count(*) FROM instances").fetchone()[0]
    assert totals["studies"] == conn.execute("SELECT count(*) FROM studies").fetchone()[0]
    by_modality = {m["modality"]: m for m in totals["modalities"]}
    assert by_modality["MR"]["instances"] >= 2
    assert totals["bytes"] == conn.execute("SELECT sum(size) FROM instances").fetchone()[0]
    assert "instances:" in cli("stats", data_dir=archive["data"]).stdout
    # One naming convention across commands: camelCase, as `studies --json` has it.
    assert "lastReceived" in totals and "last_received" not in totals
    assert totals["lastReceived"].endswith("Z")


def _study(data: Path, uid: str) -> dict:
    return cli_json("study", uid, data_dir=data)


def test_availability_is_stored_per_series_and_derived_for_the_study(server, tmp_path):
    study, first, second = generate_uid(), generate_uid(), generate_uid()
    send_files(
        server.port,
        [make_instance(tmp_path, study_uid=study, series_uid=s) for s in (first, second)],
    )
    data = server.data_dir
    cli("availability", "set", "--series", first, "nearline", data_dir=data)
    assert _study(data, study)["availability"] == "NEARLINE"
    cli("availability", "set", "--series", second, "offline", data_dir=data)
    shown = _study(data, study)
    assert shown["availability"] == "OFFLINE"
    assert {s["uid"]: s["availability"] for s in shown["series"]} == {
        first: "NEARLINE",
        second: "OFFLINE",
    }
    assert json.loads(cli("fhir", study, data_dir=data).stdout)["status"] == "registered"
    cli("availability", "set", "--study", study, "online", data_dir=data)
    assert _study(data, study)["availability"] == "ONLINE"
    one_error_line(
        cli("availability", "set", "--series", "1.2.3", "online", data_dir=data, check=False),
        1,
        "no series",
    )
    one_error_line(
        cli("availability", "set", "online", data_dir=data, check=False), 2, "exactly one"
    )


def test_state_receiving_then_stable(server_factory, tmp_path):
    server = server_factory("--stable-after", "1")
    study = generate_uid()
    send_files(server.port, [make_instance(tmp_path, study_uid=study, series_uid=generate_uid())])
    data = server.data_dir
    assert _study(data, study)["state"] == "receiving"
    time.sleep(1.2)
    assert (
        cli_json("study", study, "--config", str(_config(tmp_path, stable_after=1)), data_dir=data)[
            "state"
        ]
        == "stable"
    )


def _config(directory: Path, **values) -> Path:
    path = directory / "admin.toml"
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
    return path


def test_aborted_association_marks_its_series_incomplete(server, tmp_path):
    study, series = generate_uid(), generate_uid()
    ae = AE("MODALITY")
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="IMAGING_SCP")
    assert (
        assoc.send_c_store(make_instance(tmp_path, study_uid=study, series_uid=series)).Status == 0
    )
    assoc.abort()
    server.wait_for_event("series.incomplete")
    data = server.data_dir
    shown = _study(data, study)
    assert shown["state"] == "incomplete"
    assert "aborted" in shown["incompleteReason"] and "MODALITY" in shown["incompleteReason"]
    assert shown["series"][0]["state"] == "incomplete"
    assert "incomplete" in cli("study", study, data_dir=data).stdout
    extensions = json.loads(cli("fhir", study, data_dir=data).stdout)["extension"]
    assert {
        "url": "https://imaging-scp.example/fhir/StructureDefinition/state",
        "valueCode": "incomplete",
    } in extensions

    # The rest of the series arrives: no longer incomplete.
    send_files(server.port, [make_instance(tmp_path, study_uid=study, series_uid=series)])
    assert _study(data, study)["state"] == "receiving"

    # Another abort, then the admin says it is complete.
    assoc = ae.associate("127.0.0.1", server.port, ae_title="IMAGING_SCP")
    assoc.send_c_store(make_instance(tmp_path, study_uid=study, series_uid=series))
    assoc.abort()
    server.wait_for_event("series.incomplete", count=2)
    assert _study(data, study)["state"] == "incomplete"
    cli("study", study, "--mark-complete", data_dir=data)
    assert _study(data, study)["state"] == "receiving"


def test_an_identical_resend_that_aborts_leaves_a_series_complete(server, tmp_path):
    """Issue 13 #1: 20 instances resent byte for byte, then an abort, made a
    complete series `incomplete`; a later full resend over a released
    association did not clear it. (Spoken by hand: an identical resend is
    answered within microseconds, faster than pynetdicom's requestor can take.)"""
    from tests.test_hostile import EXPLICIT_LE, RawAssociation

    study, series = generate_uid(), generate_uid()
    files = [make_instance(tmp_path, study_uid=study, series_uid=series) for _ in range(3)]
    send_files(server.port, files)
    data = server.data_dir

    def send_then_drop(paths):
        assoc = RawAssociation(server.port, [(1, CT_IMAGE_STORAGE, [EXPLICIT_LE])])
        for path in paths:
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            assert assoc.store(1, CT_IMAGE_STORAGE, uid, dataset_bytes(path)).status == 0
        assoc.close()  # no release: the connection just ends

    send_then_drop(files[:2])
    server.wait_for_event("association.end", count=2)
    assert _study(data, study)["state"] == "receiving"  # nothing new could be half-sent
    assert server.events("series.incomplete") == []

    # A new instance, then the connection drops: incomplete, rightly.
    extra = make_instance(tmp_path, study_uid=study, series_uid=series)
    send_then_drop([extra])
    server.wait_for_event("series.incomplete")
    assert _study(data, study)["state"] == "incomplete"
    # The sender sends the series again, all of it already here, and releases.
    send_files(server.port, [*files, extra])
    assert server.wait_for_event("series.complete_again")[0]["series"] == [series]
    assert _study(data, study)["state"] == "receiving"


def test_legacy_dates_are_normalised_once_and_kept_as_sent(server, tmp_path):
    """Issue 13 #2: StudyDate 1997.04.24 (ACR-NEMA style, pydicom's ExplVR_BigEnd.dcm)
    showed as 1997.04.24 and was missed by --from/--to."""
    source = Path(pydicom.data.get_testdata_file("ExplVR_BigEnd.dcm"))
    assert pydicom.dcmread(source).StudyDate == "1997.04.24"
    send_files(server.port, [source])
    data = server.data_dir
    study_uid = pydicom.dcmread(source).StudyInstanceUID

    found = cli_json("studies", "--from", "1997-01-01", "--to", "1997-12-31", data_dir=data)
    assert [s["uid"] for s in found] == [study_uid]
    assert found[0]["started"] == "1997-04-24T14:04:38"
    assert (found[0]["dateAsSent"], found[0]["timeAsSent"]) == ("1997.04.24", "14:04:38")
    assert "1997-04-24" in cli("studies", data_dir=data).stdout
    resource = json.loads(cli("fhir", study_uid, data_dir=data).stdout)
    assert resource["started"].startswith("1997-04-24")
    row = (
        index_of(data)
        .execute("SELECT study_date, study_time, study_date_raw, study_time_raw FROM studies")
        .fetchone()
    )
    assert tuple(row) == ("19970424", "140438", "1997.04.24", "14:04:38")


def test_verify_finds_missing_damaged_and_unknown_files(server, tmp_path):
    study, series = generate_uid(), generate_uid()
    send_files(
        server.port, [make_instance(tmp_path, study_uid=study, series_uid=series) for _ in range(3)]
    )
    data = server.data_dir
    assert cli("verify", "--checksum", data_dir=data).returncode == 0

    paths = [
        data / i["path"]
        for s in cli_json("study", study, "--instances", data_dir=data)["series"]
        for i in s["instance"]
    ]
    damaged = bytearray(paths[0].read_bytes())
    damaged[-1] ^= 0xFF
    paths[0].write_bytes(damaged)
    assert cli("verify", data_dir=data).returncode == 0  # same size: only --checksum can tell
    report = json.loads(cli("verify", "--checksum", "--json", data_dir=data, check=False).stdout)
    assert report["wrongChecksum"] == [str(paths[0].relative_to(data))]

    paths[1].unlink()
    result = cli("verify", "--json", data_dir=data, check=False)
    assert result.returncode == 1
    assert json.loads(result.stdout)["unavailableSeries"] == [series]
    assert _study(data, study)["availability"] == "UNAVAILABLE"

    # A file in its place that the index does not know (e.g. copied back from a backup).
    other = tmp_path / "other"
    other_server = start_other_server(other)
    extra = make_instance(tmp_path, study_uid=study, series_uid=series)
    send_files(other_server.port, [extra])
    other_server.stop()
    (relpath,) = [p.relative_to(other / "data") for p in (other / "data").rglob("*.dcm")]
    shutil.copy(other / "data" / relpath, data / relpath)
    report = json.loads(cli("verify", "--json", data_dir=data, check=False).stdout)
    assert report["unknownFiles"] == [str(relpath)]
    report = json.loads(cli("verify", "--repair", "--json", data_dir=data, check=False).stdout)
    assert report["repaired"] == [str(relpath)]
    assert _study(data, study)["numberOfInstances"] == 4


@pytest.mark.parametrize("damage", ["bytes changed", "truncated", "no longer DICOM"])
def test_a_resend_mends_a_stored_file_that_verify_finds_damaged(server, tmp_path, damage):
    """What `verify --checksum` (or a storage commitment) found wrong, the sender's
    identical resend puts right: the damaged copy is not taken for the resend."""
    study, series = generate_uid(), generate_uid()
    sent = [make_instance(tmp_path / str(n), study_uid=study, series_uid=series) for n in range(2)]
    assert [s.status for s in send_files(server.port, sent)] == [0, 0]
    data = server.data_dir
    uid = pydicom.dcmread(sent[0], stop_before_pixels=True).SOPInstanceUID
    stored = (
        data
        / server.index()
        .execute("SELECT path FROM instances WHERE sop_instance_uid = ?", (uid,))
        .fetchone()[0]
    )
    damaged = bytearray(stored.read_bytes())
    if damage == "truncated":
        del damaged[-100:]
    elif damage == "no longer DICOM":  # verify --checksum once stopped on it with a traceback
        damaged[128:132] = b"XXXX"
    else:
        damaged[-1] ^= 0xFF
    stored.write_bytes(damaged)
    assert cli("verify", "--checksum", data_dir=data, check=False).returncode == 1

    assert [s.status for s in send_files(server.port, sent)] == [0, 0]
    assert cli("verify", "--checksum", data_dir=data).returncode == 0
    assert dataset_bytes(stored) == dataset_bytes(sent[0])
    outcomes = [e["outcome"] for e in server.events("instance.stored")]
    assert outcomes == ["stored", "stored", "restored", "identical-resend"]
    assert _study(data, study)["numberOfInstances"] == 2


def test_verify_gives_back_the_availability_it_took_never_an_admins(server, tmp_path):
    """Issue 13 #4: with the file back, verify said OK and the series stayed UNAVAILABLE."""
    study, series = generate_uid(), generate_uid()
    send_files(server.port, [make_instance(tmp_path, study_uid=study, series_uid=series)
                             for _ in range(2)])  # fmt: skip
    data = server.data_dir
    cli("availability", "set", "--series", series, "nearline", data_dir=data)
    stored = data / cli_json("study", study, "--instances", data_dir=data)["series"][0][
        "instance"][0]["path"]  # fmt: skip
    saved = stored.read_bytes()
    stored.unlink()
    assert cli("verify", data_dir=data, check=False).returncode == 1
    assert _study(data, study)["availability"] == "UNAVAILABLE"

    stored.write_bytes(saved)  # back from a backup
    result = cli("verify", data_dir=data)
    assert "series available again (their files are back): 1" in result.stdout
    assert _study(data, study)["series"][0]["availability"] == "NEARLINE"  # the admin's value
    assert _study(data, study)["availability"] == "NEARLINE"

    cli("availability", "set", "--series", series, "unavailable", data_dir=data)
    assert cli("verify", data_dir=data).returncode == 0
    assert _study(data, study)["availability"] == "UNAVAILABLE"  # an admin's stays


def test_verify_checks_kept_aside_copies_too(server, tmp_path):
    """Issue 13 #3: a copy removed from conflicts/ gave "checked 1 indexed files OK"."""
    first = make_instance(tmp_path / "a", study_uid=generate_uid(), series_uid=generate_uid())
    send_files(server.port, [first])
    ds = pydicom.dcmread(first)
    ds.PatientName = "Other^Bytes"  # the same SOP Instance UID, other bytes: kept aside
    ds.save_as(tmp_path / "resent.dcm")
    send_files(server.port, [tmp_path / "resent.dcm"])
    data = server.data_dir
    (aside,) = (data / "conflicts").rglob("*.dcm")
    assert cli("verify", "--checksum", data_dir=data).returncode == 0
    # Kept-aside copies are visible: listed, and counted in `study` and `stats`.
    [conflict] = cli_json("conflicts", data_dir=data)
    assert (conflict["action"], conflict["path"]) == ("kept-aside", str(aside.relative_to(data)))
    assert conflict["study"] == ds.StudyInstanceUID
    assert cli_json("conflicts", "--study", generate_uid(), data_dir=data) == []
    assert "no conflicts in study" in cli("conflicts", "--study", "1.2.3", data_dir=data).stdout
    assert cli_json("study", ds.StudyInstanceUID, data_dir=data)["conflicts"] == 1
    assert cli_json("stats", data_dir=data)["conflicts"] == 1

    aside.unlink()

    result = cli("verify", data_dir=data, check=False)
    assert result.returncode == 1
    assert "checked 1 indexed files and 1 kept-aside copies" in result.stdout
    assert str(aside.relative_to(data)) in result.stdout
    report = json.loads(cli("verify", "--json", data_dir=data, check=False).stdout)
    assert report["missing"] == [str(aside.relative_to(data))]
    assert report["unavailableSeries"] == []  # the indexed copy is fine


def start_other_server(directory: Path):
    from tests.conftest import start_server

    return start_server(directory / "data")


def _tables(data: Path) -> dict:
    conn = index_of(data)
    return {
        table: sorted((tuple(row) for row in conn.execute(f"SELECT * FROM {table}")), key=repr)
        for table in ("studies", "series", "instances")
    }


def test_rebuild_recreates_what_live_ingest_made(server, tmp_path):
    study = generate_uid()
    first = [make_instance(tmp_path, study_uid=study, series_uid=generate_uid(), modality=m,
                           SeriesDescription=m) for m in ("CT", "PT")]  # fmt: skip
    series = generate_uid()
    second = [make_instance(tmp_path, study_uid=study, series_uid=series, SeriesDescription=d)
              for d in ("FIRST", "SECOND")]  # fmt: skip
    send_files(server.port, first, calling="ONE")
    send_files(server.port, second, calling="TWO")
    send_files(
        server.port, [make_instance(tmp_path, study_uid=generate_uid(), series_uid=generate_uid())]
    )
    data = server.data_dir
    live = _tables(data)
    # A stale scratch file from an interrupted run is started afresh.
    (data / "index.sqlite.rebuild").write_bytes(b"left over by an interrupted rebuild")
    cli("rebuild", data_dir=data)
    assert _tables(data) == live
    assert not (data / "index.sqlite.rebuild").exists()
    assert cli("verify", "--checksum", data_dir=data).returncode == 0


def test_delete_series_and_study(server, tmp_path):
    study, ct, sr = generate_uid(), generate_uid(), generate_uid()
    send_files(
        server.port,
        [
            make_instance(tmp_path, study_uid=study, series_uid=ct, modality="CT"),
            make_instance(tmp_path, study_uid=study, series_uid=sr, modality="SR"),
        ],
    )
    data = server.data_dir
    one_error_line(cli("delete", "--series", sr, data_dir=data, check=False), 2, "--yes")
    cli("delete", "--series", sr, "--yes", data_dir=data)
    shown = _study(data, study)
    assert (shown["numberOfSeries"], shown["numberOfInstances"], shown["modality"]) == (
        1,
        1,
        ["CT"],
    )
    assert not (data / study / sr).exists()
    cli("delete", "--study", study, "--yes", data_dir=data)
    assert not (data / study).exists()
    one_error_line(cli("study", study, data_dir=data, check=False), 1, "no study")
    one_error_line(
        cli("delete", "--study", study, "--yes", data_dir=data, check=False), 1, "no study"
    )


def test_commands_say_clearly_when_there_is_no_index(tmp_path):
    one_error_line(cli("studies", data_dir=tmp_path / "empty", check=False), 1, "no index")


def test_rebuild_beside_a_live_ingest_keeps_every_acknowledged_instance(server, tmp_path):
    """An instance answered Success while rebuild scans the files and builds its
    scratch index keeps its row once rebuild replaces the live rows — also one
    whose transfer began before rebuild did and ended after the scan passed."""
    import subprocess
    import threading

    from tests.conftest import IMAGING_SCP, assert_nothing_half_written
    from tests.test_hostile import EXPLICIT_LE, RawAssociation, c_store_rq, p_data

    data = server.data_dir
    before = [make_instance(tmp_path / "before", study_uid=generate_uid(),
                            series_uid=generate_uid()) for _ in range(300)]  # fmt: skip
    assert {s.status for s in send_files(server.port, before)} == {0}
    # Its first fragment now (the instance's received time), its last one once
    # rebuild has begun to scan.
    slow = make_instance(tmp_path / "slow", study_uid=generate_uid(), series_uid=generate_uid())
    slow_uid = pydicom.dcmread(slow).SOPInstanceUID
    slow_bytes = dataset_bytes(slow)
    assoc = RawAssociation(server.port, [(1, CT_IMAGE_STORAGE, [EXPLICIT_LE])])
    assoc.sock.sendall(
        p_data(1, c_store_rq(CT_IMAGE_STORAGE, slow_uid), command=True)
        + p_data(1, slow_bytes[:1000], command=False, last=False)
    )
    acknowledged: list[str] = []
    rebuilt = threading.Event()

    def send_while_rebuilding():
        while not rebuilt.is_set():
            path = make_instance(tmp_path / "during", study_uid=generate_uid(),
                                 series_uid=generate_uid())  # fmt: skip
            if send_files(server.port, [path])[0].status == 0:
                acknowledged.append(str(pydicom.dcmread(path).SOPInstanceUID))

    sender = threading.Thread(target=send_while_rebuilding)
    sender.start()
    try:
        rebuild = subprocess.Popen(
            [IMAGING_SCP, "rebuild", *server.index_flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        scratch = data / "index.sqlite.rebuild"
        deadline = time.monotonic() + 30
        while not _has_schema(scratch):  # the scan of the files begins right after
            assert rebuild.poll() is None and time.monotonic() < deadline, rebuild.stderr
            time.sleep(0.01)
        assoc.sock.sendall(p_data(1, slow_bytes[1000:], command=False, last=True))
        assert assoc.next_response().status == 0
        assoc.release()
        out, err = rebuild.communicate(timeout=120)
        assert rebuild.returncode == 0, err
    finally:
        rebuilt.set()
        sender.join(60)
    assert acknowledged  # the sender did send during the rebuild
    # Every row has its file and every file its row; every Success is indexed.
    assert_nothing_half_written(server)
    indexed = {row[0] for row in index_of(data).execute("SELECT sop_instance_uid FROM instances")}
    assert {slow_uid, *acknowledged} <= indexed
    assert cli("verify", data_dir=data).returncode == 0


def _has_schema(path: Path) -> bool:
    import sqlite3

    if not path.exists():
        return False
    try:
        with sqlite3.connect(path) as db:
            found = db.execute("SELECT 1 FROM sqlite_schema WHERE name = 'instances'").fetchone()
        db.close()
        return found is not None
    except sqlite3.Error:
        return False


def test_a_character_set_pydicom_does_not_know_is_logged_not_printed(server, tmp_path):
    """pydicom both logs and warns about a Specific Character Set it does not know:
    serve's log has it as one of its JSON events, and rebuild, whose terminal is
    the admin's, prints nothing of it (a raw Python warning per file before)."""
    import subprocess

    from tests.conftest import IMAGING_SCP

    odd = make_instance(
        tmp_path, study_uid=generate_uid(), series_uid=generate_uid(),
        SpecificCharacterSet="ISO_IR 999", PatientName="Odd^Charset",
    )  # fmt: skip
    assert [s.status for s in send_files(server.port, [odd])] == [0x0000]
    warning = "Unknown encoding 'ISO_IR 999' - using default encoding instead"
    assert [e["event"] for e in server.events() if e.get("logger") == "pydicom"] == [warning] * 2
    raw = [line for line in server.log_path.read_text().splitlines() if not line.startswith("{")]
    assert raw == []

    rebuild = subprocess.run(
        [IMAGING_SCP, "rebuild", *server.index_flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rebuild.returncode == 0, rebuild.stderr
    assert "indexed 1 instances" in rebuild.stdout
    assert rebuild.stderr == ""


def test_rebuild_keeps_the_availability_an_admin_set(server, tmp_path):
    """The files cannot tell it, nor when it was set (the study's FHIR
    lastUpdated): rebuild takes both from the index it replaces."""
    study = generate_uid()
    sent = [make_instance(tmp_path, study_uid=study, series_uid=generate_uid()) for _ in range(2)]
    assert {s.status for s in send_files(server.port, sent)} == {0}
    data = server.data_dir
    cli("availability", "set", "--study", study, "offline", data_dir=data)
    query = ("SELECT changed_at FROM studies WHERE study_uid = ?", (study,))
    with server.index() as db:
        (changed_at,) = db.execute(*query).fetchone()
    assert changed_at is not None
    rebuild = cli("rebuild", data_dir=data)
    shown = _study(data, study)
    assert shown["availability"] == "OFFLINE"
    assert {s["availability"] for s in shown["series"]} == {"OFFLINE"}
    assert "carried over from the old index" in rebuild.stdout
    with server.index() as db:
        assert db.execute(*query).fetchone()[0] == changed_at
