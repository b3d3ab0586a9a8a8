"""The requestor side of one C-ECHO, for `imaging-scp echo`: connect, associate
(Verification, Implicit VR Little Endian), C-ECHO-RQ, release — on one blocking
socket, each step within `timeout`, with a reason for every way it can fail.
PDU items are encoded and decoded by pynetdicom's PDU classes, the command set
and the P-DATA framing by our own (scp.dimse, scp.upper_layer)."""

import socket
import time
from dataclasses import dataclass

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

from scp import dimse
from scp.negotiation import APPLICATION_CONTEXT_NAME, our_user_information
from scp.upper_layer import PDU_EVENTS, PDU_HEADER, RELEASE_RQ_PDU, p_data_pdus, pdvs

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
MAX_PDU = 65536
A_ASSOCIATE_AC_PDU, A_ASSOCIATE_RJ_PDU, P_DATA_PDU, A_ABORT_PDU = 0x02, 0x03, 0x04, 0x07

# A-ASSOCIATE-RJ Result and (Source, Reason/Diag.), PS3.8 9.3.4
_RESULTS = {1: "Rejected Permanent", 2: "Rejected Transient"}
_REASONS = {
    (1, 1): "No reason given",
    (1, 2): "Application context name not supported",
    (1, 3): "Calling AE title not recognised",
    (1, 7): "Called AE title not recognised",
    (2, 1): "No reason given",
    (2, 2): "Protocol version not supported",
    (3, 1): "Temporary congestion",
    (3, 2): "Local limit exceeded",
}


class EchoFailed(Exception):
    """The peer could not be reached, said no, or answered something else."""


@dataclass(frozen=True)
class EchoTimes:
    association_ms: float
    echo_ms: float


def echo(host: str, port: int, *, calling: str, called: str, timeout: float) -> EchoTimes:
    """One C-ECHO to `called`@`host`:`port`; EchoFailed with the reason unless
    it is answered Success."""
    peer = f"{called}@{host}:{port}"
    started = time.perf_counter()
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as exc:
        raise EchoFailed(f"cannot resolve {host}: {exc.strerror or exc}") from exc
    except TimeoutError as exc:
        raise EchoFailed(f"no association with {peer} (no answer within {timeout:g} s)") from exc
    except OSError as exc:
        raise EchoFailed(f"cannot connect to {host}:{port}: {exc}") from exc
    with sock:
        link = _Link(sock, host, port, peer, timeout)
        try:
            link.sock.sendall(_associate_request(calling, called))
            peer_max_pdu = link.association_accepted()
            associated = time.perf_counter()
            link.sock.sendall(p_data_pdus(1, dimse.echo_request(1), b"", peer_max_pdu))
            status, comment = link.echo_status()
        except OSError as exc:  # the peer reset or closed the connection under a send
            raise EchoFailed(f"{peer}: {exc}") from exc
        answered = time.perf_counter()
        link.release()
    if status != 0x0000:
        said = f": {comment}" if comment else ""
        raise EchoFailed(f"{peer} answered the C-ECHO with status 0x{status:04X}{said}")
    return EchoTimes((associated - started) * 1000, (answered - associated) * 1000)


def _associate_request(calling: str, called: str) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT_NAME
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context(VERIFICATION, [IMPLICIT_LE])
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    primitive.user_information = our_user_information(MAX_PDU)
    request = A_ASSOCIATE_RQ()
    request.from_primitive(primitive)
    return request.encode()


class _Link:
    """The socket of the association, read one PDU at a time."""

    def __init__(self, sock: socket.socket, host: str, port: int, peer: str, timeout: float):
        self.sock, self.host, self.port, self.peer, self.timeout = sock, host, port, peer, timeout

    def read_pdu(self, on_timeout: str) -> tuple[int, bytes, bytes]:
        """(type, header, body) of the next PDU, or EchoFailed(`on_timeout`). A
        first byte that is no DICOM PDU ends it there: the rest may be a web
        server's page."""
        header = self._read(6, on_timeout)
        if header[0] not in PDU_EVENTS:
            raise EchoFailed(
                f"{self.host}:{self.port} answered something that is not DICOM"
                f" (PDU type '0x{header[0]:02X}')"
            )
        _, length = PDU_HEADER.unpack(header)
        if length > 2 * MAX_PDU:
            raise EchoFailed(f"{self.peer} sent a PDU of {length} bytes, over {MAX_PDU} announced")
        return header[0], header, self._read(length, on_timeout)

    def association_accepted(self) -> int:
        """The peer's maximum PDU length, once Verification is accepted."""
        pdu_type, header, body = self.read_pdu(
            f"no association with {self.peer} (no answer within {self.timeout:g} s)"
        )
        if pdu_type == A_ASSOCIATE_RJ_PDU and len(body) >= 4:
            result = _RESULTS.get(body[1], f"result {body[1]}")
            reason = _REASONS.get((body[2], body[3]), f"source {body[2]}, reason {body[3]}")
            raise EchoFailed(f"{self.peer} rejected the association: {result}; {reason}")
        if pdu_type == A_ABORT_PDU:
            raise EchoFailed(f"{self.peer} aborted the association")
        if pdu_type != A_ASSOCIATE_AC_PDU:
            raise EchoFailed(f"{self.peer} answered the A-ASSOCIATE-RQ with PDU type {pdu_type}")
        accept = A_ASSOCIATE_AC()
        try:
            accept.decode(header + body)
        except Exception as exc:  # pynetdicom raises what the bytes make it raise
            raise EchoFailed(f"{self.peer} sent an A-ASSOCIATE-AC that does not decode") from exc
        if not any(cx.context_id == 1 and cx.result == 0 for cx in accept.presentation_context):
            self.release()
            raise EchoFailed(f"{self.peer} does not accept the Verification SOP Class (C-ECHO)")
        lengths = [
            item.maximum_length_received
            for item in accept.user_information.user_data
            if isinstance(item.to_primitive(), MaximumLengthNotification)
        ]
        return lengths[0] if lengths else 0

    def echo_status(self) -> tuple[int, str]:
        """The C-ECHO-RSP's status and its ErrorComment ("" when none)."""
        command = bytearray()
        while True:
            pdu_type, _, body = self.read_pdu(
                f"{self.peer} did not answer the C-ECHO within {self.timeout:g} s"
            )
            if pdu_type == A_ABORT_PDU:
                raise EchoFailed(f"{self.peer} aborted the association")
            if pdu_type != P_DATA_PDU:
                raise EchoFailed(f"{self.peer} answered the C-ECHO with PDU type {pdu_type}")
            for _, control, fragment in pdvs(body):
                if control & 1:
                    command += fragment
                    if control & 2:
                        response = dimse.read_command(command)
                        if response.status is None:
                            raise EchoFailed(f"{self.peer} answered the C-ECHO without a status")
                        return response.status, response.text(dimse.ERROR_COMMENT)

    def release(self) -> None:
        """A-RELEASE-RQ, and its RP awaited (a peer that closes instead is fine)."""
        try:
            self.sock.sendall(RELEASE_RQ_PDU)
            self.read_pdu("no A-RELEASE-RP")
        except (EchoFailed, OSError):
            pass

    def _read(self, count: int, on_timeout: str) -> bytes:
        data = bytearray()
        while len(data) < count:
            try:
                chunk = self.sock.recv(count - len(data))
            except TimeoutError as exc:
                raise EchoFailed(on_timeout) from exc
            except OSError as exc:
                raise EchoFailed(f"{self.peer}: {exc}") from exc
            if not chunk:
                raise EchoFailed(f"{self.peer} closed the connection")
            data += chunk
        return bytes(data)
