"""The web's doors under random input, as the DICOM listener's are in
test_hostile: STOW-RS parts made of random datasets behind random (and
damaged) file metas, and random QIDO-RS, FHIR search, WADO-RS and WADO-URI
requests over an index holding such odd stored files. Every answer is one a
client can act on, never a 500; what is stored is stored as sent, and served."""

import struct
import urllib.parse

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import both_indexes
from tests.test_hostile import encode, random_instances
from tests.test_web import start_web

pytestmark = both_indexes

STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=hostile'


@pytest.fixture(scope="module")
def hostile_web(tmp_path_factory, index_backend):
    web = start_web(tmp_path_factory.mktemp("hostile-web"))
    yield web
    web.process.terminate()
    web.process.wait(10)


def part10(dataset: bytes, syntax: str, sop_class: str, sop_instance: str) -> bytes:
    """A DICOM file around `dataset`: preamble, DICM and a file meta group."""

    def uid(value: str) -> tuple[str, bytes]:
        data = value.encode()
        return "UI", data + b"\0" * (len(data) % 2)

    group, _ = encode({
        0x00020001: ("OB", b"\0\1"), 0x00020002: uid(sop_class), 0x00020003: uid(sop_instance),
        0x00020010: uid(syntax), 0x00020012: uid("1.2.3.4"),
    })  # fmt: skip
    length, _ = encode({0x00020000: ("UL", struct.pack("<I", len(group)))})
    return b"\0" * 128 + b"DICM" + length + group + dataset


def stow(web, part: bytes) -> httpx.Response:
    body = b"--hostile\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n--hostile--\r\n"
    return httpx.post(
        f"{web.url}/dicomweb/studies", content=body, headers={"Content-Type": STOW_TYPE}, timeout=30
    )


def stored_paths(web, sop_instance_uid: str) -> list[str]:
    """Paths the index holds for a SOP Instance UID (stored, or kept aside; a
    refusal recorded in `conflicts` has none)."""
    index = web.location.open()
    return [
        row[0]
        for table in ("instances", "conflicts")
        for row in index.execute(
            f"SELECT path FROM {table} WHERE sop_instance_uid = ? AND path IS NOT NULL",
            (sop_instance_uid,),
        )
    ]


_META_FLIPS = st.lists(st.tuples(st.integers(0, 2**16), st.integers(1, 255)), max_size=3)


@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=random_instances(), flips=_META_FLIPS)
def test_random_stow_rs_parts_are_stored_as_sent_or_refused(hostile_web, case, flips):
    dataset, _, syntax, (sop_class, sop_instance), _ = case
    file = bytearray(part10(dataset, syntax, sop_class, sop_instance))
    meta_end = len(file) - len(dataset)
    for at, xor in flips:  # damage inside the file meta group, DICM included
        file[128 + at % (meta_end - 128)] ^= xor

    answer = stow(hostile_web, bytes(file))

    assert answer.status_code in (200, 409), answer.text
    if answer.status_code == 409:
        reason = answer.json()["00081198"]["Value"][0]["00081197"]["Value"][0]
        assert reason in {0xA700, 0xA900, 0xC000, 0xC001, 0xC002, 0xC003, 0xC004, 0xC005, 0xC122}
        return
    (referenced,) = answer.json()["00081199"]["Value"]
    paths = stored_paths(hostile_web, referenced["00081155"]["Value"][0])
    assert any((hostile_web.location.data_dir / p).read_bytes().endswith(dataset) for p in paths)
    # Served back, whatever it holds: the instance as stored, and its metadata.
    url = referenced["00081190"]["Value"][0]
    for served in (httpx.get(url, timeout=30), httpx.get(f"{url}/metadata", timeout=30)):
        assert served.status_code == 200, served.text


_ODD = st.one_of(
    st.sampled_from(["", "*", "?", "\\", "%", "\x00", "é", "../..", "1" * 70, "-1", "1e400",
                     "NaN", "a,b", "20261301", "gt2026", "19970101-", "1-3", "urn:dicom:uid|1.2",
                     "|", "DCM|CT", "-started", "all", "00100010", "7FE00010", "ffffffff", "²"]),
    st.text(max_size=16),
)  # fmt: skip
_FHIR_PARAMETERS = ["_id", "identifier", "patient:identifier", "subject:identifier", "started",
                    "modality", "series", "status", "_lastUpdated", "_sort", "_count",
                    "_summary", "_elements", "_page", "unknown"]  # fmt: skip
_QIDO_PARAMETERS = ["PatientID", "PatientName", "StudyDate", "StudyTime", "ModalitiesInStudy",
                    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "00100020",
                    "includefield", "limit", "offset", "fuzzymatching", "Modality",
                    "SeriesNumber", "InstanceNumber", "00200013", "unknown"]  # fmt: skip


@st.composite
def random_requests(draw) -> str:
    """A path and query over the web's routes, with odd parameters and UIDs."""
    uids = [draw(st.one_of(st.just("1.2.3"), _ODD)) for _ in range(3)]
    study, series, instance = (urllib.parse.quote(u, safe="") or "x" for u in uids)

    def query(names):
        pairs = draw(st.lists(st.tuples(st.sampled_from(names), _ODD), max_size=4))
        return urllib.parse.urlencode(pairs)

    return draw(st.sampled_from([
        f"/fhir/r4/ImagingStudy?{query(_FHIR_PARAMETERS)}",
        f"/fhir/r5/ImagingStudy?{query(_FHIR_PARAMETERS)}",
        f"/fhir/r4/ImagingStudy/{study}",
        f"/dicomweb/studies?{query(_QIDO_PARAMETERS)}",
        f"/dicomweb/series?{query(_QIDO_PARAMETERS)}",
        f"/dicomweb/instances?{query(_QIDO_PARAMETERS)}",
        f"/dicomweb/studies/{study}/series/{series}/instances?{query(_QIDO_PARAMETERS)}",
        f"/dicomweb/studies/{study}/series/{series}/instances/{instance}/frames/{series}",
        f"/dicomweb/studies/{study}/series/{series}/instances/{instance}/bulkdata/{series}",
        f"/dicomweb/studies/{study}/series/{series}/metadata",
        f"/wado?requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={instance}",
    ]))  # fmt: skip


@settings(max_examples=300, deadline=None, database=None)
@given(path=random_requests())
def test_random_requests_are_answered_without_a_server_error(hostile_web, path):
    answer = httpx.get(hostile_web.url + path, timeout=30)
    assert answer.status_code < 500, (path, answer.text)
