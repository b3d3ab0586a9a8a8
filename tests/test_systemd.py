"""Running imaging-scp as a systemd service: the unit files, the sd_notify
protocol, and the `echo` and `check-config` commands.

No systemd PID 1 here: the units are checked with `systemd-analyze` (verify,
and the offline security review), and the notify protocol against a real
datagram socket handed to a real `imaging-scp serve` as NOTIFY_SOCKET, the way
systemd hands its own.
"""

import contextlib
import ctypes
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pydicom.data
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from scp import notify
from scp.cli.service import example_config
from scp.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "imaging-scp.service"
EXAMPLE_CONFIG = ROOT / "systemd" / "config.toml"
BIN = Path(sys.executable).parent
IMAGING_SCP = str(BIN / "imaging-scp")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
STORESCU = "/usr/bin/storescu"
CT_SMALL = pydicom.data.get_testdata_file("CT_small.dcm")

needs_systemd_analyze = pytest.mark.skipif(
    not os.access(SYSTEMD_ANALYZE, os.X_OK), reason="systemd-analyze is not installed"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """`Key=value` lines of a unit file, every value of repeated keys kept."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def seconds(timespan: str) -> float:
    """A systemd time span of the forms used in the unit: 45s, 2min, 1min 30s."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", timespan):
        total += float(number) * units[unit or "s"]
    return total


# --- the unit file --------------------------------------------------------------


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart's binary exists; /opt/imaging-scp is not
    # installed here, so verify a copy that starts the venv's real binary.
    copy = tmp_path / "imaging-scp.service"
    copy.write_text(UNIT.read_text().replace("/opt/imaging-scp/.venv/bin/imaging-scp", IMAGING_SCP))
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if "imaging-scp" in line
    ]
    assert result.returncode == 0, result.stderr
    assert complaints == []  # e.g. "Unknown key ..." is only a warning, with exit code 0


@needs_systemd_analyze
def test_unit_exposure_is_ok_or_better():
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout
    exposure, rating = float(match[1]), match[2]
    assert exposure <= 2.0, f"exposure {exposure} {rating}:\n{result.stdout}"


def test_unit_matches_the_service_contract():
    unit = unit_settings()
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert seconds(unit["WatchdogSec"][0]) > 0
    assert unit["Restart"] == ["on-failure"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # serve reloads on SIGHUP
    # SIGTERM drains for drain_timeout; systemd must not SIGKILL before that.
    drain = tomllib.loads(EXAMPLE_CONFIG.read_text())["drain_timeout"]
    assert seconds(unit["TimeoutStopSec"][0]) > drain + 5
    assert "CAP_NET_BIND_SERVICE" in unit["AmbientCapabilities"][0]
    assert unit["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    # The config is read from ConfigurationDirectory=, data written in StateDirectory=.
    command = shlex.split(unit["ExecStart"][0])
    config_path = Path(command[command.index("--config") + 1])
    assert config_path == Path("/etc") / unit["ConfigurationDirectory"][0] / "config.toml"
    data_dir = tomllib.loads(EXAMPLE_CONFIG.read_text())["data_dir"]
    assert Path(data_dir) == Path("/var/lib") / unit["StateDirectory"][0]


def test_example_config_lists_every_key_with_its_default():
    expected = example_config()
    assert EXAMPLE_CONFIG.read_text() == expected, (
        "systemd/config.toml is out of date; regenerate it with\n"
        "  .venv/bin/python -c 'from scp.cli.service import example_config; "
        'print(example_config(), end="")\' > systemd/config.toml'
    )
    values = tomllib.loads(expected)
    fields = dataclasses.fields(Config)
    assert list(values) == [item.name for item in fields]
    example, defaults = load_config(EXAMPLE_CONFIG), Config()
    for item in fields:
        if item.name != "data_dir":  # the example reads back as the defaults
            assert getattr(example, item.name) == getattr(defaults, item.name), item.name
        assert f"# {item.metadata['help']}" in expected
    assert values["data_dir"] == "/var/lib/imaging-scp"


# --- the sd_notify protocol against a real socket ---------------------------------


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket (a path, or a name in
    the abstract namespace)."""

    def __init__(self, directory: Path, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"imaging-scp-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            path = directory / "notify.sock"
            assert len(str(path)) < 108, "AF_UNIX path too long"
            self.sock.bind(str(path))
            self.env_value = str(path)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def receive(self, until, timeout: float = 15) -> dict[str, str]:
        """Read datagrams until one satisfies `until`; return it."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), message))
            if until(message):
                return message
        raise AssertionError(f"no such notification within {timeout}s: {self.messages}")

    def drain(self, duration: float) -> list[dict[str, str]]:
        """Everything that arrives within `duration` seconds."""
        start = len(self.messages)
        with contextlib.suppress(AssertionError):  # the normal end: nothing more came
            self.receive(lambda _message: False, timeout=duration)
        return [message for _, message in self.messages[start:]]

    def close(self):
        self.sock.close()


def serve(tmp_path: Path, notify: NotifySocket | None, argv=None, env=None, **popen):
    port = free_port()
    data_dir = tmp_path / "data"
    argv = argv or [
        IMAGING_SCP,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
    ]
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    }
    if notify is not None:
        environment["NOTIFY_SOCKET"] = notify.env_value
    environment.update(env or {})
    log = (tmp_path / f"serve-{port}.log").open("w")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=environment, **popen)
    return process, port


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.fixture
def notify_socket(tmp_path):
    notify = NotifySocket(tmp_path)
    yield notify
    notify.close()


def echo_now(port: int) -> bool:
    """A C-ECHO with no retry: does the port take an association right now?"""
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGING_SCP")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return status.Status == 0x0000


def store_ct_small(port: int) -> int:
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGING_SCP")
    assert assoc.is_established
    status = assoc.send_c_store(pydicom.dcmread(CT_SMALL))
    assoc.release()
    return status.Status


def test_notify_ready_status_watchdog_stopping(tmp_path, notify_socket, processes):
    process, port = serve(tmp_path, notify_socket, env={"WATCHDOG_USEC": "1000000"})
    processes.append(process)

    ready = notify_socket.receive(lambda message: "READY" in message)
    # READY=1 means the port accepts connections: right now, no retry. (An
    # association rather than a bare TCP connect: pynetdicom keeps the thread of
    # a connection that never sends A-ASSOCIATE-RQ for acse_timeout, 30 s, and
    # SIGTERM's drain would wait for it.)
    assert echo_now(port)
    assert ready["READY"] == "1"
    assert ready["STATUS"] == f"listening on 127.0.0.1:{port}, 0 associations, 0 instances today"

    assert store_ct_small(port) == 0x0000
    status = notify_socket.receive(lambda message: "1 instance today" in message.get("STATUS", ""))
    assert status["STATUS"].startswith(f"listening on 127.0.0.1:{port}, ")

    # WATCHDOG_USEC=1 s: a ping at least every half second, from the accept loop.
    notify_socket.drain(2.5)
    pings = [at for at, message in notify_socket.messages if message.get("WATCHDOG") == "1"]
    assert len(pings) >= 4, notify_socket.messages
    assert max(b - a for a, b in zip(pings, pings[1:], strict=False)) < 1.0

    process.send_signal(signal.SIGTERM)
    stopping = notify_socket.receive(lambda message: "STOPPING" in message)
    assert stopping["STOPPING"] == "1"
    assert process.wait(30) == 0


def test_watchdog_pid_must_be_ours_and_abstract_socket(tmp_path, processes):
    notify = NotifySocket(tmp_path, abstract=True)
    try:
        # WATCHDOG_PID names another process: the watchdog is not ours to feed.
        process, port = serve(
            tmp_path, notify, env={"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
        )
        processes.append(process)
        notify.receive(lambda message: "READY" in message)
        assert not [m for m in notify.drain(1.5) if "WATCHDOG" in m]
        process.send_signal(signal.SIGTERM)
        notify.receive(lambda message: "STOPPING" in message)
        assert process.wait(30) == 0
    finally:
        notify.close()


def test_watchdog_pid_equal_to_ours_is_fed(tmp_path, notify_socket, processes):
    # As systemd sets it: WATCHDOG_PID is the service's own pid ($$ survives exec).
    port = free_port()
    command = (
        f"WATCHDOG_PID=$$ exec {shlex.quote(IMAGING_SCP)} serve --host 127.0.0.1 "
        f"--port {port} --data-dir {shlex.quote(str(tmp_path / 'data'))}"
    )
    process, _ = serve(
        tmp_path, notify_socket, argv=["/bin/sh", "-c", command], env={"WATCHDOG_USEC": "1000000"}
    )
    processes.append(process)
    notify_socket.receive(lambda message: message.get("WATCHDOG") == "1")
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0


def test_notify_functions_in_process(tmp_path, monkeypatch, notify_socket):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready("x") is False  # outside systemd: nothing to do, no error

    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.env_value)
    assert notify.status("two\nlines") is True
    assert notify_socket.receive(lambda _m: True) == {"STATUS": "two lines"}
    assert notify.stopping() is True
    assert notify_socket.receive(lambda _m: True) == {"STOPPING": "1"}

    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert notify.watchdog() is False  # logged once, never raised


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("0", None, None),
        ("junk", None, None),
        ("30000000", None, 30.0),
        ("30000000", "self", 30.0),
        ("30000000", "1", None),  # meant for another process
    ],
)
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, str(os.getpid()) if value == "self" else value)
    assert notify.watchdog_interval() == expected
    assert notify.Watchdog().period == (expected / 2 if expected else None)


def test_service_status_line():
    line = notify.ServiceStatus("0.0.0.0", 11112)
    assert line.text(3, 12345) == "listening on :11112, 3 associations, 12,345 instances today"
    assert notify.ServiceStatus("::1", 104).text(1, 1) == (
        "listening on [::1]:104, 1 association, 1 instance today"
    )


# --- the unit's command line, run the way the unit runs it ---------------------------


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here, not in the forked child


def _harden_like_the_unit():
    """What of the unit's sandbox a plain process can apply to itself: UMask=,
    NoNewPrivileges=, and MemoryDenyWriteExecute= (systemd >= 253 uses this same
    prctl; 252 a seccomp filter with the same effect)."""
    os.umask(0o077)
    if _LIBC.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    _LIBC.prctl(65, 1, 0, 0, 0)  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN (Linux >= 6.3)


def _mdwe_supported() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import ctypes; print(ctypes.CDLL(None).prctl(66, 0, 0, 0, 0))"],
        preexec_fn=_harden_like_the_unit,
        capture_output=True,
        text=True,
    )
    return probe.stdout.strip() == "1"  # PR_GET_MDWE


@pytest.mark.skipif(not os.access(STORESCU, os.X_OK), reason="dcmtk's storescu is not installed")
def test_unit_execstart_takes_a_c_store_from_dcmtk(tmp_path, notify_socket, processes):
    port = free_port()
    data_dir = tmp_path / "state"
    config = tmp_path / "config.toml"
    config.write_text(
        EXAMPLE_CONFIG.read_text()
        .replace('data_dir = "/var/lib/imaging-scp"', f'data_dir = "{data_dir}"')
        .replace("port = 11112", f"port = {port}")
    )
    command = shlex.split(unit_settings()["ExecStart"][0])
    command = [
        IMAGING_SCP if arg == "/opt/imaging-scp/.venv/bin/imaging-scp" else arg for arg in command
    ]
    command = [str(config) if arg == "/etc/imaging-scp/config.toml" else arg for arg in command]
    assert command[1:] == ["serve", "--config", str(config)]
    environment = dict(
        pair.split("=", 1) for pair in shlex.split(unit_settings()["Environment"][0])
    )

    process, _ = serve(
        tmp_path,
        notify_socket,
        argv=command,
        env={**environment, "WATCHDOG_USEC": str(30_000_000)},
        preexec_fn=_harden_like_the_unit,
    )
    processes.append(process)
    notify_socket.receive(lambda message: "READY" in message)
    process.send_signal(signal.SIGHUP)  # what `systemctl reload` (ExecReload=) sends
    time.sleep(1)
    assert process.poll() is None, "SIGHUP must reload, not end the service"

    sent = subprocess.run(
        [STORESCU, "-aec", "IMAGING_SCP", "127.0.0.1", str(port), CT_SMALL],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    notify_socket.receive(lambda message: "1 instance today" in message.get("STATUS", ""))
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0

    with sqlite3.connect(data_dir / "index.sqlite") as conn:
        (count,) = conn.execute("SELECT count(*) FROM instances").fetchone()
    assert count == 1
    index_mode = (data_dir / "index.sqlite").stat().st_mode & 0o777
    assert index_mode & 0o077 == 0  # UMask=0077 reached the files
    if not _mdwe_supported():
        pytest.skip("stored, but the kernel lacks PR_SET_MDWE: MemoryDenyWriteExecute untested")


# --- check-config ----------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([IMAGING_SCP, *args], capture_output=True, text=True, timeout=60)


def test_check_config_prints_every_effective_value(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(
        'port = 104\ndata_dir = "/srv/dicom"\nduplicates = "reject"\n'
        'index_url = "postgresql://scp:s3cret@db.example/archive"\n'
    )
    result = run_cli("check-config", str(config))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [item.name for item in dataclasses.fields(Config)]
    assert re.search(r"^port\s+104\s+\(file\)$", result.stdout, re.M)
    assert re.search(r'^data_dir\s+"/srv/dicom"\s+\(file\)$', result.stdout, re.M)
    assert re.search(r'^aet\s+"IMAGING_SCP"\s+\(default\)$', result.stdout, re.M)
    # The index's password is never printed.
    assert re.search(
        r'^index_url\s+"postgresql://scp:\*\*\*@db.example/archive"', result.stdout, re.M
    )

    as_json = run_cli("check-config", "--json", str(config))
    assert as_json.returncode == 0
    values = json.loads(as_json.stdout)
    assert values["port"] == 104
    assert values["data_dir"] == "/srv/dicom"
    assert values["duplicates"] == "reject"
    assert values["require_called_aet"] is True
    assert values["index_url"] == "postgresql://scp:***@db.example/archive"
    assert set(values) == {item.name for item in dataclasses.fields(Config)}


def test_check_config_accepts_the_example():
    result = run_cli("check-config", str(EXAMPLE_CONFIG))
    assert result.returncode == 0, result.stderr
    assert "(default)" not in result.stdout  # the example sets every key


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ("prot = 104\n", "prot"),  # unknown key
        ('port = "eleven"\n', "port"),  # wrong type
        ("require_called_aet = 1\n", "require_called_aet"),
        ('duplicates = "sometimes"\n', "duplicates"),
        ("max_pdu = 12\n", "max_pdu"),  # out of range
        ('[peers]\nCT_1 = "10.0.0.1"\n', "peers"),  # no port
        ("report_attempts = 0\n", "report_attempts"),
    ],
)
def test_check_config_names_the_bad_key(tmp_path, content, key):
    config = tmp_path / "bad.toml"
    config.write_text(content)
    result = run_cli("check-config", str(config))
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert f"'{key}'" in result.stderr
    assert str(config) in result.stderr


def test_check_config_on_a_missing_or_broken_file(tmp_path):
    missing = run_cli("check-config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2
    assert len(missing.stderr.splitlines()) == 1
    assert "no such file" in missing.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("port = \n")
    result = run_cli("check-config", str(broken))
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "not valid TOML" in result.stderr


# --- echo --------------------------------------------------------------------------------


def test_echo_against_a_running_server(tmp_path, notify_socket, processes):
    process, port = serve(tmp_path, notify_socket)
    processes.append(process)
    notify_socket.receive(lambda message: "READY" in message)

    result = run_cli("echo", "127.0.0.1", str(port))
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        rf"C-ECHO IMAGING_SCP@127\.0\.0\.1:{port}: Success \(0x0000\) in \d+\.\d ms"
        r" \(association \d+\.\d ms\)\n",
        result.stdout,
    )

    # require_called_aet: another called AE title is rejected.
    rejected = run_cli("echo", "--called-aet", "SOMEONE_ELSE", "127.0.0.1", str(port))
    assert rejected.returncode == 1
    assert len(rejected.stderr.splitlines()) == 1, rejected.stderr
    assert "rejected" in rejected.stderr
    assert "Called AE title not recognised" in rejected.stderr

    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0


def test_echo_against_a_closed_port():
    port = free_port()  # bound and released: nothing listens there
    result = run_cli("echo", "--timeout", "5", "127.0.0.1", str(port))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"imaging-scp: error: cannot connect to 127.0.0.1:{port}: [Errno 111] Connection refused"
    ]


def test_echo_against_an_unknown_host_and_a_non_dicom_peer():
    unknown = run_cli("echo", "--timeout", "5", "no-such-host.invalid", "104")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("imaging-scp: error: cannot resolve no-such-host.invalid: ")
    assert len(unknown.stderr.splitlines()) == 1

    # A web server where a DICOM peer was expected.
    with socket.create_server(("127.0.0.1", 0)) as http:
        port = http.getsockname()[1]
        child = subprocess.Popen(
            [IMAGING_SCP, "echo", "--timeout", "5", "127.0.0.1", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        http.settimeout(30)
        conn, _ = http.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            out, err = child.communicate(timeout=30)
    assert child.returncode == 1
    assert out == ""
    assert err.splitlines() == [
        f"imaging-scp: error: 127.0.0.1:{port} answered something that is not DICOM"
        " (PDU type '0x48')"
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["127.0.0.1", "not-a-port"],
        ["127.0.0.1"],
        ["127.0.0.1", "70000"],
        ["--aet", "A_TITLE_LONGER_THAN_16", "127.0.0.1", "11112"],
    ],
)
def test_echo_usage_errors(args):
    result = run_cli("echo", *args)
    assert result.returncode == 2
    assert result.stdout == ""
