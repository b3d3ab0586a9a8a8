"""The service as an admin runs it: configuration, shutdown, association control, logs."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time

from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from tests.conftest import (
    CT_IMAGE_STORAGE,
    IMAGING_SCP,
    association_rejection,
    free_port,
    make_instance,
    send_files,
)


def test_config_file_is_read_and_flags_win(server_factory, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('aet = "FROM_FILE"\nduplicates = "reject"\nmax_pdu = 65536\n')
    server = server_factory("--config", str(config), "--aet", "FROM_FLAG")
    (listening,) = server.events("listening")
    assert listening["aet"] == "FROM_FLAG"
    assert listening["duplicates"] == "reject"
    assert listening["max_pdu"] == 65536


def _serve_fails(*flags: str) -> str:
    """`serve` that cannot start: exit 2 and one line on stderr, which is returned."""
    result = subprocess.run(
        [IMAGING_SCP, "serve", "--host", "127.0.0.1", *flags],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("imaging-scp: error: ")
    assert '"event": "startup.failed"' in result.stdout
    return line


def test_a_data_dir_that_cannot_be_written_is_named_with_what_to_do(tmp_path):
    """Issue 13 #6: it was `OperationalError: unable to open database file`."""
    data_dir = tmp_path / "data"
    (data_dir / "index.sqlite").mkdir(parents=True)  # what sqlite cannot open, even as root
    line = _serve_fails("--port", str(free_port()), "--data-dir", str(data_dir))
    assert f"cannot use the data directory {data_dir}" in line
    assert "write access" in line and "--data-dir" in line
    if os.geteuid() != 0:  # root writes anywhere
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o555)
        line = _serve_fails("--port", str(free_port()), "--data-dir", str(read_only))
        assert f"cannot use the data directory {read_only}" in line


def test_a_port_in_use_is_named_with_what_to_do(tmp_path):
    """Issue 13 #6: it was `OSError: [Errno 98] Address already in use`."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _serve_fails("--port", str(port), "--data-dir", str(tmp_path / "data"))
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use)" in line
    assert "choose another port" in line


def test_bad_config_is_one_clear_line_naming_the_key(tmp_path):
    for content, expected in [
        ('colour = "blue"\n', "unknown key 'colour'"),
        ("prot = 104\n", "unknown key 'prot' (did you mean 'port'?)"),
        ('port = "eleven"\n', "key 'port'"),
        ('duplicates = "sometimes"\n', "key 'duplicates'"),
        ("port = [\n", "not valid TOML"),
    ]:
        config = tmp_path / "bad.toml"
        config.write_text(content)
        result = subprocess.run(
            [IMAGING_SCP, "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], result.stderr
        assert lines[0].startswith(f"imaging-scp: error: {config}"), lines  # names the file


def test_max_pdu_is_bounded_and_advertised(server):
    ae = AE("TESTSCU")
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    ae.maximum_pdu_size = 0  # we ask for unlimited; the receiver still bounds what it takes
    assoc = ae.associate("127.0.0.1", server.port, ae_title="IMAGING_SCP")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 262144
    assoc.release()


def test_wrong_called_ae_title_is_rejected(server):
    assert association_rejection(server.port, called="SOMEONE_ELSE") is not None
    rejected = server.wait_for_event("association.rejected")
    assert rejected[0]["called_ae"] == "SOMEONE_ELSE"


def test_sigterm_stops_accepting_and_lets_the_association_in_flight_finish(server, tmp_path):
    study, series = generate_uid(), generate_uid()
    first, second = (make_instance(tmp_path, study_uid=study, series_uid=series) for _ in range(2))
    ae = AE("TESTSCU")
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="IMAGING_SCP")
    assert assoc.send_c_store(first).Status == 0

    server.process.send_signal(signal.SIGTERM)
    server.wait_for_event("shutdown.requested")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the listening socket closes promptly
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        except (ConnectionRefusedError, ConnectionResetError):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the server still accepts connections after SIGTERM")

    assert assoc.send_c_store(second).Status == 0  # in flight: still served
    assoc.release()
    assert server.process.wait(30) == 0
    row = server.index().execute("SELECT number_of_instances FROM studies").fetchone()
    assert row["number_of_instances"] == 2
    assert server.events("stopped")[0]["aborted_associations"] == 0


def test_logs_are_json_lines_with_association_context(server, tmp_path):
    path = make_instance(tmp_path, study_uid=generate_uid(), series_uid=generate_uid())
    send_files(server.port, [path], calling="MODALITY_1")
    end = server.wait_for_event("association.end")[0]
    assert server.stop() == 0
    lines = server.log_path.read_text().splitlines()
    assert lines and all(json.loads(line) for line in lines)  # every line is one JSON object
    stored = server.events("instance.stored")[0]
    for event in (stored, end):
        assert event["calling_ae"] == "MODALITY_1"
        assert event["called_ae"] == "IMAGING_SCP"
        assert event["peer"].startswith("127.0.0.1:")
        assert event["assoc"] == stored["assoc"]
    assert (end["instances"], end["outcome"]) == (1, "released")
    stored_file = (
        server.data_dir / server.index().execute("SELECT path FROM instances").fetchone()[0]
    )
    assert end["bytes"] == stored["bytes"] == stored_file.stat().st_size


def test_association_end_is_logged_once_its_series_are_marked(server, tmp_path):
    """An admin (or a script) who sees `association.end` for an aborted
    association finds its series already marked incomplete, even while the
    index is slow to take the mark: the end is the association's last word."""
    from tests.test_admin import cli

    study = generate_uid()
    ae = AE("MODALITY")
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="IMAGING_SCP")
    path = make_instance(tmp_path, study_uid=study, series_uid=generate_uid())
    assert assoc.send_c_store(path).Status == 0
    # Another writer holds the index for two seconds: the mark waits for it.
    writer = sqlite3.connect(
        server.data_dir / "index.sqlite", isolation_level=None, check_same_thread=False
    )
    writer.execute("BEGIN IMMEDIATE")
    release = threading.Timer(2.0, writer.rollback)
    release.start()
    try:
        assoc.abort()
        end = server.wait_for_event("association.end")[0]
        assert end["outcome"] == "aborted"
        assert "incomplete" in cli("study", study, data_dir=server.data_dir).stdout
    finally:
        release.join()
        writer.close()
    assert server.events("series.incomplete")


def test_an_idle_connection_does_not_hold_up_a_stop(server):
    # A port probe or health check that never starts an association.
    probe = socket.create_connection(("127.0.0.1", server.port))
    server.wait_for_event("listening")
    server.process.send_signal(signal.SIGTERM)
    # pynetdicom would keep the probe's thread for its 30 s ACSE timeout.
    assert server.process.wait(15) == 0
    probe.close()
