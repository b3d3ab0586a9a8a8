"""Shared test harness: a real `imaging-scp serve` process, real senders, real files."""

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset

from storage.catalog import Provenance
from storage.catalog.engines import Database, IndexLocation
from storage.store import InstanceStore

# Send files' dataset bytes exactly as they are on disk (no decode/re-encode), so
# a byte-for-byte comparison of what the server stored is meaningful.
_config.STORE_SEND_CHUNKED_DATASET = True

BIN = Path(sys.executable).parent
IMAGING_SCP = str(BIN / "imaging-scp")
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    """An `imaging-scp serve` subprocess on a free loopback port."""

    data_dir: Path
    port: int
    process: subprocess.Popen
    log_path: Path
    exit_code: int | None = field(default=None)
    index_url: str = ""

    def events(self, name: str | None = None) -> list[dict]:
        """The server's JSON log events so far (optionally only those named `name`)."""
        events = []
        for line in self.log_path.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if name is None or event.get("event") == name:
                events.append(event)
        return events

    def wait_for_event(self, name: str, count: int = 1, timeout: float = 10) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no {count} '{name}' events within {timeout}s: {self.events()}")

    @property
    def index_flags(self) -> list[str]:
        """What an admin command needs to read this server's index."""
        return [
            "--data-dir",
            str(self.data_dir),
            *(["--index-url", self.index_url] if self.index_url else []),
        ]

    def index(self) -> Database:
        """A connection to the server's index (SQLite or PostgreSQL): `?`
        placeholders, rows by position or by column name."""
        return IndexLocation(self.data_dir, self.index_url).open()

    def indexed_paths(self) -> set[str]:
        """The file path of every instance the index holds."""
        return {row[0] for row in self.index().execute("SELECT path FROM instances")}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.exit_code = self.process.wait(timeout)
        return self.exit_code


def start_server(
    data_dir: Path,
    *flags: str,
    env: dict | None = None,
    launcher: tuple[str, ...] = (),
    index_url: str | None = None,
) -> Server:
    """`imaging-scp serve` on a free port, run through `launcher` when given (a
    command that ends by exec-ing its arguments). `index_url`: default
    `index_url_for(data_dir)`."""
    if index_url is None:
        index_url = index_url_for(data_dir)
    if index_url:
        INDEX_URLS[Path(data_dir)] = index_url
        flags = ("--index-url", index_url, *flags)
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"serve-{port}.log"
    process = subprocess.Popen(
        [
            *launcher,
            IMAGING_SCP,
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            *flags,
        ],
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    server = Server(data_dir, port, process, log_path, index_url=index_url)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}: {log_path.read_text()}")
        if server.events("listening"):
            return server
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"server did not start: {log_path.read_text()}")


# Runs its arguments (a command) with the lowest `argv[1]` descriptors taken, as
# a busy listener (many connections, spool files) has them.
_HOLD_DESCRIPTORS = """
import os, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
for _ in range(int(sys.argv[1])):
    os.set_inheritable(os.open(os.devnull, os.O_RDONLY), True)
os.execv(sys.argv[2], sys.argv[2:])
"""


def holding_descriptors(count: int = 1100) -> tuple[str, ...]:
    """A `start_server` launcher under which the server's own sockets and files
    get descriptors above `count` (skips the test where the limit is too low)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < count + 200:
        pytest.skip(f"the descriptor limit ({hard}) is too low to hold {count}")
    return (sys.executable, "-c", _HOLD_DESCRIPTORS, str(count))


# --- the index backends --------------------------------------------------------
# A module with `pytestmark = both_indexes` runs every test twice: with the
# SQLite index, and with PostgreSQL (a database of its own per data dir, in a
# private cluster the tests start). `start_server` follows the module's backend.

INDEX_URLS: dict[Path, str] = {}  # data dir -> the index_url its server was given
_BACKEND: dict = {"name": "sqlite", "cluster": None}
both_indexes = pytest.mark.usefixtures("index_backend")


def pytest_generate_tests(metafunc):
    marks = getattr(metafunc.module, "pytestmark", [])
    if both_indexes in (marks if isinstance(marks, list) else [marks]):
        metafunc.parametrize("index_backend", ["sqlite", "postgresql"], indirect=True,
                             scope="module")  # fmt: skip


@pytest.fixture(scope="module")
def index_backend(request):
    backend = getattr(request, "param", "sqlite")
    cluster = request.getfixturevalue("postgres_cluster") if backend == "postgresql" else None
    _BACKEND.update(name=backend, cluster=cluster)
    yield backend
    _BACKEND.update(name="sqlite", cluster=None)


@pytest.fixture(scope="session")
def postgres_cluster():
    from tests.postgres import Cluster, find_binaries

    binaries = find_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL not installed (apt-get install postgresql)")
    cluster = Cluster.start(binaries)
    yield cluster
    cluster.stop()


def index_url_for(data_dir: Path) -> str:
    """The index_url of a data dir: the one its server had, else a new database
    when the module runs on PostgreSQL, else "" (SQLite)."""
    data_dir = Path(data_dir)
    if data_dir not in INDEX_URLS and _BACKEND["cluster"] is not None:
        INDEX_URLS[data_dir] = _BACKEND["cluster"].new_database()
    return INDEX_URLS.get(data_dir, "")


@pytest.fixture
def server_factory(tmp_path, index_backend):
    """Start servers with given flags; every one is stopped at the end of the test."""
    servers = []

    def start(
        *flags: str,
        data_dir: Path | None = None,
        env: dict | None = None,
        launcher: tuple[str, ...] = (),
    ) -> Server:
        data_dir = data_dir or tmp_path / f"data{len(servers)}"
        server = start_server(data_dir, *flags, env=env, launcher=launcher)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


@pytest.fixture
def server(server_factory) -> Server:
    return server_factory()


@dataclass
class StoreStatus:
    status: int
    comment: str | None


def send_files(
    port: int, paths: list[Path], *, calling: str = "TESTSCU", called: str = "IMAGING_SCP"
) -> list[StoreStatus]:
    """Send files over one association, each in its own transfer syntax, their
    dataset bytes as on disk. Returns one status per file.

    Spoken by hand (tests.test_hostile.RawAssociation), not by pynetdicom's
    requestor: its reactor thread can take a response that comes back within
    microseconds (a refusal) for a request of the peer's and drop it, and the
    send then times out (pynetdicom#435, #875) — nothing the receiver did.
    pynetdicom as a sender is tested in test_interop and test_commitment."""
    from tests.test_hostile import RawAssociation

    contexts: dict[tuple[str, str], int] = {}
    metas = []
    for path in paths:
        meta, _ = split_dataset(path)
        metas.append(meta)
        contexts.setdefault((meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID), 0)
    assert len(contexts) <= 128, "one association carries at most 128 presentation contexts"
    for number, key in enumerate(sorted(contexts)):
        contexts[key] = 2 * number + 1
    proposed = [(cid, sop_class, [syntax]) for (sop_class, syntax), cid in contexts.items()]
    assoc = RawAssociation(port, proposed, calling=calling, called=called)
    statuses = []
    try:
        for path, meta in zip(paths, metas, strict=True):
            context_id = contexts[meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID]
            assert context_id in assoc.accepted, f"context for {path.name} not accepted"
            response = assoc.store(
                context_id,
                meta.MediaStorageSOPClassUID,
                meta.MediaStorageSOPInstanceUID,
                dataset_bytes(path),
            )
            statuses.append(StoreStatus(response.status, response.comment))
    finally:
        assoc.release()
    return statuses


def ct_association(port: int):
    """An association proposing CT Image Storage (explicit VR LE) and Verification."""
    ae = AE("TESTSCU")
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    ae.add_requested_context(VERIFICATION)
    return ae.associate("127.0.0.1", port, ae_title="IMAGING_SCP")


def association_rejection(
    port: int, *, calling: str = "TESTSCU", called: str = "IMAGING_SCP"
) -> tuple[int, int, int] | None:
    """(result, source, diagnostic) of the A-ASSOCIATE-RJ a CT Image Storage
    request gets, or None when it is accepted. Spoken by hand: pynetdicom's
    requestor sometimes reports a fast A-ASSOCIATE-RJ as an abort (its DUL and
    ACSE threads race), which is nothing the receiver did."""
    from tests.test_hostile import EXPLICIT_LE, AssociationRefused, RawAssociation

    try:
        RawAssociation(port, [(1, CT_IMAGE_STORAGE, [EXPLICIT_LE])], calling=calling,
                       called=called).close()  # fmt: skip
    except AssociationRefused as refused:
        assert refused.pdu_type == 0x03, f"not an A-ASSOCIATE-RJ: {refused}"
        return refused.payload[1], refused.payload[2], refused.payload[3]
    return None


def assert_refused_below_the_floor(server: Server, open_assoc, source: Path) -> None:
    """With the disk below the free-space floor: the open association's C-STORE
    is answered 0xA700 with the reason, and a new association is rejected as
    transient (the sender may retry), with a log event saying why."""
    response = open_assoc.send_c_store(source)
    assert response.Status == 0xA700
    assert "free-space floor" in response.ErrorComment
    open_assoc.release()
    rejection = association_rejection(server.port)
    assert rejection is not None
    assert rejection[0] == 0x02  # transient: try again later
    assert "free-space floor" in server.wait_for_event("association.rejected")[0]["reason"]


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a DICOM file: everything after its file meta group."""
    _, offset = split_dataset(path)
    return Path(path).read_bytes()[offset:]


def receive_file(store: InstanceStore, path: Path, provenance: Provenance | None = None):
    """The StoreResult of `path` received through `store` as a C-STORE's data
    set is (StoreRefused when refused): announced with its UIDs, written, finished."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    incoming = store.receive(
        str(ds.file_meta.TransferSyntaxUID),
        ds.get("SOPClassUID"),
        ds.get("SOPInstanceUID"),
        provenance or Provenance(),
    )
    incoming.write(dataset_bytes(path))
    return incoming.finish()


def make_instance(
    directory: Path,
    *,
    study_uid: str,
    series_uid: str,
    modality: str = "CT",
    sop_instance_uid: str | None = None,
    sop_class_uid: str = CT_IMAGE_STORAGE,
    transfer_syntax: str = ExplicitVRLittleEndian,
    pixels: int = 16,
    **attributes,
) -> Path:
    """Write a small valid DICOM file; `attributes` are DICOM keywords. A keyword
    given as None is left out (to make a dataset that lacks it)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientID = "PAT-1"
    ds.PatientName = "Test^Patient"
    ds.StudyDate = "20261122"
    ds.StudyTime = "101500"
    ds.Rows = ds.Columns = pixels
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = os.urandom(pixels * pixels * 2)
    for keyword, value in attributes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "1.2.3")
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{generate_uid()}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_nothing_half_written(server: Server) -> None:
    """No temp file left, no file without its index row, no row without its file."""
    assert temp_files(server.data_dir) == []
    on_disk = {str(p.relative_to(server.data_dir)) for p in stored_files(server.data_dir)}
    assert on_disk == server.indexed_paths()


def temp_files(data_dir: Path) -> list[Path]:
    """Every file left in `.incoming` (any node's directory)."""
    return sorted(p for p in (data_dir / ".incoming").rglob("*") if p.is_file())


def stored_files(data_dir: Path) -> list[Path]:
    """Every instance file in a data directory (conflicts included)."""
    return sorted(p for p in data_dir.rglob("*.dcm"))


def requires_dcmtk(tool: str = STORESCU):
    return pytest.mark.skipif(
        shutil.which(tool) is None, reason=f"{tool} not installed (apt-get install dcmtk)"
    )


def bundled_test_files() -> list[Path]:
    """pydicom's bundled test files that carry file meta (no download is ever triggered)."""
    root = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
    files = []
    for path in sorted(root.glob("*.dcm")):
        try:
            meta, _ = split_dataset(path)
        except Exception:
            continue
        keywords = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
        if all(meta.get(keyword) for keyword in keywords):  # else it cannot be a C-STORE
            files.append(path)
    return files
