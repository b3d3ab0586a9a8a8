"""An instance naming another patient than its study's is refused, not merged
(issue 29 point 7): real senders, a real `imaging-scp serve`, the real admin CLI."""

import json
import subprocess

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from storage import files
from tests.conftest import (
    CT_IMAGE_STORAGE,
    IMAGING_SCP,
    STORESCU,
    assert_nothing_half_written,
    both_indexes,
    dataset_bytes,
    make_instance,
    requires_dcmtk,
    send_files,
    stored_files,
)

pytestmark = both_indexes

PATIENT_A = {"PatientID": "PAT-A", "PatientName": "Alpha^Ann"}
PATIENT_B = {"PatientID": "PAT-B", "PatientName": "Beta^Bob"}
OTHER_PATIENT = 0xC005


def admin(server, *args: str):
    """`imaging-scp <args> --json` on the server's index, as an admin runs it."""
    result = subprocess.run(
        [IMAGING_SCP, *args, "--json", *server.index_flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def storescu(server, *paths) -> None:
    result = subprocess.run(
        [STORESCU, "-aec", "IMAGING_SCP", "127.0.0.1", str(server.port), *map(str, paths)],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()


def _uid(path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


def _study_row(server, study_uid: str):
    return (
        server.index()
        .execute(
            "SELECT patient_id, issuer_of_patient_id, patient_name, number_of_series,"
            " number_of_instances FROM studies WHERE study_uid = ?",
            (study_uid,),
        )
        .fetchone()
    )


@requires_dcmtk()
def test_an_instance_of_another_patient_is_refused_not_merged(server, tmp_path):
    study, series = generate_uid(), generate_uid()
    first = [
        make_instance(tmp_path / "a", study_uid=study, series_uid=series, **PATIENT_A)
        for _ in range(2)
    ]
    storescu(server, *first)  # patient A's study, from a modality
    refused = {
        # A known series: on PostgreSQL, what the one-statement fast path indexes.
        "other ID, same series": make_instance(
            tmp_path / "b", study_uid=study, series_uid=series, **PATIENT_B
        ),
        "other ID, new series": make_instance(
            tmp_path / "b", study_uid=study, series_uid=generate_uid(), **PATIENT_B
        ),
        "same ID, other issuer": make_instance(
            tmp_path / "b",
            study_uid=study,
            series_uid=series,
            IssuerOfPatientID="OTHER-HOSPITAL",
            **PATIENT_A,
        ),
        "no ID": make_instance(tmp_path / "b", study_uid=study, series_uid=series, PatientID=None),
    }
    later_a = make_instance(tmp_path / "c", study_uid=study, series_uid=series, **PATIENT_A)

    statuses = send_files(server.port, [*refused.values(), later_a])

    assert [s.status for s in statuses] == [OTHER_PATIENT] * 4 + [0], statuses
    assert [s.comment for s in statuses[:4]] == [
        "Patient ID PAT-B differs from study's PAT-A",
        "Patient ID PAT-B differs from study's PAT-A",
        "Issuer of Patient ID OTHER-HOSPITAL differs from study's (empty)",
        "Patient ID (empty) differs from study's PAT-A",
    ]
    # The study is still patient A's alone, and goes on taking A's instances.
    row = _study_row(server, study)
    assert tuple(row) == ("PAT-A", None, "Alpha^Ann", 1, 3)
    # Nothing of a refused instance is written: no file, no row.
    stored = {p.name for p in stored_files(server.data_dir)}
    assert stored == {f"{_uid(p)}.dcm" for p in [*first, later_a]}
    assert_nothing_half_written(server)

    # The log names both identities.
    events = {e["request_sop_instance_uid"]: e for e in server.events("instance.refused")}
    event = events[_uid(refused["other ID, same series"])]
    assert event["status"] == "0xC005"
    assert (event["study_patient_id"], event["study_patient_name"]) == ("PAT-A", "Alpha^Ann")
    assert (event["patient_id"], event["patient_name"]) == ("PAT-B", "Beta^Bob")
    assert event["study_uid"] == study
    assert "PAT-A" in event["reason"] and "PAT-B" in event["reason"]
    issuer_event = events[_uid(refused["same ID, other issuer"])]
    assert issuer_event["issuer_of_patient_id"] == "OTHER-HOSPITAL"
    assert issuer_event["study_issuer_of_patient_id"] is None

    # An admin finds each refusal where conflicts are listed, and counted.
    listed = admin(server, "conflicts", "--study", study)
    assert {c["sopInstanceUid"]: c["action"] for c in listed} == {
        _uid(path): "refused" for path in refused.values()
    }
    conflict = next(c for c in listed if c["sopInstanceUid"] == event["request_sop_instance_uid"])
    assert conflict["study"] == study and conflict["callingAe"] == "TESTSCU"
    assert "path" not in conflict
    assert "PAT-A" in conflict["reason"] and "PAT-B" in conflict["reason"]
    assert admin(server, "study", study)["conflicts"] == 4
    stats = admin(server, "stats")
    assert (stats["conflicts"], stats["refused"], stats["instances"]) == (4, 4, 3)


def test_a_study_indexed_without_patient_id_takes_no_instance_with_one(server, tmp_path):
    """An ID arriving later would give the study's unidentified images to that
    patient: the study keeps no ID until an admin decides, and the instance is
    refused like any other patient's."""
    study, series = generate_uid(), generate_uid()
    unidentified = make_instance(tmp_path, study_uid=study, series_uid=series, PatientID=None)
    identified = make_instance(tmp_path, study_uid=study, series_uid=series, **PATIENT_B)
    statuses = send_files(server.port, [unidentified, identified])
    assert [(s.status, s.comment) for s in statuses] == [
        (0, None),
        (OTHER_PATIENT, "Patient ID PAT-B differs from study's (empty)"),
    ]
    assert tuple(_study_row(server, study))[:1] == (None,)
    assert [c["action"] for c in admin(server, "conflicts", "--study", study)] == ["refused"]
    assert_nothing_half_written(server)


def test_rebuild_reports_a_file_of_another_patient_and_keeps_the_study_whole(server, tmp_path):
    """A file of patient B under patient A's study, as an imaging-scp that merged
    them left it: `rebuild` indexes the study as ingest now would (the first
    patient's), says which file it could not index and why, and leaves no
    count of it behind; the record of an instance refused earlier survives it."""
    study, series = generate_uid(), generate_uid()
    first = [
        make_instance(tmp_path / "a", study_uid=study, series_uid=series, **PATIENT_A)
        for _ in range(2)
    ]
    refused = make_instance(tmp_path / "b", study_uid=study, series_uid=series, **PATIENT_B)
    statuses = send_files(server.port, [*first, refused])
    assert [s.status for s in statuses] == [0, 0, OTHER_PATIENT]
    other = make_instance(tmp_path / "b", study_uid=study, series_uid=series, **PATIENT_B)
    relpath = files.instance_relpath(study, series, _uid(other))
    receipt = {"received_at": "2099-01-01T00:00:00.000Z", "calling_ae": "OLDSCU"}  # after A's
    (server.data_dir / relpath).write_bytes(
        files.encode_file_header(CT_IMAGE_STORAGE, _uid(other), ExplicitVRLittleEndian, receipt)
        + dataset_bytes(other)
    )

    result = subprocess.run(
        [IMAGING_SCP, "rebuild", *server.index_flags], capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr
    assert f"could not index: {relpath}: Patient ID PAT-B" in result.stderr, result.stderr
    assert tuple(_study_row(server, study)) == ("PAT-A", None, "Alpha^Ann", 1, 2)
    assert server.index().execute("SELECT count(*) FROM instances").fetchone()[0] == 2
    # What no file tells, the refusal's record, is still listed.
    listed = admin(server, "conflicts", "--study", study)
    assert [(c["sopInstanceUid"], c["action"]) for c in listed] == [(_uid(refused), "refused")]
