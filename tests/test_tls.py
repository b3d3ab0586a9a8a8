"""DICOM over TLS: a second listener, client certificates, and a handshake that
runs in the connection's own thread so a silent connection blocks nobody.

The certificates are made here, with the openssl command: a test CA, a server
certificate for localhost/127.0.0.1, a client certificate from the same CA, and
a client certificate from a CA the server does not trust.
"""

import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom.data
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from scp.config import Config, ConfigError, load_config
from scp.tls import server_context
from tests.conftest import (
    CT_IMAGE_STORAGE,
    IMAGING_SCP,
    STORESCU,
    dataset_bytes,
    free_port,
    holding_descriptors,
    make_instance,
    requires_dcmtk,
    send_files,
    stored_files,
)

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
CT_SMALL = pydicom.data.get_testdata_file("CT_small.dcm")

pytestmark = pytest.mark.skipif(shutil.which(OPENSSL) is None, reason="no openssl command")


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # signed by a CA the server does not know
    stranger_key: Path
    renewed_cert: Path  # a second server certificate, for the SIGHUP reload
    renewed_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def _issue(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    cert, key, csr = (directory / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
    ext_file = directory / f"{name}.ext"
    ext_file.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n" + extensions
    )
    _openssl(
        "req", "-new", "-newkey", "rsa:2048", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(ext_file),
        cwd=directory,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = _make_ca(directory, "Test CA")
    other_ca = _make_ca(directory, "Other CA")
    server_ext = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    client_ext = "extendedKeyUsage=clientAuth\n"
    server = _issue(directory, "localhost", ca, server_ext)
    client = _issue(directory, "CT_1", ca, client_ext)
    stranger = _issue(directory, "STRANGER", other_ca, client_ext)
    renewed = _issue(directory, "renewed", ca, server_ext)
    return Pki(ca[0], *server, *client, *stranger, *renewed)


def _tls_flags(pki: Pki, tls_port: int, *more: str) -> tuple[str, ...]:
    return (
        "--tls-port", str(tls_port),
        "--tls-certificate", str(pki.server_cert),
        "--tls-private-key", str(pki.server_key),
        *more,
    )  # fmt: skip


def _client_context(pki: Pki, cert: Path | None = None, key: Path | None = None):
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def _associate(port: int, context: ssl.SSLContext | None):
    ae = AE("TLSSCU")
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    # Bounded waits: a server that does not answer fails the test, not hangs it.
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    tls_args = (context, "localhost") if context is not None else None
    return ae.associate("127.0.0.1", port, ae_title="IMAGING_SCP", tls_args=tls_args)


def _store(port: int, context: ssl.SSLContext | None, path: Path) -> int | None:
    """The C-STORE status over a new association, None if there was none."""
    assoc = _associate(port, context)
    if not assoc.is_established:
        return None
    try:
        return assoc.send_c_store(path).get("Status")
    finally:
        assoc.release()


def _instance(tmp_path: Path) -> Path:
    return make_instance(tmp_path / "out", study_uid=generate_uid(), series_uid=generate_uid())


def _indexed(server, sop_instance_uid: str) -> bool:
    return _stored_path(server, sop_instance_uid) is not None


def _stored_path(server, sop_instance_uid: str) -> Path | None:
    query = "SELECT path FROM instances WHERE sop_instance_uid = ?"
    row = server.index().execute(query, (sop_instance_uid,)).fetchone()
    return None if row is None else server.data_dir / row["path"]


def _sop_instance_uid(path: Path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


# --- storing over TLS ----------------------------------------------------------


def test_pynetdicom_stores_over_tls_beside_the_plain_port(server_factory, pki, tmp_path):
    tls_port = free_port()
    server = server_factory(*_tls_flags(pki, tls_port))
    listening = server.wait_for_event("listening", count=2)
    assert {(e["port"], e["tls"]) for e in listening} == {(server.port, False), (tls_port, True)}

    over_tls, plain = _instance(tmp_path), _instance(tmp_path)
    assert _store(tls_port, _client_context(pki), over_tls) == 0x0000
    assert _store(server.port, None, plain) == 0x0000
    assert _indexed(server, _sop_instance_uid(over_tls))
    assert _indexed(server, _sop_instance_uid(plain))
    established = server.wait_for_event("tls.established")[0]
    assert established["protocol"] in ("TLSv1.2", "TLSv1.3")
    assert "client_subject" not in established  # no client certificate was asked for

    # Many PDUs and TLS records, above the spooling threshold: stored byte for byte.
    large = make_instance(
        tmp_path / "out", study_uid=generate_uid(), series_uid=generate_uid(), pixels=1500
    )
    assert _store(tls_port, _client_context(pki), large) == 0x0000
    stored = _stored_path(server, _sop_instance_uid(large))
    assert dataset_bytes(stored) == dataset_bytes(large)


@requires_dcmtk()
def test_dcmtk_storescu_stores_over_tls(server_factory, pki):
    if (
        "OpenSSL"
        not in subprocess.run([STORESCU, "--version"], capture_output=True).stdout.decode()
    ):
        pytest.skip("dcmtk was built without OpenSSL: storescu has no +tls")
    tls_port = free_port()
    server = server_factory(*_tls_flags(pki, tls_port, "--tls-client-ca", str(pki.ca)))
    result = subprocess.run(
        [
            STORESCU, "+tls", str(pki.client_key), str(pki.client_cert), "-pw",
            "+cf", str(pki.ca), "-aec", "IMAGING_SCP", "127.0.0.1", str(tls_port), CT_SMALL,
        ],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert _indexed(server, _sop_instance_uid(Path(CT_SMALL)))
    assert server.wait_for_event("tls.established")[0]["client_subject"] == "commonName=CT_1"


def test_tls_only_with_port_zero(server_factory, pki, tmp_path):
    tls_port = free_port()
    server = server_factory("--port", "0", *_tls_flags(pki, tls_port))
    assert [(e["port"], e["tls"]) for e in server.events("listening")] == [(tls_port, True)]
    assert _store(tls_port, _client_context(pki), _instance(tmp_path)) == 0x0000


def test_tls_on_descriptors_above_1023(server_factory, pki, tmp_path):
    """The handshake waits with poll(): select() cannot watch such a descriptor."""
    tls_port = free_port()
    server = server_factory(
        "--port", "0", *_tls_flags(pki, tls_port), launcher=holding_descriptors()
    )
    assert _store(tls_port, _client_context(pki), _instance(tmp_path)) == 0x0000
    assert server.events("tls.established")


# --- client certificates ---------------------------------------------------------


def test_client_certificate_required_when_a_client_ca_is_set(server_factory, pki, tmp_path):
    tls_port = free_port()
    server = server_factory(*_tls_flags(pki, tls_port, "--tls-client-ca", str(pki.ca)))
    assert server.wait_for_event("listening", count=2)[1]["client_certificates"] is True

    assert _store(tls_port, _client_context(pki), _instance(tmp_path)) is None
    stranger = _client_context(pki, pki.stranger_cert, pki.stranger_key)
    assert _store(tls_port, stranger, _instance(tmp_path)) is None
    failed = server.wait_for_event("tls.handshake_failed", count=2)
    assert all(e["peer"].startswith("127.0.0.1:") for e in failed)
    assert failed[0]["reason"] == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert failed[1]["reason"] == "CERTIFICATE_VERIFY_FAILED"
    assert stored_files(server.data_dir) == []
    assert server.events("association.accepted") == []

    trusted = _client_context(pki, pki.client_cert, pki.client_key)
    path = _instance(tmp_path)
    assert _store(tls_port, trusted, path) == 0x0000
    assert _indexed(server, _sop_instance_uid(path))
    established = server.wait_for_event("tls.established")
    assert [e["client_subject"] for e in established] == ["commonName=CT_1"]


# --- hostile and confused peers ----------------------------------------------------


def _still_open(sock: socket.socket) -> bool:
    """True if the peer has neither closed nor reset the connection."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True  # nothing to read, and no EOF
    except OSError:
        return False


def test_an_idle_connection_does_not_block_other_tls_senders(server_factory, pki, tmp_path):
    # pynetdicom's own TLS server shakes hands in its accept loop: this silent
    # connection would hold every later sender for the whole handshake timeout.
    tls_port = free_port()
    server = server_factory(*_tls_flags(pki, tls_port, "--tls-handshake-timeout", "120"))
    with socket.create_connection(("127.0.0.1", tls_port)) as idle:
        path = _instance(tmp_path)
        assert _store(tls_port, _client_context(pki), path) == 0x0000
        assert _indexed(server, _sop_instance_uid(path))
        assert _still_open(idle)  # the silent one is still waiting for its handshake
    assert server.process.poll() is None


def test_a_silent_connection_is_closed_after_the_handshake_timeout(server_factory, pki):
    tls_port = free_port()
    server = server_factory(*_tls_flags(pki, tls_port, "--tls-handshake-timeout", "0.5"))
    with socket.create_connection(("127.0.0.1", tls_port)) as silent:
        silent.settimeout(30)
        assert silent.recv(1) == b""  # closed by the server
    failed = server.wait_for_event("tls.handshake_failed")[0]
    assert "no TLS handshake within 0.5 s" in failed["reason"]


def test_the_handshake_timeout_is_for_the_whole_handshake(server_factory, pki):
    # A peer trickling a byte at a time gets no fresh timeout per byte.
    tls_port = free_port()
    server = server_factory(*_tls_flags(pki, tls_port, "--tls-handshake-timeout", "1"))
    hello_start = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03])
    hello = hello_start + bytes(64)
    closed = False
    with socket.create_connection(("127.0.0.1", tls_port)) as slow:
        for byte in hello:  # 75 bytes at 0.2 s: 15 s, far more than the 1 s allowed
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if not _still_open(slow):
                closed = True
                break
            time.sleep(0.2)
    assert closed, "the server kept a trickling handshake open past its timeout"
    assert (
        "no TLS handshake within 1 s" in server.wait_for_event("tls.handshake_failed")[0]["reason"]
    )


def test_plain_dicom_on_the_tls_port_is_refused_and_the_server_goes_on(
    server_factory, pki, tmp_path
):
    tls_port = free_port()
    server = server_factory(*_tls_flags(pki, tls_port))
    assert _store(tls_port, None, _instance(tmp_path)) is None
    assert server.wait_for_event("tls.handshake_failed")[0]["peer"].startswith("127.0.0.1:")
    assert stored_files(server.data_dir) == []

    path = _instance(tmp_path)
    assert _store(tls_port, _client_context(pki), path) == 0x0000
    assert _indexed(server, _sop_instance_uid(path))


def test_tls_to_the_plain_port_gets_no_association(server_factory, pki, tmp_path):
    server = server_factory(*_tls_flags(pki, free_port()))
    assert _store(server.port, _client_context(pki), _instance(tmp_path)) is None
    assert _store(server.port, None, _instance(tmp_path)) == 0x0000


# --- configuration -------------------------------------------------------------------


def test_sighup_loads_a_renewed_certificate(server_factory, pki, tmp_path):
    tls_port = free_port()
    config = tmp_path / "tls.toml"
    config.write_text(
        f'tls_port = {tls_port}\ntls_certificate = "{pki.server_cert}"\n'
        f'tls_private_key = "{pki.server_key}"\n'
    )
    server = server_factory("--config", str(config))

    def served_certificate() -> str:
        raw = socket.create_connection(("127.0.0.1", tls_port))
        with _client_context(pki).wrap_socket(raw, server_hostname="localhost") as tls:
            return dict(item[0] for item in tls.getpeercert()["subject"])["commonName"]

    assert served_certificate() == "localhost"
    config.write_text(
        config.read_text()
        .replace(str(pki.server_cert), str(pki.renewed_cert))
        .replace(str(pki.server_key), str(pki.renewed_key))
    )
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_event("reload.done")
    assert served_certificate() == "renewed"

    config.write_text(config.read_text().replace(str(pki.renewed_key), str(pki.server_key)))
    server.process.send_signal(signal.SIGHUP)  # a key that does not match: keep the old one
    assert "tls_private_key" in server.wait_for_event("reload.failed")[0]["reason"]
    assert served_certificate() == "renewed"


def _serve(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [IMAGING_SCP, "serve", "--host", "127.0.0.1", "--port", str(free_port()),
         "--data-dir", str(tmp_path / "data"), *flags],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_serve_exits_2_naming_the_key_of_a_bad_certificate(pki, tmp_path):
    missing = tmp_path / "missing.crt"
    cases = [
        (("--tls-certificate", str(missing), "--tls-private-key", str(pki.server_key)),
         "tls_certificate", "No such file"),
        (("--tls-certificate", str(pki.server_cert), "--tls-private-key", str(pki.client_key)),
         "tls_private_key", "is not the key of the certificate"),
        (("--tls-certificate", str(pki.server_key), "--tls-private-key", str(pki.server_key)),
         "tls_certificate", "no PEM certificate"),
        (("--tls-certificate", str(pki.server_cert), "--tls-private-key", str(pki.server_key),
          "--tls-client-ca", str(pki.server_key)), "tls_client_ca", ""),
        (("--tls-certificate", str(pki.server_cert)), "tls_private_key", "required"),
    ]  # fmt: skip
    for flags, key, detail in cases:
        result = _serve(tmp_path, "--tls-port", str(free_port()), *flags)
        assert result.returncode == 2, (flags, result.stdout, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"imaging-scp: error: key '{key}'"), lines
        assert detail in lines[0]
    assert not (tmp_path / "data").exists()  # nothing was started


def test_an_encrypted_private_key_is_refused_without_a_prompt(pki, tmp_path):
    encrypted = tmp_path / "encrypted.key"
    _openssl(
        "pkey", "-in", str(pki.server_key), "-aes256", "-passout", "pass:secret",
        "-out", str(encrypted), cwd=tmp_path,
    )  # fmt: skip
    config = Config(
        tls_port=2762, tls_certificate=str(pki.server_cert), tls_private_key=str(encrypted)
    )
    with pytest.raises(ConfigError, match="key 'tls_private_key': .* is encrypted"):
        server_context(config)


def test_the_context_follows_bcp_195(pki):
    context = server_context(
        Config(
            tls_port=2762,
            tls_certificate=str(pki.server_cert),
            tls_private_key=str(pki.server_key),
            tls_client_ca=str(pki.ca),
        )
    )
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.options & ssl.OP_NO_COMPRESSION
    tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(c["aead"] and c["kea"] in ("kx-ecdhe", "kx-dhe") for c in tls12)
    # Only our CA verifies clients, never the system's trust store.
    assert [dict(item[0] for item in c["subject"]) for c in context.get_ca_certs()] == [
        {"commonName": "Test CA"}
    ]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tls_port": 2762}, "key 'tls_certificate': required with tls_port"),
        ({"tls_port": 2762, "tls_certificate": "a.crt"}, "key 'tls_private_key': required"),
        ({"tls_port": 70000}, "key 'tls_port': must be 0..65535"),
        ({"port": 2762, "tls_port": 2762, "tls_certificate": "a", "tls_private_key": "b"},
         "key 'tls_port': 2762 is already `port`"),
        ({"port": 0}, "key 'port': 0 (no plain DICOM listener) needs tls_port"),
        ({"tls_client_ca": "ca.crt"}, "key 'tls_port': tls_client_ca is set but tls_port is 0"),
        ({"tls_handshake_timeout": 0}, "key 'tls_handshake_timeout': must be a positive"),
    ],
)  # fmt: skip
def test_tls_keys_are_validated(values, message):
    with pytest.raises(ConfigError) as raised:
        load_config(**values)
    assert str(raised.value).startswith(message)


def test_admin_commands_do_not_need_to_read_the_key(tmp_path):
    # The admin reads the service's config; the key may be readable by the service only.
    config = tmp_path / "config.toml"
    config.write_text(
        'tls_port = 2762\ntls_certificate = "/nonexistent/server.crt"\n'
        'tls_private_key = "/nonexistent/server.key"\n'
    )
    assert load_config(config).tls_port == 2762


def test_check_config_loads_the_tls_files_as_serve_will(tmp_path):
    config = tmp_path / "tls.toml"
    config.write_text(
        'tls_port = 2762\ntls_certificate = "/nonexistent/server.crt"\n'
        'tls_private_key = "/nonexistent/server.key"\n'
    )
    result = subprocess.run(
        [IMAGING_SCP, "check-config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tls_certificate" in lines[0], result.stderr


def test_queries_and_commitment_over_tls(server_factory, pki, tmp_path):
    """C-FIND (findscu) and storage commitment (pynetdicom) on the TLS port: the
    responses are interleaved with the reads of a TLS socket as of a plain one."""
    if (
        "OpenSSL"
        not in subprocess.run([STORESCU, "--version"], capture_output=True).stdout.decode()
    ):
        pytest.skip("dcmtk was built without OpenSSL")
    from pydicom.dataset import Dataset
    from pynetdicom import evt
    from pynetdicom.sop_class import StorageCommitmentPushModel

    tls_port = free_port()
    server = server_factory(*_tls_flags(pki, tls_port))
    context = _client_context(pki)
    paths = [_instance(tmp_path / str(n)) for n in range(3)]
    assert [_store(tls_port, context, path) for path in paths] == [0, 0, 0]
    out = tmp_path / "rsp"
    out.mkdir()
    result = subprocess.run(
        ["findscu", "+tla", "+cf", str(pki.ca), "-S", "-aec", "IMAGING_SCP",
         "-X", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
         "-k", "NumberOfStudyRelatedInstances", "127.0.0.1", str(tls_port)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answers = [pydicom.dcmread(p) for p in out.glob("rsp*.dcm")]
    assert sum(a.NumberOfStudyRelatedInstances for a in answers) == 3

    reports = []
    ae = AE("TLSSCU")
    ae.add_requested_context(StorageCommitmentPushModel, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate(
        "127.0.0.1", tls_port, ae_title="IMAGING_SCP", tls_args=(context, "localhost"),
        evt_handlers=[(evt.EVT_N_EVENT_REPORT,
                       lambda event: (reports.append(event.event_type), (0x0000, None))[1])],
    )  # fmt: skip
    info = Dataset()
    info.TransactionUID = generate_uid()
    items = []
    for path in paths:
        item = Dataset()
        item.ReferencedSOPClassUID = CT_IMAGE_STORAGE
        item.ReferencedSOPInstanceUID = _sop_instance_uid(path)
        items.append(item)
    info.ReferencedSOPSequence = items
    status, _ = assoc.send_n_action(info, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
    assert status.Status == 0x0000
    server.wait_for_event("commitment.reported")
    assoc.release()
    assert reports == [1]


def test_a_commitment_requester_that_releases_over_tls_gets_its_report_on_a_new_one(
    server_factory, pki, tmp_path
):
    """Its A-RELEASE-RQ is seen through TLS too (read ahead, not peeked at): the
    report is not sent into the release."""
    from tests.test_commitment import MODALITY, Peer, a_series, references, request_commitment

    peer = Peer().start()
    try:
        tls_port = free_port()
        server = server_factory(
            *_tls_flags(pki, tls_port), "--peer", f"{MODALITY}=127.0.0.1:{peer.port}"
        )
        paths = a_series(tmp_path / "series", 2)
        send_files(server.port, paths, calling=MODALITY)
        over_tls = type(server)(server.data_dir, tls_port, server.process, server.log_path)
        transaction = generate_uid()
        request_commitment(
            over_tls,
            transaction,
            references(paths),
            wait_for_report=False,
            tls_args=(_client_context(pki), "localhost"),
        )
        [(_, info)] = peer.reports.wait()
        assert info.TransactionUID == transaction
        deferred = server.wait_for_event("commitment.report_deferred")[0]
        assert deferred["reason"] == "requester released before the report"
    finally:
        peer.stop()
