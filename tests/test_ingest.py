"""Receive, store and index: real associations into a real `imaging-scp serve`."""

import json
import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import (
    ECHOSCU,
    STORESCU,
    both_indexes,
    bundled_test_files,
    dataset_bytes,
    make_instance,
    requires_dcmtk,
    send_files,
    stored_files,
    temp_files,
)

pytestmark = both_indexes

# What each bundled transfer syntax is, so the test can say which one is missing.
EXPECTED_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.51": "JPEG Extended",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}


def _with_missing_uids_added(path: Path, directory: Path) -> Path | None:
    """A copy of a bundled file that lacks Study/Series UIDs, with them added (in
    its own transfer syntax), so its syntax is covered too (JPEG-LS near-lossless
    exists only in such files)."""
    ds = pydicom.dcmread(path)
    if not ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID:
        return None
    if ds.get("StudyInstanceUID") and ds.get("SeriesInstanceUID"):
        return None
    ds.StudyInstanceUID = ds.get("StudyInstanceUID") or generate_uid()
    ds.SeriesInstanceUID = ds.get("SeriesInstanceUID") or generate_uid()
    directory.mkdir(exist_ok=True)
    copy = directory / path.name
    ds.save_as(copy, enforce_file_format=True)
    return copy


def test_every_bundled_transfer_syntax_is_stored_byte_for_byte(server, tmp_path):
    sources = bundled_test_files()
    completed = [_with_missing_uids_added(p, tmp_path / "completed") for p in sources]
    sources += [p for p in completed if p is not None]
    statuses = []
    # At most 128 presentation contexts per association: send in batches.
    for start in range(0, len(sources), 40):
        statuses += send_files(server.port, sources[start : start + 40])

    index = server.index()
    stored = {p: p.read_bytes() for p in stored_files(server.data_dir)}
    stored_syntaxes = set()
    for source, result in zip(sources, statuses, strict=True):
        source_ds = pydicom.dcmread(source, stop_before_pixels=True)
        has_uids = all(
            source_ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
        )
        if not has_uids:
            assert result.status == 0xC001, (source.name, result)
            assert "has no" in result.comment
            continue
        if "truncated" in source.name:  # pydicom's deliberately cut-off files
            assert result.status == 0xC000, (source.name, result)
            assert "truncated" in result.comment
            continue
        meta = pydicom.dcmread(source, stop_before_pixels=True).file_meta
        if meta.MediaStorageSOPInstanceUID != source_ds.SOPInstanceUID:
            # The C-STORE request carries the meta's UID (e.g. badVR.dcm): a mismatch.
            assert result.status == 0xA900, (source.name, result)
            continue
        assert result.status == 0x0000, (source.name, result)
        expected = dataset_bytes(source)
        matches = [p for p, data in stored.items() if data.endswith(expected)]
        assert matches, f"{source.name}: no stored file ends with the dataset bytes as sent"
        for match in matches:
            stored_ds = pydicom.dcmread(match)  # the stored file parses
            assert stored_ds.SOPInstanceUID == source_ds.SOPInstanceUID
            assert dataset_bytes(match) == expected
        syntax = str(pydicom.dcmread(source).file_meta.TransferSyntaxUID)
        stored_syntaxes.add(syntax)
        row = index.execute(
            "SELECT path FROM instances WHERE sop_instance_uid = ?", (source_ds.SOPInstanceUID,)
        ).fetchone()
        assert row, f"{source.name} is not in the index"
    missing = {uid: name for uid, name in EXPECTED_SYNTAXES.items() if uid not in stored_syntaxes}
    assert not missing, f"transfer syntaxes never stored: {missing}"


def test_three_series_study_over_two_associations(server, tmp_path):
    study = generate_uid()
    series = [(generate_uid(), "CT", 5), (generate_uid(), "PT", 4), (generate_uid(), "SR", 2)]
    files = {
        uid: [
            make_instance(
                tmp_path / "src", study_uid=study, series_uid=uid, modality=mod, SeriesNumber=n + 1
            )
            for _ in range(count)
        ]
        for n, (uid, mod, count) in enumerate(series)
    }
    ct, pt, sr = (files[uid] for uid, _, _ in series)
    first = send_files(server.port, ct + pt[:2])
    second = send_files(server.port, pt[2:] + sr)
    assert all(s.status == 0 for s in first + second)

    index = server.index()
    row = index.execute("SELECT * FROM studies WHERE study_uid = ?", (study,)).fetchone()
    assert row["number_of_series"] == 3
    assert row["number_of_instances"] == 11
    assert json.loads(row["modalities"]) == ["CT", "PT", "SR"]
    assert row["availability"] == "ONLINE"
    counts = {
        r["series_uid"]: (r["number_of_instances"], r["modality"], r["availability"])
        for r in index.execute("SELECT * FROM series WHERE study_uid = ?", (study,))
    }
    assert counts == {uid: (count, mod, "ONLINE") for uid, mod, count in series}

    ends = server.wait_for_event("association.end", count=2)
    assert [(e["instances"], e["outcome"]) for e in ends] == [(7, "released"), (4, "released")]
    assert all(e["calling_ae"] == "TESTSCU" and e["assoc"] for e in ends)
    stored = server.events("instance.stored")
    assert len(stored) == 11
    assert {"study_uid", "series_uid", "sop_instance_uid", "bytes", "ms", "assoc"} <= set(stored[0])


def test_first_value_wins_and_disagreement_is_logged(server, tmp_path):
    study, series = generate_uid(), generate_uid()
    first = make_instance(tmp_path, study_uid=study, series_uid=series, SeriesDescription="AXIAL")
    second = make_instance(
        tmp_path, study_uid=study, series_uid=series, SeriesDescription="CORONAL", StudyDate=None
    )
    assert [s.status for s in send_files(server.port, [first, second])] == [0, 0]
    index = server.index()
    row = index.execute("SELECT description FROM series WHERE series_uid = ?", (series,)).fetchone()
    assert row["description"] == "AXIAL"
    study_row = index.execute(
        "SELECT study_date FROM studies WHERE study_uid = ?", (study,)
    ).fetchone()
    assert study_row["study_date"] == "20261122"  # a later instance without it does not erase it
    disagreements = server.wait_for_event("index.disagreement")
    assert disagreements[0]["field"] == "description"
    assert (disagreements[0]["kept"], disagreements[0]["received"]) == ("AXIAL", "CORONAL")


def test_a_nul_inside_a_text_value_is_stored_as_sent_and_indexed(server, tmp_path):
    """PostgreSQL holds no NUL in text: such an instance was refused 0xA700
    ("index write failed"), which a modality retries for ever. The index holds
    U+FFFD in its place, on either engine; the file holds what was sent."""
    study, series = generate_uid(), generate_uid()
    path = make_instance(
        tmp_path, study_uid=study, series_uid=series,
        PatientName="Doe^John", SeriesDescription="AXIAL CHEST",
    )  # fmt: skip
    path.write_bytes(
        path.read_bytes()
        .replace(b"Doe^John", b"Doe\0John")
        .replace(b"AXIAL CHEST", b"AXIAL\0CHEST")
    )
    assert [s.status for s in send_files(server.port, [path])] == [0]
    (stored,) = stored_files(server.data_dir)
    assert stored.read_bytes().endswith(dataset_bytes(path))
    index = server.index()
    name = index.execute("SELECT patient_name FROM studies WHERE study_uid = ?", (study,))
    assert name.fetchone()[0] == "Doe\ufffdJohn"
    description = index.execute("SELECT description FROM series WHERE series_uid = ?", (series,))
    assert description.fetchone()[0] == "AXIAL\ufffdCHEST"


def test_later_instances_fill_in_what_the_first_lacked(server, tmp_path):
    # The second instance teaches the series its modality (the study's list
    # changes); the third is one more of a known series.
    study, series = generate_uid(), generate_uid()
    files = [
        make_instance(tmp_path, study_uid=study, series_uid=series, Modality=None),
        make_instance(
            tmp_path,
            study_uid=study,
            series_uid=series,
            modality="MR",
            SeriesDescription="LATE",
            AccessionNumber="ACC-9",
        ),
        make_instance(
            tmp_path, study_uid=study, series_uid=series, modality="MR", BodyPartExamined="HEAD"
        ),
    ]
    assert [s.status for s in send_files(server.port, files)] == [0, 0, 0]
    index = server.index()
    row = index.execute(
        "SELECT modality, description, body_part, number_of_instances FROM series"
        " WHERE series_uid = ?",
        (series,),
    ).fetchone()
    assert tuple(row) == ("MR", "LATE", "HEAD", 3)
    row = index.execute(
        "SELECT modalities, accession, number_of_instances, number_of_series FROM studies"
        " WHERE study_uid = ?",
        (study,),
    ).fetchone()
    assert json.loads(row["modalities"]) == ["MR"]
    assert (row["accession"], row["number_of_instances"], row["number_of_series"]) == (
        "ACC-9",
        3,
        1,
    )


@requires_dcmtk(ECHOSCU)
def test_dcmtk_echoscu(server):
    result = subprocess.run(
        [ECHOSCU, "-aec", "IMAGING_SCP", "127.0.0.1", str(server.port)],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert server.wait_for_event("echo")


@requires_dcmtk()
@pytest.mark.parametrize("nodelay", [False, True], ids=["nagle-on", "tcp-nodelay"])
def test_dcmtk_storescu_sends_a_folder(server, tmp_path, nodelay):
    study, series = generate_uid(), generate_uid()
    folder = tmp_path / "folder"
    for _ in range(30):
        make_instance(folder, study_uid=study, series_uid=series)
    env = (
        {**os.environ, "TCP_NODELAY": "1"}
        if nodelay
        else {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    )
    result = subprocess.run(
        [STORESCU, "+sd", "+r", "-aec", "IMAGING_SCP", "127.0.0.1", str(server.port), str(folder)],
        capture_output=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr.decode()
    row = (
        server.index()
        .execute("SELECT number_of_instances FROM series WHERE series_uid = ?", (series,))
        .fetchone()
    )
    assert row["number_of_instances"] == 30
    assert len(stored_files(server.data_dir)) == 30


@requires_dcmtk()
def test_dcmtk_storescu_compressed_file_is_taken_as_sent(server):
    source = Path(pydicom.data.get_testdata_file("JPEG2000.dcm"))
    result = subprocess.run(
        [STORESCU, "-R", "-xw", "-aec", "IMAGING_SCP", "127.0.0.1", str(server.port), str(source)],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr.decode()
    row = server.index().execute("SELECT transfer_syntax FROM instances").fetchone()
    assert row["transfer_syntax"] == "1.2.840.10008.1.2.4.91"


@requires_dcmtk()
@pytest.mark.parametrize(
    ("options", "name", "syntax"),
    [
        # storescu proposes [explicit LE] and [big endian, implicit LE] whatever
        # the file holds: implicit is kept, so a big-endian file needs -xb.
        ("-R", "MR_small_implicit.dcm", "1.2.840.10008.1.2"),
        ("-R", "MR_small.dcm", "1.2.840.10008.1.2.1"),
        ("-R -xb", "MR_small_bigendian.dcm", "1.2.840.10008.1.2.2"),
        ("-R -xd", "image_dfl.dcm", "1.2.840.10008.1.2.1.99"),
    ],
)
def test_dcmtk_storescu_uncompressed_file_is_taken_as_sent(server, options, name, syntax):
    """Issue 29 #6: which syntax is accepted decides whether storescu converts
    the object to another before sending it; each file here arrives in its own.
    (Its bytes are not compared: storescu re-encodes a dataset even within its
    syntax, and recompresses a deflated one.)"""
    source = Path(pydicom.data.get_testdata_file(name))
    result = subprocess.run(
        [STORESCU, *options.split(), "-aec", "IMAGING_SCP", "127.0.0.1", str(server.port)]
        + [str(source)],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr.decode()
    row = server.index().execute("SELECT transfer_syntax FROM instances").fetchone()
    assert row["transfer_syntax"] == syntax


def _counts(server) -> tuple:
    index = server.index()
    return (
        index.execute("SELECT count(*) FROM instances").fetchone()[0],
        index.execute("SELECT coalesce(sum(number_of_instances), 0) FROM series").fetchone()[0],
        index.execute("SELECT coalesce(sum(number_of_instances), 0) FROM studies").fetchone()[0],
    )


def test_identical_resend_is_success_and_counts_do_not_change(server, tmp_path):
    path = make_instance(tmp_path, study_uid=generate_uid(), series_uid=generate_uid())
    assert send_files(server.port, [path])[0].status == 0
    assert send_files(server.port, [path, path])[0].status == 0
    assert _counts(server) == (1, 1, 1)
    assert len(stored_files(server.data_dir)) == 1
    outcomes = [e["outcome"] for e in server.events("instance.stored")]
    assert outcomes == ["stored", "identical-resend", "identical-resend"]


def _same_uid_different_bytes() -> tuple[Path, Path]:
    # pydicom's MR_small and MR_small_RLE share one SOP Instance UID.
    return (
        Path(pydicom.data.get_testdata_file("MR_small.dcm")),
        Path(pydicom.data.get_testdata_file("MR_small_RLE.dcm")),
    )


def test_keep_first_keeps_the_new_copy_aside(server):
    first, second = _same_uid_different_bytes()
    assert [s.status for s in send_files(server.port, [first, second])] == [0, 0]
    assert _counts(server) == (1, 1, 1)
    index = server.index()
    path = index.execute("SELECT path FROM instances").fetchone()["path"]
    assert dataset_bytes(server.data_dir / path) == dataset_bytes(first)
    conflict = index.execute("SELECT * FROM conflicts").fetchone()
    assert conflict["action"] == "kept-aside"
    assert conflict["path"].startswith("conflicts/")
    assert dataset_bytes(server.data_dir / conflict["path"]) == dataset_bytes(second)
    stored = server.wait_for_event("instance.stored", count=2)
    assert stored[1]["outcome"] == "kept-aside"


def test_overwrite_policy_replaces_the_first(server_factory):
    server = server_factory("--duplicates", "overwrite")
    first, second = _same_uid_different_bytes()
    assert [s.status for s in send_files(server.port, [first, second])] == [0, 0]
    assert _counts(server) == (1, 1, 1)
    row = server.index().execute("SELECT path, transfer_syntax FROM instances").fetchone()
    assert dataset_bytes(server.data_dir / row["path"]) == dataset_bytes(second)
    assert row["transfer_syntax"] == "1.2.840.10008.1.2.5"
    assert len(stored_files(server.data_dir)) == 1


def test_reject_policy_refuses_with_a_reason(server_factory):
    server = server_factory("--duplicates", "reject")
    first, second = _same_uid_different_bytes()
    statuses = send_files(server.port, [first, second])
    assert statuses[0].status == 0
    assert statuses[1].status == 0xC004
    assert "different content" in statuses[1].comment
    assert _counts(server) == (1, 1, 1)
    assert len(stored_files(server.data_dir)) == 1
    refused = server.wait_for_event("instance.refused")
    assert refused[0]["status"] == "0xC004"


def _nothing_written(server) -> None:
    assert stored_files(server.data_dir) == []
    assert temp_files(server.data_dir) == []
    assert _counts(server) == (0, 0, 0)


@pytest.mark.parametrize("missing", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_missing_uid_is_refused(server, tmp_path, missing):
    uids = {"study_uid": generate_uid(), "series_uid": generate_uid()}
    path = make_instance(tmp_path, **uids, **{missing: None})
    (result,) = send_files(server.port, [path])
    assert result.status == 0xC001
    assert result.comment.startswith("dataset has no")
    _nothing_written(server)
    assert server.wait_for_event("instance.refused")[0]["reason"] == result.comment


@pytest.mark.parametrize(
    "field, value",
    [
        ("SOPInstanceUID", "../../x"),
        ("StudyInstanceUID", "../../../tmp/escape"),
        ("SeriesInstanceUID", "/etc"),
        ("StudyInstanceUID", "1.2." + "3" * 70),
        ("SeriesInstanceUID", "1..2"),
    ],
)
def test_invalid_uid_never_becomes_a_path(server, tmp_path, field, value):
    uids = {"study_uid": generate_uid(), "series_uid": generate_uid()}
    if field == "SOPInstanceUID":
        uids["sop_instance_uid"] = value
    else:
        uids[field.replace("InstanceUID", "").lower() + "_uid"] = value
    path = make_instance(tmp_path / "src", **uids)
    before = set(tmp_path.rglob("*"))
    (result,) = send_files(server.port, [path])
    assert result.status == 0xC002, result
    assert "invalid" in result.comment
    _nothing_written(server)
    created = {p for p in set(tmp_path.rglob("*")) - before if server.data_dir not in p.parents}
    created = {p for p in created if not p.name.startswith("serve-")}
    assert created == set(), f"files created outside the data directory: {created}"


def test_a_series_sent_under_a_second_study_is_refused_and_leaves_nothing(server, tmp_path):
    study, series = generate_uid(), generate_uid()
    first = make_instance(tmp_path / "a", study_uid=study, series_uid=series)
    moved = make_instance(tmp_path / "b", study_uid=generate_uid(), series_uid=series)
    after = make_instance(tmp_path / "c", study_uid=study, series_uid=series)
    statuses = send_files(server.port, [first, moved, after])
    assert [s.status for s in statuses] == [0, 0xC003, 0]
    # An ErrorComment holds 64 characters, fewer than the two UIDs: the sender is
    # told what is wrong whole, the log names the study.
    assert statuses[1].comment == "series already indexed under another study; the log names it"
    reason = f"series {series} already belongs to study {study}"
    assert server.wait_for_event("instance.refused")[0]["reason"] == reason
    assert _counts(server) == (2, 2, 2)
    moved_uid = pydicom.dcmread(moved, stop_before_pixels=True).SOPInstanceUID
    rows = server.index().execute(
        "SELECT count(*) FROM instances WHERE sop_instance_uid = ?", (moved_uid,)
    )
    assert rows.fetchone()[0] == 0
    assert len(stored_files(server.data_dir)) == 2
    assert temp_files(server.data_dir) == []


def test_dataset_that_differs_from_the_request_is_refused(server, tmp_path):
    path = make_instance(tmp_path, study_uid=generate_uid(), series_uid=generate_uid())
    ds = pydicom.dcmread(path)
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR, dataset says CT
    ds.save_as(path, enforce_file_format=False)  # keep the meta as we set it
    (result,) = send_files(server.port, [path])
    assert result.status == 0xA900
    assert "SOP Class UID differs" in result.comment
    _nothing_written(server)


def test_unparseable_dataset_is_refused_and_the_association_goes_on(server, tmp_path):
    good = make_instance(tmp_path, study_uid=generate_uid(), series_uid=generate_uid())
    bad = tmp_path / "bad.dcm"
    meta_length = len(good.read_bytes()) - len(dataset_bytes(good))
    # A valid file meta, then a sequence of undefined length holding no items.
    junk = b"\x08\x00\x32\x10SQ\x00\x00\xff\xff\xff\xff" + bytes(range(1, 9))
    bad.write_bytes(good.read_bytes()[:meta_length] + junk)
    statuses = send_files(server.port, [bad, good])
    assert statuses[0].status == 0xC000
    assert statuses[1].status == 0
    assert _counts(server) == (1, 1, 1)
    assert temp_files(server.data_dir) == []
