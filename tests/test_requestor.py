"""Our requestor (scp.upper_layer's) against real peers: dcmtk's dcmqrscp and
storescp, a port nobody listens on, and a listener that never answers. Each
way an association fails has its own error and a message naming the peer."""

import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from scp import dimse
from scp.association import agree, read_request
from scp.upper_layer import (
    ABORT_SOURCE_PROVIDER,
    PDU_HEADER,
    REASON_INVALID_PARAMETER,
    Aborted,
    ConnectFailed,
    NoAnswer,
    NotAccepted,
    Proposal,
    ProtocolViolation,
    Rejected,
    Requestor,
    State,
    abort_pdu,
    p_data_pdus,
    send_buffers,
    set_kernel_timeout,
    streamed_p_data_pdus,
)
from tests.conftest import (
    CT_IMAGE_STORAGE,
    VERIFICATION,
    dataset_bytes,
    free_port,
    make_instance,
    requires_dcmtk,
    send_files,
)

STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
ECHO = Proposal(VERIFICATION, (ImplicitVRLittleEndian,))
CT = Proposal(CT_IMAGE_STORAGE, (ExplicitVRLittleEndian,))


def wait_listening(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 15
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.05)


@pytest.fixture
def dcmtk_peer(tmp_path):
    """Start a dcmtk SCP (its arguments, with {port} and {dir} filled in) and
    return its port once it listens; stopped after the test."""
    started = []

    def start(*args: str, port: int | None = None) -> int:
        port = port or free_port()
        directory = tmp_path / f"peer-{port}"
        directory.mkdir()
        command = [arg.format(port=port, dir=directory) for arg in args]
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=directory
        )
        started.append(process)
        wait_listening(port, process)
        return port

    yield start
    for process in started:
        process.kill()
        process.wait(10)


def dcmqrscp(start, tmp_path: Path, ae_title: str = "ARCHIVE") -> int:
    """dcmqrscp knowing one AE title, `ae_title`: Verification and query/retrieve,
    no storage commitment."""
    port = free_port()
    (tmp_path / "db").mkdir()
    config = tmp_path / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
        "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\n{ae_title} {tmp_path / 'db'} RW (10, 1024mb) ANY\nAETable END\n"
    )
    return start("dcmqrscp", "-c", str(config), port=port)


def store_request(message_id: int, sop_instance_uid: str) -> bytes:
    def uid(value: str) -> bytes:
        data = value.encode("ascii")
        return data + b"\0" * (len(data) % 2)

    def us(value: int) -> bytes:
        return struct.pack("<H", value)

    return dimse.encode_command(
        [
            (dimse.AFFECTED_SOP_CLASS_UID, uid(CT_IMAGE_STORAGE)),
            (dimse.COMMAND_FIELD, us(dimse.C_STORE_RQ)),
            (dimse.MESSAGE_ID, us(message_id)),
            (0x0700, us(0)),  # Priority: medium
            (dimse.COMMAND_DATA_SET_TYPE, us(dimse.WITH_DATASET)),
            (dimse.AFFECTED_SOP_INSTANCE_UID, uid(sop_instance_uid)),
        ]
    )


def an_instance(tmp_path: Path) -> tuple[str, bytes]:
    uid = generate_uid()
    path = make_instance(
        tmp_path, study_uid=generate_uid(), series_uid=generate_uid(), sop_instance_uid=uid
    )
    return uid, dataset_bytes(path)


@requires_dcmtk("/usr/bin/dcmqrscp")
def test_an_echo_to_dcmqrscp_is_answered_and_released(dcmtk_peer, tmp_path):
    port = dcmqrscp(dcmtk_peer, tmp_path)
    requestor = Requestor("REQUESTOR", timeout=10)
    association = requestor.associate("127.0.0.1", port, "ARCHIVE", [ECHO])
    assert association.peer_max_pdu == 16384
    association.send(association.context(VERIFICATION), dimse.echo_request(7))
    response = association.receive()
    assert response.command.field == dimse.C_ECHO_RSP
    assert response.command.responds_to == 7
    assert response.command.status == 0x0000
    assert response.dataset is None
    association.release()
    assert association.state is State.IDLE


@requires_dcmtk("/usr/bin/dcmqrscp")
def test_a_called_ae_the_peer_does_not_know_is_rejected_with_its_reason(dcmtk_peer, tmp_path):
    port = dcmqrscp(dcmtk_peer, tmp_path)
    with pytest.raises(Rejected) as rejected:
        Requestor("REQUESTOR", timeout=10).associate("127.0.0.1", port, "NOT_ARCHIVE", [ECHO])
    assert (rejected.value.result, rejected.value.source, rejected.value.reason) == (1, 1, 7)
    assert str(rejected.value) == (
        f"NOT_ARCHIVE@127.0.0.1:{port} rejected the association:"
        " Rejected Permanent; Called AE title not recognised"
    )


@requires_dcmtk("/usr/bin/storescp")
def test_a_refusing_storescp_is_a_rejection_with_no_reason_given(dcmtk_peer):
    port = dcmtk_peer("storescp", "--refuse", "{port}")
    with pytest.raises(Rejected) as rejected:
        Requestor("REQUESTOR", timeout=10).associate("127.0.0.1", port, "STORESCP", [ECHO])
    assert str(rejected.value).endswith(
        "rejected the association: Rejected Permanent; No reason given"
    )


@requires_dcmtk("/usr/bin/dcmqrscp")
def test_an_abstract_syntax_without_an_accepted_context_is_named(dcmtk_peer, tmp_path):
    """dcmqrscp takes no storage commitment: the association is up (for C-ECHO),
    the context for the push model is not, and we are told which."""
    port = dcmqrscp(dcmtk_peer, tmp_path)
    commitment = Proposal(STORAGE_COMMITMENT_PUSH_MODEL, (ExplicitVRLittleEndian,), scp_role=True)
    with Requestor("REQUESTOR", timeout=10).associate(
        "127.0.0.1", port, "ARCHIVE", [commitment, ECHO]
    ) as association:
        assert association.context(VERIFICATION).context_id == 3
        with pytest.raises(NotAccepted) as not_accepted:
            association.context(STORAGE_COMMITMENT_PUSH_MODEL)
    assert str(not_accepted.value) == (
        f"ARCHIVE@127.0.0.1:{port} does not accept the Storage Commitment Push Model SOP Class"
    )
    assert association.state is State.IDLE  # released on leaving the block


def test_no_listener_is_a_refused_connection():
    port = free_port()  # bound and released: nothing listens there
    with pytest.raises(ConnectFailed) as failed:
        Requestor("REQUESTOR", timeout=5).associate("127.0.0.1", port, "ANYONE", [ECHO])
    assert str(failed.value) == (
        f"cannot connect to 127.0.0.1:{port}: [Errno 111] Connection refused"
    )


def test_a_peer_that_takes_the_connection_and_never_answers_is_a_timeout():
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(NoAnswer) as no_answer:
            Requestor("REQUESTOR", timeout=1).associate("127.0.0.1", port, "SILENT", [ECHO])
        took = time.monotonic() - started
        # Our A-ABORT was sent before we gave up.
        connection, _ = silent.accept()
        with connection:
            connection.settimeout(5)
            received = b""
            while chunk := connection.recv(65536):
                received += chunk
    assert str(no_answer.value) == (
        f"no association with SILENT@127.0.0.1:{port} (no answer within 1 s)"
    )
    assert 1 <= took < 5
    assert received[0] == 0x01  # the A-ASSOCIATE-RQ
    assert received[-10:] == bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0))  # A-ABORT, service-user


@requires_dcmtk("/usr/bin/storescp")
def test_a_store_answered_late_is_a_timeout_and_an_abort(dcmtk_peer, tmp_path):
    port = dcmtk_peer("storescp", "--sleep-during", "5", "-od", "{dir}", "{port}")
    uid, dataset = an_instance(tmp_path)
    association = Requestor("REQUESTOR", timeout=1).associate("127.0.0.1", port, "STORESCP", [CT])
    association.send(association.context(CT_IMAGE_STORAGE), store_request(1, uid), dataset)
    with pytest.raises(NoAnswer) as no_answer:
        association.receive()
    assert str(no_answer.value) == f"STORESCP@127.0.0.1:{port} did not answer within 1 s"
    assert association.state is State.IDLE


@requires_dcmtk("/usr/bin/storescp")
def test_a_store_to_storescp_is_stored_and_answered(dcmtk_peer, tmp_path):
    port = dcmtk_peer("storescp", "-od", "{dir}", "{port}")
    uid, dataset = an_instance(tmp_path)
    with Requestor("REQUESTOR", timeout=10).associate(
        "127.0.0.1", port, "STORESCP", [CT]
    ) as association:
        association.send(association.context(CT_IMAGE_STORAGE), store_request(1, uid), dataset)
        response = association.receive().command
    assert (response.field, response.status) == (dimse.C_STORE_RSP, 0x0000)
    [stored] = (tmp_path / f"peer-{port}").glob("CT.*")
    assert stored.name == f"CT.{uid}"


@requires_dcmtk("/usr/bin/storescp")
def test_an_abort_from_the_peer_says_its_source_and_reason(dcmtk_peer, tmp_path):
    port = dcmtk_peer("storescp", "--abort-after", "-od", "{dir}", "{port}")
    uid, dataset = an_instance(tmp_path)
    association = Requestor("REQUESTOR", timeout=10).associate("127.0.0.1", port, "STORESCP", [CT])
    association.send(association.context(CT_IMAGE_STORAGE), store_request(1, uid), dataset)
    with pytest.raises(Aborted) as aborted:
        association.receive()
    assert (aborted.value.source, aborted.value.reason) == (0, 0)
    assert str(aborted.value) == (
        f"STORESCP@127.0.0.1:{port} aborted the association (service-user, reason not specified)"
    )


@requires_dcmtk("/usr/bin/dcmqrscp")
@pytest.mark.parametrize(
    "peer_ae, reason",
    [
        # The modality's address answers as another AE: the peer's rejection, decoded.
        ("ARCHIVE", "rejected the association: Rejected Permanent; Called AE title not recognised"),
        # The modality takes no reports: the class, named.
        ("MODALITY", "does not accept the Storage Commitment Push Model SOP Class"),
    ],
)
def test_a_report_the_peer_cannot_take_is_logged_with_the_peers_reason(
    server_factory, dcmtk_peer, tmp_path, peer_ae, reason
):
    from tests.test_commitment import MODALITY, a_series, references, request_commitment

    port = dcmqrscp(dcmtk_peer, tmp_path, peer_ae)
    server = server_factory("--peer", f"{MODALITY}=127.0.0.1:{port}")
    paths = a_series(tmp_path / "series", 1)
    send_files(server.port, paths, calling=MODALITY)
    request_commitment(server, generate_uid(), references(paths), wait_for_report=False)
    failed = server.wait_for_event("commitment.delivery_failed")[0]
    assert failed["reason"] == f"{MODALITY}@127.0.0.1:{port} {reason}"


def test_a_response_that_breaks_dimse_is_a_protocol_violation_and_an_abort():
    """A peer that accepts, then answers with a dataset fragment and no command:
    we abort (service-provider, invalid PDU parameter value) and say why."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        received = []

        def peer():
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(10)
                header = connection.recv(6, socket.MSG_WAITALL)
                body = connection.recv(PDU_HEADER.unpack(header)[1], socket.MSG_WAITALL)
                connection.sendall(agree(read_request(header + body), 16384).pdu)
                connection.recv(65536)  # the C-ECHO-RQ
                connection.sendall(p_data_pdus(1, b"", b"\x08\x00\x16\x00", 16384))
                while chunk := connection.recv(65536):
                    received.append(chunk)

        thread = threading.Thread(target=peer)
        thread.start()
        association = Requestor("REQUESTOR", timeout=10).associate(
            "127.0.0.1", port, "BROKEN", [ECHO]
        )
        association.send(association.context(VERIFICATION), dimse.echo_request(1))
        with pytest.raises(ProtocolViolation) as violation:
            association.receive()
        thread.join(10)
    assert str(violation.value) == (
        f"BROKEN@127.0.0.1:{port} sent a P-DATA-TF that breaks DIMSE:"
        " a dataset PDV before its command"
    )
    assert b"".join(received) == abort_pdu(ABORT_SOURCE_PROVIDER, REASON_INVALID_PARAMETER)


def test_a_peer_that_stops_reading_what_we_send_is_a_timeout():
    """A peer that accepts, then reads nothing more: a data set larger than
    the sockets' buffers stalls, and the store ends after the timeout, naming
    the peer, instead of waiting for ever."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        done = threading.Event()

        def peer():
            connection, _ = listener.accept()
            with connection:
                header = connection.recv(6, socket.MSG_WAITALL)
                body = connection.recv(PDU_HEADER.unpack(header)[1], socket.MSG_WAITALL)
                connection.sendall(agree(read_request(header + body), 16384).pdu)
                done.wait(10)  # and reads nothing

        thread = threading.Thread(target=peer)
        thread.start()
        try:
            association = Requestor("REQUESTOR", timeout=1).associate(
                "127.0.0.1", port, "STALLED", [CT]
            )
            started = time.monotonic()
            with pytest.raises(NoAnswer) as no_answer:
                association.send(
                    association.context(CT_IMAGE_STORAGE),
                    store_request(1, generate_uid()),
                    bytes(16 * 1024 * 1024),
                )
            took = time.monotonic() - started
        finally:
            done.set()
            thread.join(10)
    assert str(no_answer.value) == f"STALLED@127.0.0.1:{port} took nothing we sent for 1 s"
    assert 1 <= took < 5
    assert association.state is State.IDLE


def test_buffers_are_sent_whole_and_in_order_past_a_full_socket_and_iov_max():
    """More buffers than one sendmsg takes, more bytes than the socket buffers
    hold (a timeout socket's sendmsg then sends part of them): what arrives is
    every buffer, in order, and the PDUs framing them are the peer's size."""
    sender, receiver = socket.socketpair()
    set_kernel_timeout(sender, 10)  # as the requestor's: sendmsg may return having sent part
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    data = bytes(range(256)) * 12_000  # 3 MB, in pieces of 1 MiB at most
    pieces = [memoryview(data)[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
    received = bytearray()

    def read_slowly():
        while chunk := receiver.recv(65536):
            received.extend(chunk)
            time.sleep(0.001)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    with sender:
        for buffers in streamed_p_data_pdus(1, b"CMD", pieces, len(data), 1030):
            send_buffers(sender, buffers)
    reader.join()
    receiver.close()
    command_pdu = p_data_pdus(1, b"CMD", b"", 1030)
    dataset_pdus = p_data_pdus(1, b"", data, 1030)  # no command: its data set's PDUs alone
    assert bytes(received) == command_pdu + dataset_pdus
