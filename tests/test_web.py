"""`imaging-scp web`: FHIR REST over the index, read by clients written elsewhere
(fhirpy, fhirclient's R4 release, httpx) and validated with fhir.resources."""

import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fhir.resources.bundle import Bundle as R5Bundle
from fhir.resources.capabilitystatement import CapabilityStatement as R5Capability
from fhir.resources.imagingstudy import ImagingStudy as R5ImagingStudy
from fhir.resources.R4B.bundle import Bundle as R4Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement as R4Capability
from fhir.resources.R4B.imagingstudy import ImagingStudy as R4ImagingStudy
from fhirpy import SyncFHIRClient
from pydicom.uid import generate_uid

from scp.config import ConfigError, load_config
from storage.catalog import Catalog, Provenance
from storage.catalog.engines import IndexLocation
from storage.catalog.series import set_availability
from storage.files import prepare_data_dir
from storage.store import DuplicatePolicy, InstanceStore
from tests.conftest import (
    IMAGING_SCP,
    both_indexes,
    free_port,
    index_url_for,
    make_instance,
    receive_file,
)
from tests.test_tls import pki  # noqa: F401 (the test CA and its certificates)

pytestmark = both_indexes

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-token-for-the-ris"


@dataclass
class Web:
    url: str
    location: IndexLocation
    process: subprocess.Popen
    log_path: Path
    sources: Path

    def fhir(self, version: str = "r4") -> str:
        return f"{self.url}/fhir/{version}"

    def receive(self, **attributes) -> str:
        """Store one made instance as a C-STORE does; its study UID."""
        attributes.setdefault("study_uid", generate_uid())
        attributes.setdefault("series_uid", generate_uid())
        self.store(make_instance(self.sources, **attributes))
        return attributes["study_uid"]

    def store(self, path: Path) -> None:
        """Store a DICOM file's dataset as a C-STORE does."""
        catalog = Catalog.open(self.location)
        try:
            store = InstanceStore(
                self.location.data_dir, catalog, DuplicatePolicy.KEEP_FIRST, node="test"
            )
            receive_file(store, path, Provenance("TEST"))
        finally:
            catalog.close()


def start_web(tmp_path: Path, *flags: str) -> Web:
    data_dir = tmp_path / "data"
    if not data_dir.exists():
        prepare_data_dir(data_dir, "test")
    location = IndexLocation(data_dir, index_url_for(data_dir))
    Catalog.open(location).close()  # the index exists before the listener's first C-STORE
    port = free_port()
    log_path = tmp_path / f"web-{port}.log"
    index = ["--index-url", location.url] if location.url else []
    process = subprocess.Popen(
        [
            IMAGING_SCP,
            "web",
            "--web-port",
            str(port),
            "--data-dir",
            str(data_dir),
            *index,
            *flags,
        ],
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return Web(f"http://127.0.0.1:{port}", location, process, log_path, tmp_path / "sources")


def running_web(tmp_path):
    """`imaging-scp web` on an empty index, for the test's duration."""
    server = start_web(tmp_path)
    yield server
    server.process.terminate()
    server.process.wait(10)


web = pytest.fixture(running_web, name="web")


def cli_fhir(web: Web, study_uid: str, version: str) -> dict:
    """`imaging-scp fhir` with the web service's config."""
    index = ["--index-url", web.location.url] if web.location.url else []
    config = web.sources.parent / "config.toml"
    config.write_text(f"web_port = {web.url.rpartition(':')[2]}\n")
    command = [IMAGING_SCP, "fhir", study_uid, "--version", version, "--config", str(config)]
    command += ["--data-dir", str(web.location.data_dir), *index]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output)


def test_read_gives_what_the_cli_renders_with_a_version(web):
    study = web.receive(Modality="MR", modality="MR", AccessionNumber="ACC-9")
    web.receive(study_uid=study, modality="MR")
    for version, model in (("r4", R4ImagingStudy), ("r5", R5ImagingStudy)):
        answer = httpx.get(f"{web.fhir(version)}/ImagingStudy/{study}")
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("application/fhir+json")
        resource = answer.json()
        model.model_validate(resource)
        meta = resource.pop("meta")
        assert resource == cli_fhir(web, study, version)
        assert resource["contained"][0]["address"] == f"{web.url}/dicomweb"
        assert answer.headers["etag"] == f'W/"{meta["versionId"]}"'
        assert meta["lastUpdated"].endswith("Z")

    # 304 while nothing changed; a new instance is a new version.
    etag = httpx.get(f"{web.fhir()}/ImagingStudy/{study}").headers["etag"]
    cached = httpx.get(f"{web.fhir()}/ImagingStudy/{study}", headers={"If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b""
    web.receive(study_uid=study, modality="MR")
    changed = httpx.get(f"{web.fhir()}/ImagingStudy/{study}", headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.headers["etag"] != etag
    assert changed.json()["numberOfInstances"] == 3


def test_a_poller_by_last_updated_sees_an_availability_change(web):
    """An EHR integration polls `_lastUpdated=gt<the lastUpdated it last saw>`:
    a study an admin made NEARLINE since is a new version with a later
    lastUpdated, and that search finds it again, to the millisecond."""
    other = web.receive()
    study = web.receive()
    url = f"{web.fhir()}/ImagingStudy/{study}"
    seen = httpx.get(url).json()["meta"]
    time.sleep(0.005)
    catalog = Catalog.open(web.location)
    try:
        set_availability(catalog, "NEARLINE", study_uid=study)
    finally:
        catalog.close()
    changed = httpx.get(url).json()["meta"]
    assert changed["versionId"] != seen["versionId"]
    assert changed["lastUpdated"] > seen["lastUpdated"]

    def found(last_updated: str) -> set[str]:
        bundle = httpx.get(
            f"{web.fhir()}/ImagingStudy", params={"_lastUpdated": last_updated}
        ).json()
        return {e["resource"]["id"] for e in bundle.get("entry", [])} - {None}

    assert found(f"gt{seen['lastUpdated']}") == {study}
    assert found(f"lt{changed['lastUpdated']}") == {other}
    assert found(f"ge{changed['lastUpdated']}") == {study}


def test_errors_are_operation_outcomes_and_writes_are_refused(web):
    study = web.receive()
    unknown = httpx.get(f"{web.fhir()}/ImagingStudy/1.2.3.4")
    assert unknown.status_code == 404
    assert unknown.json()["resourceType"] == "OperationOutcome"
    assert httpx.get(f"{web.fhir()}/ImagingStudy/..%2F..%2Fetc%2Fpasswd").status_code == 404
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        answer = httpx.request(method, f"{web.fhir()}/ImagingStudy/{study}", json={})
        assert answer.status_code == 405, method
        assert answer.json()["resourceType"] == "OperationOutcome"
    assert httpx.post(f"{web.fhir()}/ImagingStudy", json={}).status_code == 405
    xml = httpx.get(f"{web.fhir()}/ImagingStudy/{study}", headers={"Accept": "application/xml"})
    assert xml.status_code == 406
    assert httpx.get(f"{web.fhir()}/ImagingStudy?_format=xml").status_code == 406
    for bad in ("started=2026-13", "started=sa2026", "_count=5000", "_sort=name", "_page=x"):
        answer = httpx.get(f"{web.fhir()}/ImagingStudy?{bad}")
        assert answer.status_code == 400, bad
        assert answer.json()["issue"][0]["severity"] == "error"
    assert httpx.get(f"{web.fhir('r3')}/ImagingStudy/{study}").status_code == 404
    assert httpx.get(f"{web.fhir()}/Patient/x").status_code == 404

    # Unknown parameters: listed (lenient), or 400 when the client asks for strict handling.
    lenient = httpx.get(f"{web.fhir()}/ImagingStudy?_id={study}&colour=red").json()
    R4Bundle.model_validate(lenient)
    R5Bundle.model_validate(httpx.get(f"{web.fhir('r5')}/ImagingStudy?_id={study}").json())
    assert lenient["total"] == 1
    outcome = [e for e in lenient["entry"] if e["search"]["mode"] == "outcome"]
    assert "colour" in outcome[0]["resource"]["issue"][0]["diagnostics"]
    strict = httpx.get(
        f"{web.fhir()}/ImagingStudy?_id={study}&colour=red",
        headers={"Prefer": "handling=strict"},
    )
    assert strict.status_code == 400


def test_oversized_headers_are_refused_and_the_service_goes_on(web):
    try:  # a head larger than the server buffers: refused, or the connection closed
        answer = httpx.get(f"{web.fhir()}/metadata", headers={"X-Big": "a" * 1024 * 1024})
        assert answer.status_code in (400, 431)
    except httpx.TransportError:
        pass
    assert httpx.get(f"{web.fhir()}/metadata").status_code == 200


def test_capability_statement_says_what_is_served(web):
    for version, model in (("r4", R4Capability), ("r5", R5Capability)):
        statement = httpx.get(f"{web.fhir(version)}/metadata").json()
        model.model_validate(statement)
        (resource,) = statement["rest"][0]["resource"]
        assert resource["type"] == "ImagingStudy"
        assert {i["code"] for i in resource["interaction"]} == {"read", "search-type"}
    assert statement["fhirVersion"] == "5.0.0"


def test_fhirpy_searches_by_patient_date_and_modality(web):
    mine = [
        web.receive(PatientID="P-7", StudyDate="20240105", modality="CT"),
        web.receive(PatientID="P-7", StudyDate="20240620", modality="MR"),
        web.receive(PatientID="P-7", StudyDate="20250101", modality="CT"),
    ]
    web.receive(PatientID="P-8", StudyDate="20240105", modality="CT")
    client = SyncFHIRClient(web.fhir())

    def found(**params):
        studies = client.resources("ImagingStudy").search(**params).fetch_all()
        for study in studies:
            R4ImagingStudy.model_validate(study.serialize())
        return {study["id"] for study in studies}

    assert found(**{"patient:identifier": "P-7"}) == set(mine)
    assert found(**{"subject:identifier": "P-7"}) == set(mine)
    assert found(**{"patient:identifier": "P-7", "started": ["ge2024-01", "lt2024-07"]}) == set(
        mine[:2]
    )
    assert found(**{"patient:identifier": "P-7", "started": "2024"}) == set(mine[:2])
    assert found(**{"patient:identifier": "P-7", "started": "gt2024-06-20"}) == {mine[2]}
    assert found(**{"patient:identifier": "P-7", "modality": "CT"}) == {mine[0], mine[2]}
    dicom_ct = "http://dicom.nema.org/resources/ontology/DCM|CT"
    assert found(**{"patient:identifier": "P-7", "modality": dicom_ct}) == {mine[0], mine[2]}
    assert found(identifier=f"urn:dicom:uid|urn:oid:{mine[1]}") == {mine[1]}
    assert found(_id=f"{mine[0]},{mine[2]}") == {mine[0], mine[2]}
    assert found(status="available", **{"patient:identifier": "P-7"}) == set(mine)
    assert found(status="registered") == set()
    assert found(_lastUpdated="ge2000-01-01", **{"patient:identifier": "P-7"}) == set(mine)
    assert found(_lastUpdated="lt2000-01-01") == set()

    read = client.reference("ImagingStudy", mine[0]).to_resource()
    assert read["subject"]["identifier"]["value"] == "P-7"
    count = httpx.get(f"{web.fhir()}/ImagingStudy?patient:identifier=P-7&_summary=count").json()
    assert count == {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 3,
        "link": count["link"],
    }
    subset = httpx.get(f"{web.fhir()}/ImagingStudy?_id={mine[0]}&_elements=modality").json()
    assert set(subset["entry"][0]["resource"]) == {
        "resourceType",
        "id",
        "meta",
        "status",
        "subject",
        "modality",
    }


# fhirclient's R4 release, which `make test` installs into a directory of its own: it has the
# import name of the DSTU2 release the venv pins for tests/test_fhir.py, so it runs in a
# process of its own with that directory first on its path.
FHIRCLIENT_R4 = Path(sys.prefix) / "fhirclient-r4"
FHIRCLIENT_R4_CLIENT = """
import json, sys
import fhirclient
from fhirclient import client
from fhirclient.models.imagingstudy import ImagingStudy

base, searches, study = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
server = client.FHIRClient(settings={"app_id": "imaging-scp-test", "api_base": base}).server
found = [
    sorted(resource.id for resource in ImagingStudy.where(search).perform_resources(server))
    for search in searches
]
read = ImagingStudy.read(study, server)
print(json.dumps({"version": fhirclient.__version__, "found": found, "read": read.as_json()}))
"""


def test_fhirclient_r4_searches_and_reads_by_patient_date_and_modality(web):
    assert FHIRCLIENT_R4.is_dir(), f"no {FHIRCLIENT_R4}: `make test` installs fhirclient's R4 there"
    mine = [
        web.receive(PatientID="P-9", StudyDate="20240105", modality="CT"),
        web.receive(PatientID="P-9", StudyDate="20240620", modality="MR"),
        web.receive(PatientID="P-9", StudyDate="20250101", modality="CT"),
    ]
    web.receive(PatientID="P-10", StudyDate="20240105", modality="CT")
    searches = {
        "patient": ({"patient:identifier": "P-9"}, mine),
        "subject, paged by 2": ({"subject:identifier": "P-9", "_count": "2"}, mine),
        "date range": (
            {"patient:identifier": "P-9", "started": {"$and": ["ge2024-01", "lt2024-07"]}},
            mine[:2],
        ),
        "modality": ({"patient:identifier": "P-9", "modality": "CT"}, [mine[0], mine[2]]),
        "all three": (
            {"patient:identifier": "P-9", "started": "2024", "modality": "MR"},
            [mine[1]],
        ),
    }
    answer = subprocess.run(
        [sys.executable, "-c", FHIRCLIENT_R4_CLIENT, web.fhir("r4"),
         json.dumps([search for search, _ in searches.values()]), mine[0]],
        env=dict(os.environ, PYTHONPATH=str(FHIRCLIENT_R4)),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(answer.stdout)
    assert result["version"].startswith("4."), result["version"]  # the R4 release, not DSTU2
    for name, found in zip(searches, result["found"], strict=True):
        assert found == sorted(searches[name][1]), name
    assert result["read"] == httpx.get(f"{web.fhir()}/ImagingStudy/{mine[0]}").json()


def test_paging_loses_and_repeats_none_while_studies_arrive(web):
    before = {web.receive(StudyDate=f"2026{1 + n % 12:02}{1 + n % 28:02}") for n in range(250)}
    for sort in ("", "&_sort=-started", "&_sort=_lastUpdated"):
        url = f"{web.fhir()}/ImagingStudy?_count=50&_elements=id{sort}"
        seen, pages, arrived = [], 0, set()
        while url:
            bundle = httpx.get(url).json()
            R4Bundle.model_validate(bundle)
            seen += [entry["resource"]["id"] for entry in bundle.get("entry", [])]
            pages += 1
            if len(arrived) < 50:  # 10 new studies between two pages
                arrived |= {web.receive() for _ in range(10)}
            url = next((li["url"] for li in bundle["link"] if li["relation"] == "next"), None)
        assert len(seen) == len(set(seen))
        assert before <= set(seen)
        assert set(seen) <= before | arrived
        before |= arrived
    # previous goes back to the very page before.
    first = httpx.get(f"{web.fhir()}/ImagingStudy?_count=20").json()
    second = httpx.get(next(li["url"] for li in first["link"] if li["relation"] == "next")).json()
    back = httpx.get(next(li["url"] for li in second["link"] if li["relation"] == "previous"))
    assert [e["fullUrl"] for e in back.json()["entry"]] == [e["fullUrl"] for e in first["entry"]]
    assert first["entry"][0]["fullUrl"].startswith(f"{web.fhir()}/ImagingStudy/")


def test_tokens_are_required_and_reloaded_on_sighup(tmp_path):
    tokens = tmp_path / "web-tokens"
    tokens.write_text(f"# token names\n{hashlib.sha256(TOKEN.encode()).hexdigest()}  ris-1\n")
    web = start_web(tmp_path, "--web-tokens", str(tokens))
    try:
        study = web.receive()
        url = f"{web.fhir()}/ImagingStudy/{study}"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            refused = httpx.get(url, headers=headers)
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"].startswith("Bearer")
            assert study not in refused.text
        assert httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        for path in (f"/dicomweb/studies/{study}", "/dicomweb/studies", "/wado"):
            assert httpx.get(web.url + path).status_code == 401
        assert httpx.post(web.url + "/dicomweb/studies", content=b"x").status_code == 401
        # A load balancer has no token: /health says whether the index answers, no more.
        health = httpx.get(web.url + "/health")
        assert (health.status_code, health.json()) == (200, {"index": "available"})
        sent = make_instance(web.sources, study_uid=generate_uid(), series_uid=generate_uid())
        stow = httpx.post(
            web.url + "/dicomweb/studies",
            content=b"--b\r\nContent-Type: application/dicom\r\n\r\n"
            + sent.read_bytes()
            + b"\r\n--b--\r\n",
            headers={
                "Authorization": f"Bearer {TOKEN}",
                "Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
            },
        )
        assert stow.status_code == 200
        (stored,) = [
            json.loads(line)
            for line in web.log_path.read_text().splitlines()
            if '"instance.stored"' in line
        ]
        assert (stored["origin"], stored["token"]) == ("stow-rs", "ris-1")  # the token's name

        other = "another-token"
        tokens.write_text(f"{hashlib.sha256(other.encode()).hexdigest()} pacs\n")
        web.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while httpx.get(url, headers={"Authorization": f"Bearer {other}"}).status_code != 200:
            assert time.monotonic() < deadline, web.log_path.read_text()
            time.sleep(0.1)
        assert httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 401
        assert "web.unauthorized" in web.log_path.read_text()
    finally:
        web.process.terminate()
        web.process.wait(10)


def test_https_with_the_configured_certificate(tmp_path, pki):  # noqa: F811 (the fixture)
    web = start_web(
        tmp_path,
        "--web-tls-certificate",
        str(pki.server_cert),
        "--web-tls-private-key",
        str(pki.server_key),
    )
    try:
        study = web.receive()
        https = web.url.replace("http://", "https://")
        trusting = ssl.create_default_context(cafile=str(pki.ca))
        answer = httpx.get(f"{https}/fhir/r4/ImagingStudy/{study}", verify=trusting)
        assert answer.status_code == 200
        assert answer.json()["contained"][0]["address"] == f"{https}/dicomweb"
        with pytest.raises(httpx.ConnectError):  # a certificate nobody vouched for
            httpx.get(f"{https}/fhir/r4/metadata")
        with pytest.raises(httpx.TransportError):  # no plain HTTP beside it
            httpx.get(f"{web.url}/fhir/r4/ImagingStudy/{study}")
    finally:
        web.process.terminate()
        web.process.wait(10)


def test_config_asks_for_tokens_off_loopback_and_renders_the_web_endpoint(tmp_path):
    with pytest.raises(ConfigError, match="web_tokens"):
        load_config(web_host="0.0.0.0")
    assert load_config(web_host="::1").wado_url == "http://[::1]:8080/dicomweb"
    assert load_config().wado_url == ""  # no web key: no endpoint, as before
    assert load_config(web_port=8443).wado_url == "http://127.0.0.1:8443/dicomweb"
    web = load_config(web_base_url="https://pacs.example/", wado_base_url="")
    assert web.wado_url == "https://pacs.example/dicomweb"
    assert load_config(web_port=9000, wado_base_url="https://x/wado").wado_url == "https://x/wado"

    web_server = start_web(tmp_path)
    web_server.process.terminate()
    study = web_server.receive()
    config = tmp_path / "config.toml"
    config.write_text('web_base_url = "https://pacs.example"\n')
    index = ["--index-url", web_server.location.url] if web_server.location.url else []
    output = subprocess.run(
        [
            IMAGING_SCP,
            "fhir",
            study,
            "--config",
            str(config),
            "--data-dir",
            str(web_server.location.data_dir),
            *index,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(output)["contained"][0]["address"] == "https://pacs.example/dicomweb"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_web_unit_is_hardened_like_the_listener():
    unit = ROOT / "systemd" / "imaging-scp-web.service"
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_COLORS": "0"},
    )
    exposure = float(result.stdout.split("Overall exposure level for")[1].split()[1])
    assert exposure <= 2.0, result.stdout
