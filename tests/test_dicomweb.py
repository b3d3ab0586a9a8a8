"""DICOMweb at /dicomweb, read by dicomweb-client (a client nobody here wrote):
QIDO-RS as `imaging-scp studies` answers, WADO-RS byte-exact, metadata, frames,
WADO-URI."""

import hashlib
import json
import socket
import struct
import subprocess
import urllib.request
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom.dsutils import split_dataset

from scp.web import dicomweb
from storage.catalog.index import Catalog
from storage.catalog.series import set_availability
from tests.conftest import (
    IMAGING_SCP,
    both_indexes,
    dataset_bytes,
    make_instance,
    send_files,
)
from tests.test_find import findscu
from tests.test_find import uids as find_uids
from tests.test_interop import Orthanc, requires_orthanc, two_series_study
from tests.test_web import running_web

pytestmark = both_indexes


web = pytest.fixture(running_web, name="web")

ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def client(web) -> DICOMwebClient:
    return DICOMwebClient(f"{web.url}/dicomweb")


def stored(web, sop_instance_uid: str) -> bytes:
    """The file the index holds for an instance, as stored."""
    with web.location.open() as db:
        (path,) = db.execute(
            "SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
        ).fetchone()
    return (web.location.data_dir / path).read_bytes()


def studies_json(web, *flags: str) -> set[str]:
    index = ["--index-url", web.location.url] if web.location.url else []
    command = [IMAGING_SCP, "studies", "--json", "--data-dir", str(web.location.data_dir)]
    output = subprocess.run([*command, *index, *flags], capture_output=True, text=True, check=True)
    return {study["uid"] for study in json.loads(output.stdout)}


def test_qido_rs_finds_what_the_studies_command_lists(web, server_factory):
    mine = [
        web.receive(PatientID="Q-1", StudyDate="20240105", modality="CT", PatientName="Doe^Jane"),
        web.receive(PatientID="Q-1", StudyDate="20240620", modality="MR", PatientName="Doe^Jane"),
    ]
    series = generate_uid()
    web.receive(study_uid=mine[0], series_uid=series, PatientID="Q-1", PatientName="Doe^Jane")
    web.receive(PatientID="Q-2", StudyDate="20240105", modality="CT", PatientName="Roe^Rick")
    dw = client(web)

    def uids(found, keyword="StudyInstanceUID"):
        return {pydicom.Dataset.from_json(d).get(keyword) for d in found}

    assert uids(dw.search_for_studies(search_filters={"PatientID": "Q-1"})) == studies_json(
        web, "--patient-id", "Q-1"
    )
    assert uids(dw.search_for_studies(search_filters={"PatientName": "doe*"})) == set(mine)
    ranged = dw.search_for_studies(search_filters={"StudyDate": "20240101-20240131"})
    assert uids(ranged) == studies_json(web, "--from", "2024-01-01", "--to", "2024-01-31")
    assert uids(dw.search_for_studies(search_filters={"ModalitiesInStudy": "MR"})) == {mine[1]}
    assert uids(dw.search_for_studies(search_filters={"00100020": "Q-2"})) == studies_json(
        web, "--patient-id", "Q-2"
    )
    (first,) = dw.search_for_studies(search_filters={"StudyInstanceUID": mine[0]})
    study = pydicom.Dataset.from_json(first)
    assert study.NumberOfStudyRelatedInstances == 2
    assert study.NumberOfStudyRelatedSeries == 2
    assert study.InstanceAvailability == "ONLINE"
    assert str(study.PatientName) == "Doe^Jane"
    assert first["00081190"]["Value"] == [f"{web.url}/dicomweb/studies/{mine[0]}"]

    assert len(dw.search_for_series(mine[0])) == 2
    (only,) = dw.search_for_series(search_filters={"SeriesInstanceUID": series})
    assert pydicom.Dataset.from_json(only).NumberOfSeriesRelatedInstances == 1
    assert len(dw.search_for_instances(mine[0], series)) == 1
    assert len(dw.search_for_instances(search_filters={"PatientID": "Q-1"})) == 3
    assert len(dw.search_for_studies(limit=2)) == 2
    assert len(dw.search_for_studies(offset=2)) == 1
    fields = dw.search_for_studies(search_filters={"PatientID": "Q-2"}, fields=["all"])
    assert "00100030" in fields[0] or "00080020" in fields[0]
    assert httpx.get(f"{web.url}/dicomweb/studies?NotAKeyword=1").status_code == 400

    # The same filters asked by C-FIND (dcmtk's findscu) of a listener on the same index.
    listener = server_factory(data_dir=web.location.data_dir)
    for qido, keys in (
        ({"PatientID": "Q-1"}, ["PatientID=Q-1"]),
        ({"PatientName": "doe*"}, ["PatientName=doe*"]),
        ({"StudyDate": "20240101-20240131"}, ["StudyDate=20240101-20240131"]),
        ({"ModalitiesInStudy": "MR"}, ["ModalitiesInStudy=MR"]),
        ({}, []),
    ):
        answers, _ = findscu(listener.port, "STUDY", "StudyInstanceUID", *keys)
        assert uids(dw.search_for_studies(search_filters=qido)) == find_uids(answers), qido


def test_wado_rs_sends_the_stored_files_as_stored(web):
    study, series = generate_uid(), generate_uid()
    sops = [generate_uid() for _ in range(3)]
    for number, sop in enumerate(sops, 1):
        web.receive(study_uid=study, series_uid=series, sop_instance_uid=sop, InstanceNumber=number)
    other = web.receive(study_uid=study, modality="SR", sop_instance_uid=None)
    dw = client(web)

    retrieved = dw.retrieve_study(study)
    assert len(retrieved) == 4 and other
    by_uid = {ds.SOPInstanceUID: ds for ds in retrieved}
    answer = httpx.get(
        f"{web.url}/dicomweb/studies/{study}/series/{series}/instances/{sops[1]}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    boundary = answer.headers["content-type"].split("boundary=")[1]
    body = answer.content
    part = body.split(b"\r\n\r\n", 1)[1].rsplit(f"\r\n--{boundary}--".encode(), 1)[0]
    assert part == stored(web, sops[1])  # byte-exact
    assert [ds.SOPInstanceUID for ds in dw.retrieve_series(study, series)] == sops
    instance = dw.retrieve_instance(study, series, sops[2])
    assert instance.PixelData == by_uid[sops[2]].PixelData

    metadata = dw.retrieve_instance_metadata(study, series, sops[0])
    assert metadata["00080018"]["Value"] == [sops[0]]
    assert "BulkDataURI" in metadata["7FE00010"]
    pixels = httpx.get(metadata["7FE00010"]["BulkDataURI"])
    assert pixels.status_code == 200
    assert by_uid[sops[0]].PixelData in pixels.content
    assert len(dw.retrieve_study_metadata(study)) == 4

    (frame,) = dw.retrieve_instance_frames(study, series, sops[0], frame_numbers=[1])
    assert frame == by_uid[sops[0]].PixelData

    wado = httpx.get(
        f"{web.url}/wado",
        params={
            "requestType": "WADO",
            "studyUID": study,
            "seriesUID": series,
            "objectUID": sops[0],
            "contentType": "application/dicom",
        },
    )
    assert wado.status_code == 200 and wado.content == stored(web, sops[0])


def test_a_study_longer_than_a_block_comes_whole_with_each_part_exact(web):
    """The body goes out in blocks that end inside files and begin inside others:
    every part is still its stored file, framed exactly."""
    study, series = generate_uid(), generate_uid()
    sops = [generate_uid() for _ in range(3)]
    for number, sop in enumerate(sops, 1):  # 2.4 MB each
        web.receive(
            study_uid=study, series_uid=series, sop_instance_uid=sop, InstanceNumber=number,
            pixels=1100,
        )  # fmt: skip
    answer = httpx.get(
        f"{web.url}/dicomweb/studies/{study}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    assert answer.status_code == 200 and len(answer.content) > dicomweb._BLOCK
    delimiter = b"--" + answer.headers["content-type"].split("boundary=")[1].encode()
    assert answer.content.endswith(b"\r\n" + delimiter + b"--\r\n")
    parts = answer.content[: -len(delimiter) - 4].split(delimiter + b"\r\n")
    assert parts[0] == b"" and len(parts) == 1 + len(sops)
    syntax = ExplicitVRLittleEndian
    expected = {
        f"Content-Type: application/dicom; transfer-syntax={syntax}\r\n\r\n".encode()
        + stored(web, sop)
        + b"\r\n"
        for sop in sops
    }
    assert set(parts[1:]) == expected


def test_frames_of_an_encapsulated_multiframe_object(web):
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    fragments = [b"\xff\xd8frame-one\xff\xd9", b"\xff\xd8frame-two!\xff\xd9"]
    web.receive(
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        transfer_syntax=JPEGBaseline8Bit,
        NumberOfFrames=2,
        PixelData=encapsulate(fragments),
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
    )
    url = f"{web.url}/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/2,1"
    answer = httpx.get(url)
    assert answer.status_code == 200
    assert fragments[1] in answer.content and fragments[0] in answer.content
    assert answer.content.index(fragments[1]) < answer.content.index(fragments[0])
    assert httpx.get(url.replace("2,1", "3")).status_code == 404


def bytes_read(pid: int) -> int:
    """What the process has read so far, from files and sockets (rchar)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def test_a_frame_of_a_large_encapsulated_object_is_read_alone(web):
    """A viewer asks for a multi-frame cine's frames one at a time: each one is
    read from where its fragment is, not the whole object each time. Here 256
    frames of 256 KiB with an empty Basic Offset Table, as many ultrasound
    cines come."""
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    frame_size = 256 * 1024
    fragments = [b"\xff\xd8" + bytes([n]) * (frame_size - 4) + b"\xff\xd9" for n in range(256)]
    web.receive(
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        transfer_syntax=JPEGBaseline8Bit,
        NumberOfFrames=len(fragments),
        PixelData=encapsulate(fragments, has_bot=False),
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
    )
    url = f"{web.url}/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/256,3"
    before = bytes_read(web.process.pid)
    answer = httpx.get(url, timeout=60)
    read = bytes_read(web.process.pid) - before
    assert answer.status_code == 200
    assert answer.content.index(fragments[255]) < answer.content.index(fragments[2])
    assert read < 8 * 2**20, f"{read} bytes read for two frames of an object of 64 MiB"


def test_odd_stored_values_and_odd_queries_are_answered_not_a_500(web, tmp_path):
    """Found by random requests against randomly damaged stored files: a DS that
    is no number took the whole study's metadata down, a query value its key's
    VR cannot match and a bulk data request for a text attribute were 500s."""
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    path = make_instance(
        tmp_path / "odd", study_uid=study, series_uid=series, sop_instance_uid=sop,
        SliceThickness="123.456789", PatientName="Odd^Values",
    )  # fmt: skip
    path.write_bytes(path.read_bytes().replace(b"123.456789", b"12\xb8.45x789"))
    web.store(path)  # stored as sent, as over DICOM
    instance = f"{web.url}/dicomweb/studies/{study}/series/{series}/instances/{sop}"

    metadata = httpx.get(f"{instance}/metadata")
    assert metadata.status_code == 200, metadata.text
    (document,) = metadata.json()
    assert document["00080018"]["Value"] == [sop]
    assert document["00100010"]["Value"] == [{"Alphabetic": "Odd^Values"}]
    assert "00180050" not in document  # Slice Thickness, left out
    assert len(httpx.get(f"{web.url}/dicomweb/studies/{study}/metadata").json()) == 1
    left_out = [
        json.loads(line)
        for line in web.log_path.read_text().splitlines()
        if '"web.metadata_left_out"' in line
    ]
    assert [(e["sop_instance_uid"], e["tag"]) for e in left_out] == [(sop, "00180050")] * 2

    for query, named in [
        ("instances?InstanceNumber=abc", "'abc' is not an integer string (IS)"),
        (f"studies/{study}/series?SeriesNumber=1-3", "'1-3' is not an integer string (IS)"),
        ("series?StudyDate=NaN", "StudyDate: 'NaN' is not a DICOM date/time or range"),
        ("instances?InstanceNumber=99999999999999999999", "beyond any integer the index holds"),
        ("studies?offset=99999999999999999999", "offset: a number"),
        ("studies?limit=%C2%B2", "limit: a number"),  # '²' is a digit to str.isdigit
        # PostgreSQL refuses a NUL in a parameter: was a 500 there.
        ("studies?PatientID=A%00B", "PatientID: a NUL character is part of no value"),
    ]:
        answer = httpx.get(f"{web.url}/dicomweb/{query}")
        assert (answer.status_code, named in answer.text) == (400, True), (query, answer.text)

    # '²' is a digit to str.isdigit, and no number to int(): was a 500 each.
    assert httpx.get(f"{instance}/frames/%C2%B2").status_code == 400
    assert httpx.get(f"{web.url}/fhir/r4/ImagingStudy?_count=%C2%B2").status_code == 400
    nul = httpx.get(f"{web.url}/fhir/r4/ImagingStudy?_id=%00")
    assert (nul.status_code, "NUL character" in nul.text) == (400, True)
    # A UID list of empty items is no value: every study (was `IN ()` on PostgreSQL, a 500).
    listed = httpx.get(f"{web.url}/dicomweb/studies?StudyInstanceUID=%5C")
    assert listed.status_code == 200 and study in listed.text

    text = httpx.get(f"{instance}/bulkdata/00100010")
    assert (text.status_code, "not bulk data" in text.text) == (404, True), text.text
    pixels = httpx.get(f"{instance}/bulkdata/7FE00010")
    assert pixels.status_code == 200
    assert pydicom.dcmread(path).PixelData in pixels.content


def test_unknown_unavailable_and_missing_never_look_complete(web):
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    web.receive(study_uid=study, series_uid=series, sop_instance_uid=sop)
    base = f"{web.url}/dicomweb/studies"
    assert httpx.get(f"{base}/{generate_uid()}").status_code == 404
    assert httpx.get(f"{base}/..%2F..%2Fetc").status_code in (400, 404)
    traversal = {"studyUID": study, "seriesUID": series, "objectUID": "../../../etc/passwd"}
    wado = httpx.get(f"{web.url}/wado", params={"requestType": "WADO", **traversal})
    assert wado.status_code in (400, 404) and b"root:" not in wado.content
    bulk = f"{base}/{study}/series/{series}/instances/{sop}/bulkdata/..%2F..%2Fetc%2Fpasswd"
    assert httpx.get(bulk).status_code in (400, 404)
    assert httpx.get(f"{base}/{study}/series/{series}/instances/1.2.3").status_code == 404
    demanding = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.3'}
    assert httpx.get(f"{base}/{study}", headers=demanding).status_code == 406
    assert httpx.get(f"{base}/{study}", headers={"Accept": "image/png"}).status_code == 406

    stored_path = web.location.data_dir / next(
        row[0] for row in web.location.open().execute("SELECT path FROM instances")
    )
    stored_path.rename(stored_path.with_suffix(".gone"))
    missing = httpx.get(f"{base}/{study}")
    assert missing.status_code == 500
    assert "web.file_missing" in web.log_path.read_text()
    stored_path.with_suffix(".gone").rename(stored_path)

    catalog = Catalog.open(web.location)
    try:
        set_availability(catalog, "OFFLINE", study_uid=study)
        assert httpx.get(f"{base}/{study}").status_code == 404
        set_availability(catalog, "UNAVAILABLE", study_uid=study)
    finally:
        catalog.close()
    gone = httpx.get(f"{base}/{study}")
    assert gone.status_code == 410 and "UNAVAILABLE" in gone.text


def multipart(files: list[bytes], boundary: str = "stow-boundary") -> bytes:
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
        for data in files
    )
    return body + f"--{boundary}--\r\n".encode()


STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=stow-boundary'
RETRIEVE_TYPE = 'multipart/related; type="application/dicom"'


def test_stow_rs_stores_as_a_c_store_does(web, tmp_path, server_factory):
    study, series = generate_uid(), generate_uid()
    paths = [
        make_instance(tmp_path / "stow", study_uid=study, series_uid=series, InstanceNumber=n)
        for n in range(1, 4)
    ]
    datasets = [pydicom.dcmread(path) for path in paths]
    dw = client(web)
    answer = dw.store_instances(datasets)
    assert len(answer.ReferencedSOPSequence) == 3
    assert "FailedSOPSequence" not in answer
    for path in paths:  # stored as received: the dataset byte for byte
        sop = pydicom.dcmread(path).SOPInstanceUID
        assert stored(web, sop).endswith(dataset_bytes(path))
    (found,) = dw.search_for_studies(search_filters={"StudyInstanceUID": study})
    assert pydicom.Dataset.from_json(found).NumberOfStudyRelatedInstances == 3
    assert studies_json(web, "--patient-id", "PAT-1") >= {study}
    listener = server_factory(data_dir=web.location.data_dir)
    (by_c_find,), _ = findscu(
        listener.port, "STUDY", f"StudyInstanceUID={study}", "NumberOfStudyRelatedInstances"
    )
    assert by_c_find.NumberOfStudyRelatedInstances == 3
    events = [
        json.loads(line)
        for line in web.log_path.read_text().splitlines()
        if '"instance.stored"' in line
    ]
    assert len(events) == 3 and {e["origin"] for e in events} == {"stow-rs"}
    assert events[0]["peer"] == "127.0.0.1"

    # An identical resend is stored again (200); another patient in the study is refused.
    resend = httpx.post(
        f"{web.url}/dicomweb/studies",
        content=multipart([paths[0].read_bytes()]),
        headers={"Content-Type": STOW_TYPE},
    )
    assert resend.status_code == 200
    intruder = make_instance(
        tmp_path / "stow", study_uid=study, series_uid=series, PatientID="SOMEONE-ELSE"
    )
    fresh = make_instance(tmp_path / "stow", study_uid=study, series_uid=series)
    mixed = httpx.post(
        f"{web.url}/dicomweb/studies/{study}",
        content=multipart([intruder.read_bytes(), fresh.read_bytes()]),
        headers={"Content-Type": STOW_TYPE},
    )
    assert mixed.status_code == 202
    failure = mixed.json()["00081198"]["Value"][0]
    assert failure["00081197"]["Value"] == [0xC005]
    assert failure["00081155"]["Value"] == [pydicom.dcmread(intruder).SOPInstanceUID]
    refused = httpx.post(
        f"{web.url}/dicomweb/studies",
        content=multipart([intruder.read_bytes()]),
        headers={"Content-Type": STOW_TYPE},
    )
    assert refused.status_code == 409
    assert (
        web.location.open()
        .execute("SELECT number_of_instances FROM studies WHERE study_uid = ?", (study,))
        .fetchone()[0]
        == 4
    )


def test_stow_rs_answers_a_copy_kept_aside_with_the_url_of_the_one_kept(web, tmp_path):
    """keep-first: a resent UID with other bytes in another series is kept aside,
    Success as over DICOM; its RetrieveURL named the new series, and 404'd."""
    study, sop = generate_uid(), generate_uid()
    first_series, other_series = generate_uid(), generate_uid()
    first, resent = (
        make_instance(tmp_path / name, study_uid=study, series_uid=series, sop_instance_uid=sop)
        for name, series in (("first", first_series), ("resent", other_series))
    )
    urls = []
    for path in (first, resent):
        answer = httpx.post(
            f"{web.url}/dicomweb/studies",
            content=multipart([path.read_bytes()]),
            headers={"Content-Type": STOW_TYPE},
        )
        assert answer.status_code == 200, answer.text
        urls.append(answer.json()["00081199"]["Value"][0]["00081190"]["Value"][0])
    assert urls[1] == urls[0] and f"/series/{first_series}/" in urls[1]
    retrieved = httpx.get(urls[1])
    assert retrieved.status_code == 200
    assert dataset_bytes(first) in retrieved.content


def test_stow_rs_keeps_nothing_of_a_cut_or_lying_body(web, tmp_path):
    study = generate_uid()
    whole, cut = (
        make_instance(tmp_path / "stow", study_uid=study, series_uid=generate_uid(), pixels=256)
        for _ in range(2)
    )
    body = multipart([whole.read_bytes(), cut.read_bytes()])
    truncated = body[: len(body) - 4000]  # inside the second part
    answer = httpx.post(
        f"{web.url}/dicomweb/studies", content=truncated, headers={"Content-Type": STOW_TYPE}
    )
    assert answer.status_code == 400
    assert len(answer.json()["00081199"]["Value"]) == 1  # the whole part, durable
    sops = {row[0] for row in web.location.open().execute("SELECT sop_instance_uid FROM instances")}
    assert sops == {pydicom.dcmread(whole).SOPInstanceUID}
    assert not any((web.location.data_dir / ".incoming").rglob("*.tmp*"))

    other_boundary = STOW_TYPE.replace("stow-boundary", "other")
    lying = httpx.post(
        f"{web.url}/dicomweb/studies", content=body, headers={"Content-Type": other_boundary}
    )
    assert lying.status_code == 400
    not_dicom = httpx.post(
        f"{web.url}/dicomweb/studies",
        content=multipart([b"x" * 500]),
        headers={"Content-Type": STOW_TYPE},
    )
    assert not_dicom.status_code == 409
    assert not_dicom.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    # A VR no dictionary has, on the meta's SOP Class and Instance UIDs (found by
    # flipping bytes): pydicom raises as the value is read. Was a 500.
    for element in (b"\x02\x00\x02\x00UI", b"\x02\x00\x03\x00UI"):
        data = whole.read_bytes()
        at = data.index(element, 132)
        flipped = data[: at + 4] + b"XI" + data[at + 6 :]
        answer = httpx.post(
            f"{web.url}/dicomweb/studies",
            content=multipart([flipped]),
            headers={"Content-Type": STOW_TYPE},
        )
        assert answer.status_code == 409, answer.text
        assert answer.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert web.log_path.read_text().count("unreadable file meta: Unknown Value Representation") == 2
    # A group length whose VR is not UL: pydicom guesses the VRs implicit, then
    # finds them explicit, and says so in the log, not as a raw line on stderr.
    data = whole.read_bytes()
    guessed = data[:136] + b"XL" + data[138:]
    answer = httpx.post(
        f"{web.url}/dicomweb/studies",
        content=multipart([guessed]),
        headers={"Content-Type": STOW_TYPE},
    )
    assert answer.status_code in (200, 409), answer.text
    log = web.log_path.read_text()
    assert "Expected implicit VR, but found explicit VR" in log
    assert "UserWarning" not in log
    assert httpx.post(f"{web.url}/dicomweb/studies", content=b"{}").status_code == 415


def with_transfer_syntax(data: bytes, syntax: bytes) -> bytes:
    """A DICOM file's bytes with its file meta's Transfer Syntax UID (0002,0010)
    replaced by `syntax` as it is, the group length made to match."""
    start = data.index(b"\x02\x00\x10\x00UI", 132)
    length = struct.unpack("<H", data[start + 6 : start + 8])[0]
    value = syntax + b"\x00" * (len(syntax) % 2)
    element = data[start : start + 6] + struct.pack("<H", len(value)) + value
    group_length = struct.unpack("<I", data[140:144])[0] + len(value) - length
    return (
        data[:140] + struct.pack("<I", group_length) + data[144:start] + element
        + data[start + 8 + length :]
    )  # fmt: skip


def test_stow_rs_refuses_a_part_whose_transfer_syntax_is_not_a_uid(web, tmp_path):
    """Over DICOM such a syntax is never negotiated; here the client writes it.
    Stored, it went into the file and the index, and back out in WADO-RS's
    Content-Type (PS3.18 I.2.2: C122, Referenced Transfer Syntax not supported)."""
    study, series = generate_uid(), generate_uid()
    bad = [b"", "\xff\xfe".encode("latin-1"), b"1.2.840.10008.1.2.1\\1.2.840.10008.1.2",
           b"1." + b"2" * 70, b"../../etc"]  # fmt: skip
    paths = [
        make_instance(tmp_path / "stow", study_uid=study, series_uid=series)
        for _ in range(len(bad) + 1)
    ]
    parts = [with_transfer_syntax(p.read_bytes(), s) for p, s in zip(paths[:-1], bad, strict=True)]
    private = with_transfer_syntax(paths[-1].read_bytes(), b"1.2.3.4")  # a UID: as over DICOM

    answer = httpx.post(
        f"{web.url}/dicomweb/studies",
        content=multipart([*parts, private]),
        headers={"Content-Type": STOW_TYPE},
    )

    assert answer.status_code == 202, answer.text
    failed = answer.json()["00081198"]["Value"]
    assert [f["00081155"]["Value"][0] for f in failed] == [
        pydicom.dcmread(p).SOPInstanceUID for p in paths[:-1]
    ]
    assert {f["00081197"]["Value"][0] for f in failed} == {0xC122}
    rows = web.location.open().execute("SELECT sop_instance_uid, transfer_syntax FROM instances")
    assert {tuple(row) for row in rows} == {(pydicom.dcmread(paths[-1]).SOPInstanceUID, "1.2.3.4")}
    assert len(list(web.location.data_dir.glob(f"{study}/*/*.dcm"))) == 1
    assert not any((web.location.data_dir / ".incoming").rglob("*.tmp*"))
    assert web.log_path.read_text().count("is not a UID") == len(bad)
    # Its metadata (pydicom's UID.is_encapsulated raised for a private syntax: a 500).
    private_url = answer.json()["00081199"]["Value"][0]["00081190"]["Value"][0]
    metadata = httpx.get(f"{private_url}/metadata")
    assert metadata.status_code == 200, metadata.text
    assert metadata.json()[0]["7FE00010"]["vr"] == "OB"  # an unknown syntax is encapsulated


@requires_orthanc
@pytest.mark.skipif(not ORTHANC_DICOMWEB.exists(), reason="apt-get install orthanc-dicomweb")
def test_orthancs_dicomweb_client_pulls_from_us_and_stores_to_us(web, tmp_path):
    ours, series = generate_uid(), generate_uid()
    sops = [generate_uid() for _ in range(3)]
    for number, sop in enumerate(sops, 1):
        web.receive(study_uid=ours, series_uid=series, sop_instance_uid=sop, InstanceNumber=number)
    theirs = two_series_study(tmp_path / "orthanc-study", 4)
    orthanc = Orthanc(
        tmp_path / "orthanc",
        Plugins=[str(ORTHANC_DICOMWEB)],
        DicomWeb={"Enable": True, "Servers": {"us": [f"{web.url}/dicomweb/"]}},
    )
    try:
        orthanc.wait_ready()
        pulled = orthanc.request("/dicom-web/servers/us/retrieve", {"Resources": [{"Study": ours}]})
        assert pulled["ReceivedInstancesCount"] == "3"
        pulled_ids = orthanc.request("/instances")
        assert len(pulled_ids) == 3
        for orthanc_id in pulled_ids:  # Orthanc keeps what it was sent: our files, byte-exact
            sop = orthanc.request(f"/instances/{orthanc_id}/simplified-tags")["SOPInstanceUID"]
            url = f"http://127.0.0.1:{orthanc.http_port}/instances/{orthanc_id}/file"
            with urllib.request.urlopen(url, timeout=30) as file:
                assert file.read() == stored(web, sop)
        body = {"Resources": orthanc.upload(theirs), "Synchronous": True}
        pushed = orthanc.request("/dicom-web/servers/us/stow", body)
        assert pushed["InstancesCount"] == "4"
    finally:
        orthanc.stop()
    for path in theirs:
        assert stored(web, pydicom.dcmread(path).SOPInstanceUID).endswith(dataset_bytes(path))
    their_study = pydicom.dcmread(theirs[0]).StudyInstanceUID
    (found,) = client(web).search_for_studies(search_filters={"StudyInstanceUID": their_study})
    study = pydicom.Dataset.from_json(found)
    assert (study.NumberOfStudyRelatedInstances, study.NumberOfStudyRelatedSeries) == (4, 2)
    stow_events = [line for line in web.log_path.read_text().splitlines() if "stow-rs" in line]
    assert sum('"instance.stored"' in line for line in stow_events) == 4


SLOW_CLIENTS = 1000


def test_a_thousand_slow_clients_starve_neither_the_web_nor_the_listener(
    web, server_factory, tmp_path
):
    """Slow-header clients (each holding a request head open, a line at a time) do not
    keep the web from answering others, nor the listener from storing."""
    listener = server_factory(data_dir=web.location.data_dir)
    study, series = generate_uid(), generate_uid()
    paths = [make_instance(tmp_path / "sent", study_uid=study, series_uid=series) for _ in range(5)]
    slow = []
    try:
        for _ in range(SLOW_CLIENTS):
            connection = socket.create_connection(
                ("127.0.0.1", int(web.url.rpartition(":")[2])), timeout=10
            )
            connection.sendall(b"GET /fhir/r4/metadata HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            slow.append(connection)
        assert [s.status for s in send_files(listener.port, paths)] == [0] * len(paths)
        for connection in slow:  # still coming, a line at a time
            connection.sendall(b"X-Slow: 1\r\n")
        (found,) = client(web).search_for_studies(search_filters={"StudyInstanceUID": study})
        assert pydicom.Dataset.from_json(found).NumberOfStudyRelatedInstances == len(paths)
        retrieved = client(web).retrieve_study(study)
        assert {ds.SOPInstanceUID for ds in retrieved} == {
            pydicom.dcmread(path).SOPInstanceUID for path in paths
        }
        for connection in slow:  # each slow client, once its head is complete, is served
            connection.sendall(b"\r\n")
        for connection in slow:
            assert connection.recv(64).startswith(b"HTTP/1.1 200 ")
    finally:
        for connection in slow:
            connection.close()
    assert httpx.get(f"{web.url}/fhir/r4/metadata").status_code == 200


def peak_memory_mib(pid: int) -> float:
    """The process's resident set at its highest so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


LARGE_PIXELS = 256 * 2**20  # 512 frames of 512 x 512 16-bit pixels


def test_a_large_upload_and_retrieve_stay_within_bounded_memory(web, tmp_path):
    """STOW-RS streams each part to .incoming as it arrives, WADO-RS streams the
    file from disk and reads a frame alone: the web's peak memory grows by far less
    than the object."""
    study, series = generate_uid(), generate_uid()
    warm_up = make_instance(tmp_path / "stow", study_uid=study, series_uid=series)
    assert client(web).store_instances([pydicom.dcmread(warm_up)]).ReferencedSOPSequence
    client(web).retrieve_study(study)
    before = peak_memory_mib(web.process.pid)

    template = make_instance(
        tmp_path / "stow",
        study_uid=study,
        series_uid=series,
        Rows=512,
        Columns=512,
        NumberOfFrames=512,
    )
    encoded = template.read_bytes()  # Pixel Data last: 512 bytes of pixels after its length
    head = encoded[:-516] + struct.pack("<I", LARGE_PIXELS)
    chunk = bytes(range(256)) * 4096  # 1 MiB
    expected = hashlib.sha256(head[len(encoded) - len(dataset_bytes(template)) :])
    for _ in range(LARGE_PIXELS // len(chunk)):
        expected.update(chunk)

    def body():
        yield b"--stow-boundary\r\nContent-Type: application/dicom\r\n\r\n" + head
        for _ in range(LARGE_PIXELS // len(chunk)):
            yield chunk
        yield b"\r\n--stow-boundary--\r\n"

    stow = httpx.post(
        f"{web.url}/dicomweb/studies",
        content=body(),
        headers={"Content-Type": STOW_TYPE},
        timeout=300,
    )
    assert stow.status_code == 200, stow.text
    sop = pydicom.dcmread(template, stop_before_pixels=True).SOPInstanceUID
    with web.location.open() as db:
        (path,) = db.execute(
            "SELECT path FROM instances WHERE sop_instance_uid = ?", (sop,)
        ).fetchone()
    _, dataset_offset = split_dataset(web.location.data_dir / path)
    stored_hash = hashlib.sha256()
    with (web.location.data_dir / path).open("rb") as file:
        file.seek(dataset_offset)
        while block := file.read(2**20):
            stored_hash.update(block)
    assert stored_hash.hexdigest() == expected.hexdigest()  # the dataset as sent

    sent = 0
    url = f"{web.url}/dicomweb/studies/{study}/series/{series}/instances/{sop}"
    with httpx.stream("GET", url, timeout=300) as retrieved:
        assert retrieved.status_code == 200
        for block in retrieved.iter_raw():
            sent += len(block)
    assert sent > LARGE_PIXELS
    first, last = client(web).retrieve_instance_frames(study, series, sop, frame_numbers=[1, 512])
    assert (first, last) == (chunk[: 2**19], chunk[2**19 :])  # two frames per 1 MiB chunk
    metadata = client(web).retrieve_instance_metadata(study, series, sop)
    body = hashlib.sha256()
    with httpx.stream("GET", metadata["7FE00010"]["BulkDataURI"], timeout=300) as bulk:
        assert bulk.status_code == 200
        for block in bulk.iter_raw():
            body.update(block)
    boundary = bulk.headers["content-type"].split("boundary=")[1]
    whole_body = hashlib.sha256(
        f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
    )
    for _ in range(LARGE_PIXELS // len(chunk)):
        whole_body.update(chunk)
    whole_body.update(f"\r\n--{boundary}--\r\n".encode())
    assert body.hexdigest() == whole_body.hexdigest()  # the Pixel Data, as stored
    grown = peak_memory_mib(web.process.pid) - before
    assert grown < 64, f"the web's peak memory grew by {grown:.0f} MiB"


def test_a_demanded_little_endian_syntax_is_converted_and_any_other_is_406(web):
    study, native, jpeg, big = generate_uid(), generate_uid(), generate_uid(), generate_uid()
    sops = {}
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        sops[syntax] = generate_uid()
        web.receive(
            study_uid=study,
            series_uid=native,
            sop_instance_uid=sops[syntax],
            transfer_syntax=syntax,
            PatientName="Conversion^Test",
        )
    dw = client(web)
    as_stored = {ds.SOPInstanceUID: ds for ds in dw.retrieve_series(study, native)}
    url = f"{web.url}/dicomweb/studies/{study}/series/{native}"
    demanding = {"Accept": f"{RETRIEVE_TYPE}; transfer-syntax={ExplicitVRLittleEndian}"}
    answer = httpx.get(url, headers=demanding)
    assert answer.status_code == 200
    assert stored(web, sops[ExplicitVRLittleEndian]) in answer.content  # as stored
    explicit = (("application/dicom", ExplicitVRLittleEndian),)
    converted = dw.retrieve_series(study, native, media_types=explicit)
    assert len(converted) == 3
    for dataset in converted:
        assert dataset.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        original = as_stored[dataset.SOPInstanceUID]
        assert dataset.PixelData == original.PixelData
        assert dataset.PatientName == original.PatientName == "Conversion^Test"
    implicit = {"Accept": f"{RETRIEVE_TYPE}; transfer-syntax={ImplicitVRLittleEndian}"}
    assert httpx.get(url, headers=implicit).status_code == 406  # not a PS3.18 syntax

    web.receive(
        study_uid=study,
        series_uid=jpeg,
        transfer_syntax=JPEGBaseline8Bit,
        PixelData=encapsulate([b"\xff\xd8jpeg\xff\xd9"]),
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
    )
    web.receive(study_uid=study, series_uid=big, transfer_syntax=ExplicitVRBigEndian)
    for series in (jpeg, big):
        refused = httpx.get(
            f"{web.url}/dicomweb/studies/{study}/series/{series}", headers=demanding
        )
        assert refused.status_code == 406
    whole_study = httpx.get(f"{web.url}/dicomweb/studies/{study}", headers=demanding)
    assert whole_study.status_code == 406  # never a study with some of its instances left out
    jpeg_as_stored = {"Accept": f"{RETRIEVE_TYPE}; transfer-syntax={JPEGBaseline8Bit}"}
    assert httpx.get(f"{url[: -len(native)]}{jpeg}", headers=jpeg_as_stored).status_code == 200
