"""The DICOM upper layer (PS3.8 §9), both roles: one socket, one thread.

Read beside PS3.8 §9.2: `State` and `Event` are its states and events, and
each role has its transition table as data, one line per (state, event) the
role can meet, naming PS3.8's action, the method that does it and the next
state: `ACCEPTOR_TRANSITIONS` for the connections we accept,
`REQUESTOR_TRANSITIONS` for the associations we open; the rows both have
(data transfer, the wait for the peer's close) are `SHARED_TRANSITIONS`. A
pair that is not in its table is a bug of ours, not of the peer's: every PDU
the peer can send has a row in every state in which we read from it. The PDU
framing (PDU and PDV headers, P-DATA-TF, A-ABORT, release and reject PDUs) is
written once, for both.

**Acceptor.** `AcceptorLayer.run` reads PDUs with blocking reads and drives
the acceptor's table. Events come from the peer (a PDU, the connection
closing, bytes that are no PDU) or from the local service user
(`ServiceUser`, called in the same thread: accept or reject, P-DATA, the
release response, abort). The service user may also have messages of its own
to send (a C-FIND's responses, one per match): the loop sends them one at a
time, each only when nothing from the peer is waiting, so a C-CANCEL is read
before the next one; they go through the same LOCAL_P_DATA event as every
other message. The acceptor never requests a release itself (the requestor
releases, as storescp and Orthanc's acceptor do), so the requestor-side and
collision states Sta4, Sta5, Sta7 and Sta9-Sta12 never occur there, and an
A-RELEASE-RP from the peer is an unexpected PDU. The ARTIM timer is the
socket's read timeout in Sta2 (waiting for the A-ASSOCIATE-RQ) and Sta13
(waiting for the peer to close after our A-ASSOCIATE-RJ, A-RELEASE-RP or
A-ABORT).

**Requestor** (`imaging-scp echo`, commitment reports on a new association).
`Requestor.associate` connects, sends the A-ASSOCIATE-RQ and returns a
`RequestorAssociation` once the peer accepts; the caller then sends DIMSE
messages and reads the answers (`send`, `receive`), and ends with `release`
or `abort`. Everything runs in the caller's thread on one blocking socket,
each wait within `timeout`. Every way such an association fails is an
`AssociationError` subclass with a message naming the peer: the connection
(`ConnectFailed`), no answer in time (`NoAnswer`), an A-ASSOCIATE-RJ
(`Rejected`, its result, source and reason decoded), an A-ABORT or a dropped
connection (`Aborted`), no accepted context for an abstract syntax
(`NotAccepted`), and bytes that break the protocol (`ProtocolViolation`,
answered with an A-ABORT).

A-ASSOCIATE-RQ and -AC items are encoded and decoded by pynetdicom's PDU
classes, on both sides.
"""

import contextlib
import enum
import mmap
import os
import select
import socket
import ssl
import struct
import time
from dataclasses import dataclass

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import build_context, negotiate_as_requestor

from scp import dimse
from storage.files import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)

# The read buffer, and so the largest PDU we take, is max_pdu but at least
# this: an A-ASSOCIATE-RQ with the maximum 128 presentation contexts, each with
# many transfer syntaxes, stays well below it. A longer PDU is refused unread.
MAX_CONTROL_PDU = 1024 * 1024

# Seconds the peer has to close its side (ARTIM in Sta13) after our RJ or RP,
# and after our A-ABORT: a peer that sent garbage gets little of our time.
CLOSE_TIMEOUT = 5.0
CLOSE_TIMEOUT_AFTER_ABORT = 0.5

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"  # DICOM's, PS3.7 A.2.1

PDU_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")
_P_DATA_HEADER = struct.Struct(">BxIIBB")  # a P-DATA-TF's PDU header and its one PDV's


class State(enum.Enum):
    """PS3.8's states; Sta2, Sta3 and Sta8 are the acceptor's, Sta4, Sta5, Sta7
    and Sta11 the requestor's, the others both sides'."""

    IDLE = "Sta1"
    AWAITING_ASSOCIATE_RQ = "Sta2"
    AWAITING_LOCAL_ASSOCIATE_RESPONSE = "Sta3"
    AWAITING_TRANSPORT_OPEN = "Sta4"
    AWAITING_ASSOCIATE_RESPONSE = "Sta5"
    ESTABLISHED = "Sta6"
    AWAITING_RELEASE_RP = "Sta7"
    AWAITING_LOCAL_RELEASE_RESPONSE = "Sta8"
    COLLISION_AWAITING_RELEASE_RP = "Sta11"
    AWAITING_CLOSE = "Sta13"


class Event(enum.Enum):
    LOCAL_ASSOCIATE_REQUEST = "Evt1"
    TRANSPORT_CONFIRM = "Evt2"
    ASSOCIATE_AC_PDU = "Evt3"
    ASSOCIATE_RJ_PDU = "Evt4"
    ASSOCIATE_RQ_PDU = "Evt6"
    LOCAL_ACCEPT = "Evt7"
    LOCAL_REJECT = "Evt8"
    LOCAL_P_DATA = "Evt9"
    P_DATA_PDU = "Evt10"
    LOCAL_RELEASE_REQUEST = "Evt11"
    RELEASE_RQ_PDU = "Evt12"
    RELEASE_RP_PDU = "Evt13"
    LOCAL_RELEASE_RESPONSE = "Evt14"
    LOCAL_ABORT = "Evt15"
    ABORT_PDU = "Evt16"
    CONNECTION_CLOSED = "Evt17"
    ARTIM_EXPIRED = "Evt18"
    INVALID_PDU = "Evt19"


PDU_EVENTS = {
    0x01: Event.ASSOCIATE_RQ_PDU,
    0x02: Event.ASSOCIATE_AC_PDU,
    0x03: Event.ASSOCIATE_RJ_PDU,
    0x04: Event.P_DATA_PDU,
    0x05: Event.RELEASE_RQ_PDU,
    0x06: Event.RELEASE_RP_PDU,
    0x07: Event.ABORT_PDU,
}

S = State
E = Event
Transitions = dict[tuple[State, Event], tuple[str, str, State]]


def provider_aborts(state: State, *events: Event) -> Transitions:
    """AA-8 for each of `events` in `state`: PDUs the peer may not send there."""
    return {(state, event): ("AA-8", "provider_abort", S.AWAITING_CLOSE) for event in events}


def ends_by_abort_or_close(state: State) -> Transitions:
    """The peer's A-ABORT (AA-3), the connection closing (AA-4) and our own
    A-ABORT (AA-1) in a state of an association, on either side."""
    return {
        (state, E.ABORT_PDU): ("AA-3", "indicate_abort", S.IDLE),
        (state, E.CONNECTION_CLOSED): ("AA-4", "indicate_provider_abort", S.IDLE),
        (state, E.LOCAL_ABORT): ("AA-1", "send_abort", S.AWAITING_CLOSE),
    }


# The rows both sides have (each role's table takes them): data
# transfer in Sta6, and Sta13, awaiting the peer's close after our RJ, RP or
# A-ABORT. Each side adds how a release goes in Sta6.
SHARED_TRANSITIONS: Transitions = {
    (S.ESTABLISHED, E.P_DATA_PDU): ("DT-2", "indicate_p_data", S.ESTABLISHED),
    (S.ESTABLISHED, E.LOCAL_P_DATA): ("DT-1", "send_p_data", S.ESTABLISHED),
    **provider_aborts(S.ESTABLISHED, E.ASSOCIATE_RQ_PDU, E.ASSOCIATE_AC_PDU, E.ASSOCIATE_RJ_PDU, E.RELEASE_RP_PDU, E.INVALID_PDU),  # noqa: E501
    **ends_by_abort_or_close(S.ESTABLISHED),
    (S.AWAITING_CLOSE, E.ASSOCIATE_AC_PDU): ("AA-6", "ignore", S.AWAITING_CLOSE),
    (S.AWAITING_CLOSE, E.ASSOCIATE_RJ_PDU): ("AA-6", "ignore", S.AWAITING_CLOSE),
    (S.AWAITING_CLOSE, E.P_DATA_PDU): ("AA-6", "ignore", S.AWAITING_CLOSE),
    (S.AWAITING_CLOSE, E.RELEASE_RQ_PDU): ("AA-6", "ignore", S.AWAITING_CLOSE),
    (S.AWAITING_CLOSE, E.RELEASE_RP_PDU): ("AA-6", "ignore", S.AWAITING_CLOSE),
    (S.AWAITING_CLOSE, E.ASSOCIATE_RQ_PDU): ("AA-7", "send_abort", S.AWAITING_CLOSE),
    (S.AWAITING_CLOSE, E.INVALID_PDU): ("AA-7", "send_abort", S.AWAITING_CLOSE),
    (S.AWAITING_CLOSE, E.ABORT_PDU): ("AA-2", "close", S.IDLE),
    (S.AWAITING_CLOSE, E.ARTIM_EXPIRED): ("AA-2", "close", S.IDLE),
    (S.AWAITING_CLOSE, E.CONNECTION_CLOSED): ("AR-5", "close", S.IDLE),
}  # fmt: skip

# The acceptor's: (state, event): (PS3.8 action, method of AcceptorLayer, next
# state). An action whose next state depends on what it does returns that
# state instead.
ACCEPTOR_TRANSITIONS: Transitions = {
    # Sta2: transport connection open, awaiting A-ASSOCIATE-RQ
    (S.AWAITING_ASSOCIATE_RQ, E.ASSOCIATE_RQ_PDU): ("AE-6", "indicate_associate", S.AWAITING_LOCAL_ASSOCIATE_RESPONSE),  # noqa: E501
    (S.AWAITING_ASSOCIATE_RQ, E.ASSOCIATE_AC_PDU): ("AA-1", "send_abort", S.AWAITING_CLOSE),
    (S.AWAITING_ASSOCIATE_RQ, E.ASSOCIATE_RJ_PDU): ("AA-1", "send_abort", S.AWAITING_CLOSE),
    (S.AWAITING_ASSOCIATE_RQ, E.P_DATA_PDU): ("AA-1", "send_abort", S.AWAITING_CLOSE),
    (S.AWAITING_ASSOCIATE_RQ, E.RELEASE_RQ_PDU): ("AA-1", "send_abort", S.AWAITING_CLOSE),
    (S.AWAITING_ASSOCIATE_RQ, E.RELEASE_RP_PDU): ("AA-1", "send_abort", S.AWAITING_CLOSE),
    (S.AWAITING_ASSOCIATE_RQ, E.INVALID_PDU): ("AA-1", "send_abort", S.AWAITING_CLOSE),
    (S.AWAITING_ASSOCIATE_RQ, E.ABORT_PDU): ("AA-2", "close", S.IDLE),
    (S.AWAITING_ASSOCIATE_RQ, E.ARTIM_EXPIRED): ("AA-2", "close", S.IDLE),
    (S.AWAITING_ASSOCIATE_RQ, E.CONNECTION_CLOSED): ("AA-5", "close", S.IDLE),
    (S.AWAITING_ASSOCIATE_RQ, E.LOCAL_ABORT): ("AA-2", "close", S.IDLE),  # a stop: nothing to abort yet  # noqa: E501
    # Sta3: awaiting the local A-ASSOCIATE response
    (S.AWAITING_LOCAL_ASSOCIATE_RESPONSE, E.LOCAL_ACCEPT): ("AE-7", "send_pdu", S.ESTABLISHED),
    (S.AWAITING_LOCAL_ASSOCIATE_RESPONSE, E.LOCAL_REJECT): ("AE-8", "send_pdu", S.AWAITING_CLOSE),
    (S.AWAITING_LOCAL_ASSOCIATE_RESPONSE, E.LOCAL_ABORT): ("AA-1", "send_abort", S.AWAITING_CLOSE),
    # Sta6: association established, ready for data transfer (and SHARED_TRANSITIONS)
    (S.ESTABLISHED, E.RELEASE_RQ_PDU): ("AR-2", "indicate_release", S.AWAITING_LOCAL_RELEASE_RESPONSE),  # noqa: E501
    # Sta8: release requested by the peer, awaiting the local A-RELEASE response
    (S.AWAITING_LOCAL_RELEASE_RESPONSE, E.LOCAL_RELEASE_RESPONSE): ("AR-4", "send_pdu", S.AWAITING_CLOSE),  # noqa: E501
    (S.AWAITING_LOCAL_RELEASE_RESPONSE, E.LOCAL_P_DATA): ("AR-7", "send_p_data", S.AWAITING_LOCAL_RELEASE_RESPONSE),  # noqa: E501
    (S.AWAITING_LOCAL_RELEASE_RESPONSE, E.LOCAL_ABORT): ("AA-1", "send_abort", S.AWAITING_CLOSE),
    # Sta13 (and SHARED_TRANSITIONS)
    (S.AWAITING_CLOSE, E.LOCAL_ABORT): ("AA-2", "close", S.IDLE),  # a stop: already ending
    **SHARED_TRANSITIONS,
}  # fmt: skip
# Sta3 and Sta8 last only while the service user answers, in this same thread:
# no PDU is read in them, so they have rows for local events only. The local
# events that Sta13 has no row for are never issued there: the service user is
# only called from the indications above.

# The requestor's: (state, event): (PS3.8 action, method of RequestorAssociation,
# next state).
REQUESTOR_TRANSITIONS: Transitions = {
    # Sta1: idle
    (S.IDLE, E.LOCAL_ASSOCIATE_REQUEST): ("AE-1", "connect", S.AWAITING_TRANSPORT_OPEN),
    # Sta4: awaiting the transport connection
    (S.AWAITING_TRANSPORT_OPEN, E.TRANSPORT_CONFIRM): ("AE-2", "send_pdu", S.AWAITING_ASSOCIATE_RESPONSE),  # noqa: E501
    # Sta5: awaiting A-ASSOCIATE-AC or -RJ
    (S.AWAITING_ASSOCIATE_RESPONSE, E.ASSOCIATE_AC_PDU): ("AE-3", "confirm_accept", S.ESTABLISHED),
    (S.AWAITING_ASSOCIATE_RESPONSE, E.ASSOCIATE_RJ_PDU): ("AE-4", "confirm_reject", S.IDLE),
    **provider_aborts(S.AWAITING_ASSOCIATE_RESPONSE, E.ASSOCIATE_RQ_PDU, E.P_DATA_PDU, E.RELEASE_RQ_PDU, E.RELEASE_RP_PDU, E.INVALID_PDU),  # noqa: E501
    **ends_by_abort_or_close(S.AWAITING_ASSOCIATE_RESPONSE),
    # Sta6: association established (and SHARED_TRANSITIONS)
    (S.ESTABLISHED, E.LOCAL_RELEASE_REQUEST): ("AR-1", "send_pdu", S.AWAITING_RELEASE_RP),
    # The acceptor asks for the release (the upper layer allows it, though
    # DIMSE leaves it to the requestor): answered at once
    # (AR-2, then AR-4), and the caller waiting for a message is told.
    (S.ESTABLISHED, E.RELEASE_RQ_PDU): ("AR-2", "indicate_release", S.AWAITING_CLOSE),
    # Sta7: awaiting A-RELEASE-RP
    (S.AWAITING_RELEASE_RP, E.RELEASE_RP_PDU): ("AR-3", "close", S.IDLE),
    (S.AWAITING_RELEASE_RP, E.P_DATA_PDU): ("AR-6", "ignore", S.AWAITING_RELEASE_RP),  # too late for it  # noqa: E501
    # A release collision: our A-RELEASE-RP at once (AR-8, then AR-9 from Sta9).
    (S.AWAITING_RELEASE_RP, E.RELEASE_RQ_PDU): ("AR-8", "send_release_rp", S.COLLISION_AWAITING_RELEASE_RP),  # noqa: E501
    **provider_aborts(S.AWAITING_RELEASE_RP, E.ASSOCIATE_RQ_PDU, E.ASSOCIATE_AC_PDU, E.ASSOCIATE_RJ_PDU, E.INVALID_PDU),  # noqa: E501
    **ends_by_abort_or_close(S.AWAITING_RELEASE_RP),
    # Sta11: release collision, our RP sent, awaiting the peer's
    (S.COLLISION_AWAITING_RELEASE_RP, E.RELEASE_RP_PDU): ("AR-3", "close", S.IDLE),
    **provider_aborts(S.COLLISION_AWAITING_RELEASE_RP, E.ASSOCIATE_RQ_PDU, E.ASSOCIATE_AC_PDU, E.ASSOCIATE_RJ_PDU, E.P_DATA_PDU, E.RELEASE_RQ_PDU, E.INVALID_PDU),  # noqa: E501
    **ends_by_abort_or_close(S.COLLISION_AWAITING_RELEASE_RP),
    # Sta13: awaiting the peer's close after our A-ABORT or RP (SHARED_TRANSITIONS)
    **SHARED_TRANSITIONS,
}  # fmt: skip
# Sta4 has no PDU rows: the connection opens (or fails) within AE-1. Sta8 and
# Sta9 are passed through within one action (AR-2 then AR-4; AR-8 then AR-9);
# Sta10 and Sta12 are the acceptor's side of a release collision.


# A-ABORT sources and reasons (PS3.8 9.3.8)
ABORT_SOURCE_USER = 0x00
ABORT_SOURCE_PROVIDER = 0x02
REASON_NOT_SPECIFIED = 0x00
REASON_UNRECOGNIZED_PDU = 0x01
REASON_UNEXPECTED_PDU = 0x02
REASON_INVALID_PARAMETER = 0x06


def abort_pdu(source: int, reason: int) -> bytes:
    return bytes((0x07, 0, 0, 0, 0, 4, 0, 0, source, reason))


def reject_pdu(result: int, source: int, diagnostic: int) -> bytes:
    return bytes((0x03, 0, 0, 0, 0, 4, 0, result, source, diagnostic))


RELEASE_RQ_PDU = bytes((0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0))  # the requestor's
RELEASE_RP_PDU = bytes((0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0))


def our_user_information(max_pdu: int) -> list:
    """The User Information items we send either way: the largest PDU we take,
    and who we are."""
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return [length, implementation, version]


class ProtocolError(Exception):
    """A P-DATA whose content breaks the rules of the DIMSE layer: the service
    user raises it, the upper layer aborts (AA-8)."""


# -- the acceptor ----------------------------------------------------------------------


@dataclass(frozen=True)
class Abort:
    """How an association was aborted, for the service user's log."""

    by: str  # "peer", "us" or "connection" (closed or failed without an A-ABORT)
    reason: str


class ServiceUser:
    """What the upper layer tells the service above it, in its own thread."""

    def associate_requested(self, layer: "AcceptorLayer", pdu: bytes) -> None:
        """`pdu` is the whole A-ASSOCIATE-RQ PDU. Must end with layer.accept(...),
        layer.reject(...) or layer.abort(...)."""
        raise NotImplementedError

    def p_data(self, layer: "AcceptorLayer", context_id: int, control: int, fragment) -> None:
        """One PDV. `fragment` is a memoryview valid until the call returns.
        Raises ProtocolError for a PDV the DIMSE layer cannot take."""
        raise NotImplementedError

    def released(self) -> None: ...

    def aborted(self, abort: Abort) -> None: ...

    def has_output(self) -> bool:
        """Whether the user has messages of its own to send (a query's
        responses): the layer asks for them one at a time, between reads."""
        return False

    def send_output(self, layer: "AcceptorLayer") -> None:
        """Send the next of those messages (with layer.send_message)."""


def lazily_mapped(size: int) -> mmap.mmap:
    """`size` zero bytes, writable, whose pages the kernel maps as each is first
    written: bytearray(size) zero-fills every page at once (0.3 to 1 ms a
    megabyte), for an association that may use a few kilobytes of it."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)


class ReceiveBuffer:
    """What the peer has sent and was not taken yet, in one buffer kept for the
    connection (both roles). Each read from the socket takes what has arrived,
    up to the buffer's end: a small C-STORE's command and dataset PDUs, or a
    C-STORE-RSP's header and body, come in one read; a large message's PDUs a
    buffer at a time."""

    def __init__(self, size: int):
        self.buffer = lazily_mapped(size)
        self.view = memoryview(self.buffer)
        self.start = self.end = 0  # the bytes received and not yet taken

    def read_exactly(self, sock: socket.socket, count: int) -> memoryview | None:
        """The next `count` bytes (at most the buffer's size), valid until the
        next read; None when the peer closes first."""
        start = self.start
        if self.end - start < count:
            if start + count > len(self.buffer):  # make room: what is left goes first
                left = self.end - start
                self.view[:left] = self.view[start : self.end]
                start, self.end = 0, left
            while self.end - start < count:
                _ack_at_once(sock)
                got = sock.recv_into(self.view[self.end :])
                if got == 0:
                    return None
                self.end += got
        self.start = start + count
        return self.view[start : start + count]

    def release(self) -> None:
        self.view.release()
        self.view = self.buffer = None


def set_kernel_timeout(sock: socket.socket, seconds: float) -> None:
    """Bound each read and each write of a plain socket in blocking mode by
    `seconds` (SO_RCVTIMEO, SO_SNDTIMEO): one that waits longer fails with
    BlockingIOError. Python's own timeout would poll() before every call."""
    micro = max(1, round(seconds * 1_000_000))  # 0 would be no bound at all
    value = struct.pack("ll", *divmod(micro, 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def _ack_at_once(sock: socket.socket) -> None:
    """Before each read, in both roles. Linux turns quick ACKs off again by
    itself; re-armed before each read, the kernel ACKs what arrives at once,
    while the reading thread is still waking: a Nagle-on peer (a modality's
    storescu, dcmtk's storescp writing a C-STORE-RSP in two pieces) never waits
    40 ms for our delayed ACK to send its next segment."""
    if _TCP_QUICKACK is not None:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)


class AcceptorLayer:
    """The upper layer of one accepted connection."""

    def __init__(
        self,
        sock: socket.socket,
        user: ServiceUser,
        *,
        max_pdu: int,
        artim_timeout: float,
        network_timeout: float,
    ):
        self.sock = sock
        self.user = user
        self.artim_timeout = artim_timeout
        self.network_timeout = network_timeout
        self.state = State.AWAITING_ASSOCIATE_RQ
        self.peer_max_pdu = 0  # what the peer receives: 0 = no limit
        # max_pdu: the P-DATA-TF variable field we announced we receive.
        self._received = ReceiveBuffer(max(max_pdu, MAX_CONTROL_PDU))
        # A plain socket waits in the kernel (SO_RCVTIMEO): Python's own timeout
        # would add a poll() before every read. An SSLSocket keeps Python's.
        self._kernel_timeouts = not isinstance(sock, ssl.SSLSocket)
        if self._kernel_timeouts:
            sock.settimeout(None)
        self._stop_requested = False
        self._abort_reason = REASON_NOT_SPECIFIED
        self._readable = select.poll()  # has the peer sent something? (without reading)
        self._readable.register(sock, select.POLLIN)

    # -- the state machine ---------------------------------------------------------

    def run(self) -> None:
        """Serve the connection until it is closed."""
        self._set_timeout(self.artim_timeout)
        user = self.user
        try:
            while self.state is not State.IDLE:
                # The user's own messages go out one at a time, each only when
                # nothing from the peer is waiting: a C-CANCEL is read before the
                # next response. Otherwise: block until the peer sends.
                if (
                    self.state is State.ESTABLISHED
                    and user.has_output()
                    and not self._input_waiting()
                ):
                    user.send_output(self)
                    continue
                self.handle(*self._next_event())
        finally:
            self._close_socket()
            # The buffer goes now, not when the garbage collector gets to the
            # association (it and this layer refer to each other): the soak saw
            # a megabyte per association kept for ~32 associations otherwise.
            self._received.release()

    def handle(self, event: Event, detail=None) -> None:
        """Take one event: run its action and enter the next state (or the one
        the action returns). An action may raise local events itself."""
        previous = self.state
        _, action, self.state = ACCEPTOR_TRANSITIONS[previous, event]
        override = getattr(self, action)(previous, event, detail)
        if override is not None:
            self.state = override

    def _next_event(self) -> tuple[Event, object]:
        """The next event from the peer (or a stop), with its PDU or a reason."""
        if self._stop_requested:
            return Event.LOCAL_ABORT, "the service is stopping"
        try:
            header = self._received.read_exactly(self.sock, 6)
            if header is None:
                return self._closed()
            kind, length = PDU_HEADER.unpack_from(header)
            event = PDU_EVENTS.get(kind)
            if event is None or length > len(self._received.buffer):
                self._abort_reason = (
                    REASON_UNRECOGNIZED_PDU if event is None else REASON_INVALID_PARAMETER
                )
                return Event.INVALID_PDU, f"PDU type 0x{kind:02X} of length {length}"
            body = self._received.read_exactly(self.sock, length)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO expired
            if self.state in (State.AWAITING_ASSOCIATE_RQ, State.AWAITING_CLOSE):
                return Event.ARTIM_EXPIRED, None
            return Event.LOCAL_ABORT, f"no data for {self.network_timeout:g} s"
        except OSError as exc:
            return self._closed(exc)
        if body is None:
            return self._closed()
        return event, body

    def _closed(self, error: OSError | None = None) -> tuple[Event, object]:
        if self._stop_requested:
            return Event.LOCAL_ABORT, "the service is stopping"
        if error is None:
            return Event.CONNECTION_CLOSED, "connection closed without release"
        return Event.CONNECTION_CLOSED, f"connection failed: {error.strerror or error}"

    def _set_timeout(self, seconds: float) -> None:
        if not self._kernel_timeouts:
            self.sock.settimeout(seconds)
            return
        set_kernel_timeout(self.sock, seconds)

    # -- actions (PS3.8 tables 9-6 to 9-9) -------------------------------------------

    def indicate_associate(self, previous, event, pdu) -> None:
        self._set_timeout(self.network_timeout)  # ARTIM stopped
        self.user.associate_requested(self, PDU_HEADER.pack(0x01, len(pdu)) + pdu)
        if self.state is State.AWAITING_LOCAL_ASSOCIATE_RESPONSE:
            raise RuntimeError("the service user neither accepted nor rejected")

    def indicate_p_data(self, previous, event, pdu) -> State | None:
        try:
            for context_id, control, fragment in pdvs(pdu):
                self.user.p_data(self, context_id, control, fragment)
                if self.state is not State.ESTABLISHED:  # the user aborted
                    return None
        except ProtocolError as exc:
            self._abort_reason = REASON_INVALID_PARAMETER
            return self.provider_abort(previous, Event.INVALID_PDU, str(exc))
        return None

    def indicate_release(self, previous, event, pdu) -> None:
        self.user.released()
        self.handle(Event.LOCAL_RELEASE_RESPONSE, RELEASE_RP_PDU)

    def indicate_abort(self, previous, event, pdu) -> None:
        self.user.aborted(Abort("peer", "A-ABORT from the peer"))
        self._close_socket()

    def indicate_provider_abort(self, previous, event, reason) -> None:
        self.user.aborted(Abort("connection", reason))
        self._close_socket()

    def provider_abort(self, previous, event, detail) -> State:
        """AA-8: A-ABORT to the peer (from the provider), A-P-ABORT to the user."""
        reason = self._abort_reason or REASON_UNEXPECTED_PDU
        self._send_abort(ABORT_SOURCE_PROVIDER, reason)
        what = (
            detail if isinstance(detail, str) else f"unexpected {event.value} in {previous.value}"
        )
        self.user.aborted(Abort("us", what))
        return State.AWAITING_CLOSE

    def send_abort(self, previous, event, detail) -> None:
        """AA-1 / AA-7: A-ABORT to the peer."""
        if event is Event.LOCAL_ABORT:
            self._send_abort(ABORT_SOURCE_USER, REASON_NOT_SPECIFIED)
            if previous in (State.ESTABLISHED, State.AWAITING_LOCAL_RELEASE_RESPONSE):
                self.user.aborted(Abort("us", detail or "aborted by the receiver"))
        else:
            self._send_abort(ABORT_SOURCE_PROVIDER, self._abort_reason or REASON_UNEXPECTED_PDU)

    def send_pdu(self, previous, event, pdu) -> None:
        self._send(pdu)
        if self.state is State.AWAITING_CLOSE:  # our RJ or RP: ARTIM started
            self._set_timeout(min(self.network_timeout, CLOSE_TIMEOUT))

    def send_p_data(self, previous, event, buffers) -> None:
        # The peer may be gone: the next read tells the state machine.
        with contextlib.suppress(OSError):
            send_buffers(self.sock, buffers)

    def ignore(self, previous, event, pdu) -> None:
        pass

    def close(self, previous, event, detail) -> None:
        self._close_socket()

    # -- what the service user calls --------------------------------------------------

    def accept(self, pdu: bytes, peer_max_pdu: int) -> None:
        self.peer_max_pdu = peer_max_pdu
        self.handle(Event.LOCAL_ACCEPT, pdu)

    def reject(self, result: int, source: int, diagnostic: int) -> None:
        self.handle(Event.LOCAL_REJECT, reject_pdu(result, source, diagnostic))

    def abort(self, reason: str) -> None:
        """A-ABORT from the local user (a request it cannot answer)."""
        self.handle(Event.LOCAL_ABORT, reason)

    def send_message(self, context_id: int, command: bytes, dataset: bytes = b"") -> None:
        """A DIMSE message as P-DATA-TF PDUs within the peer's maximum length."""
        self.handle(
            Event.LOCAL_P_DATA, [p_data_pdus(context_id, command, dataset, self.peer_max_pdu)]
        )

    def send_message_from(self, context_id: int, command: bytes, pieces, length: int) -> None:
        """A DIMSE message whose `length`-byte data set comes as `pieces`, sent
        a piece at a time (`streamed_p_data_pdus`)."""
        for buffers in streamed_p_data_pdus(context_id, command, pieces, length, self.peer_max_pdu):
            self.handle(Event.LOCAL_P_DATA, buffers)
            if self.state is not State.ESTABLISHED:
                return

    def _input_waiting(self) -> bool:
        received = self._received
        return received.end > received.start or self._stop_requested or self._arrives_within(0)

    def peer_is_leaving(self, wait: float) -> bool:
        """Whether the peer's next PDU, arriving within `wait` seconds, is an
        A-RELEASE-RQ or an A-ABORT (or it closed): it has no use for this
        association any more. The PDU is left to be read as usual."""
        received = self._received
        if received.end > received.start:
            kind = received.buffer[received.start]
        else:
            received.start = received.end = 0
            if not self._arrives_within(wait):
                return False
            try:
                kind = self._first_byte_waiting()
            except (BlockingIOError, ssl.SSLWantReadError):  # not a whole TLS record yet
                return False
            except OSError:
                return True
            if kind is None:
                return True
        return PDU_EVENTS.get(kind) in (Event.RELEASE_RQ_PDU, Event.ABORT_PDU)

    def _arrives_within(self, wait: float) -> bool:
        if not self._kernel_timeouts and self.sock.pending():
            return True
        return bool(self._readable.poll(wait * 1000))

    def _first_byte_waiting(self) -> int | None:
        """The first byte that has arrived, left to be read (None: the peer
        closed). A plain socket is peeked at; TLS records cannot be, so what
        has arrived is read into the buffer, where the next read takes it."""
        if self._kernel_timeouts:
            waiting = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            return waiting[0] if waiting else None
        self.sock.settimeout(0)
        try:
            self._received.end = self.sock.recv_into(self._received.view)
        finally:
            self.sock.settimeout(self.network_timeout)
        return self._received.buffer[0] if self._received.end else None

    def request_stop(self) -> None:
        """From another thread: end this connection now. Its own thread wakes
        from its read, sends an A-ABORT where the state has one, and closes."""
        self._stop_requested = True
        # The base class's shutdown: an SSLSocket's own would tear down the TLS
        # session under the thread that is reading from it.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RD)

    def _send_abort(self, source: int, reason: int) -> None:
        """A-ABORT, then our side of the connection closed: nothing follows it."""
        self._send(abort_pdu(source, reason))
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_WR)
        self._set_timeout(min(self.network_timeout, CLOSE_TIMEOUT_AFTER_ABORT))

    def _send(self, data: bytes) -> None:
        # The peer may be gone: the next read tells the state machine.
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def _close_socket(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# -- both: P-DATA framing --------------------------------------------------------------


def pdvs(body):
    """(context ID, message control header, fragment) of each PDV of a P-DATA-TF."""
    end = len(body)
    pos = 0
    if end == 0:
        raise ProtocolError("P-DATA-TF without a PDV")
    while pos < end:
        if end - pos < 6:
            raise ProtocolError("P-DATA-TF ends inside a PDV header")
        length, context_id, control = _PDV_HEADER.unpack_from(body, pos)
        if length < 2 or pos + 4 + length > end:
            raise ProtocolError(f"PDV length {length} does not fit its PDU")
        yield context_id, control, body[pos + 6 : pos + 4 + length]
        pos += 4 + length


def p_data_pdus(context_id: int, command: bytes, dataset: bytes, peer_max_pdu: int) -> bytes:
    """The P-DATA-TF PDUs of one DIMSE message, one PDV each, each within the
    peer's maximum length (0: no limit)."""
    # A peer announcing less than a few hundred bytes is broken, not frugal.
    chunk = max(peer_max_pdu - 6, 256) if peer_max_pdu else max(len(command), len(dataset), 1)
    out = bytearray()
    for data, command_bit in ((command, 1), (dataset, 0)):
        if command_bit == 0 and not data:
            break
        for start in range(0, len(data), chunk):
            piece = data[start : start + chunk]
            last = 2 if start + chunk >= len(data) else 0
            out += PDU_HEADER.pack(0x04, len(piece) + 6)
            out += _PDV_HEADER.pack(len(piece) + 2, context_id, command_bit | last)
            out += piece
    return bytes(out)


# The largest PDU we send when the peer takes PDUs of any length.
_UNLIMITED_PDU = 256 * 1024
# How many buffers one sendmsg takes (Linux's UIO_MAXIOV).
_IOV_MAX = os.sysconf("SC_IOV_MAX")


def streamed_p_data_pdus(context_id: int, command: bytes, pieces, length: int, peer_max_pdu: int):
    """The P-DATA-TF PDUs of one DIMSE message whose data set is `length`
    bytes that come as `pieces` (buffers, in order, each valid until the next
    is taken): per piece, the buffers that make up its PDUs, each within the
    peer's maximum length: headers and slices of the piece, nothing copied, to
    go out together (`send_buffers`). The command's PDUs go with the first.
    OSError when the pieces end early."""
    chunk = max(peer_max_pdu - 6, 256) if peer_max_pdu else _UNLIMITED_PDU
    buffers = [p_data_pdus(context_id, command, b"", peer_max_pdu)]
    left = length
    for piece in pieces:
        for start in range(0, len(piece), chunk):
            part = piece[start : start + chunk]
            left -= len(part)
            buffers.append(
                _P_DATA_HEADER.pack(
                    0x04, len(part) + 6, len(part) + 2, context_id, 0 if left else 2
                )
            )
            buffers.append(part)
        yield buffers
        buffers = []
    if left > 0:
        raise OSError(f"the file ends {left} bytes early")
    if buffers:  # no piece came (no data set): the command alone
        yield buffers


def send_buffers(sock: socket.socket, buffers: list) -> None:
    """sendall of the buffers one after the other: gathered by sendmsg, as
    many at a time as it takes (TLS has no sendmsg: joined there)."""
    if isinstance(sock, ssl.SSLSocket):
        sock.sendall(b"".join(buffers))
        return
    first, end = 0, len(buffers)
    while first < end:
        sent = sock.sendmsg(buffers[first : first + _IOV_MAX])
        while first < end and sent >= len(buffers[first]):
            sent -= len(buffers[first])
            first += 1
        if sent:  # the rest of a buffer sent in part (a timeout, a signal)
            buffers[first] = memoryview(buffers[first])[sent:]


# -- the requestor ---------------------------------------------------------------------

REQUESTOR_MAX_PDU = 65536  # the P-DATA-TF variable field we announce we receive as requestor

# A-ASSOCIATE-RJ Result and (Source, Reason/Diag.), PS3.8 9.3.4
REJECT_RESULTS = {1: "Rejected Permanent", 2: "Rejected Transient"}
REJECT_REASONS = {
    (1, 1): "No reason given",
    (1, 2): "Application context name not supported",
    (1, 3): "Calling AE title not recognised",
    (1, 7): "Called AE title not recognised",
    (2, 1): "No reason given",
    (2, 2): "Protocol version not supported",
    (3, 1): "Temporary congestion",
    (3, 2): "Local limit exceeded",
}
# A-ABORT Source and Reason/Diag. (PS3.8 9.3.8)
ABORT_SOURCES = {0: "service-user", 2: "service-provider"}
ABORT_REASONS = {
    0: "reason not specified",
    1: "unrecognized PDU",
    2: "unexpected PDU",
    4: "unrecognized PDU parameter",
    5: "unexpected PDU parameter",
    6: "invalid PDU parameter value",
}


class AssociationError(Exception):
    """An association of ours that could not be opened, or broke; the message
    names the peer and what happened."""


class ConnectFailed(AssociationError):
    """No TCP connection: the name does not resolve, or nothing listens."""


class NoAnswer(AssociationError):
    """The peer did not answer within the timeout (we aborted)."""


class Rejected(AssociationError):
    """An A-ASSOCIATE-RJ."""

    def __init__(self, peer: str, result: int, source: int, reason: int):
        self.result, self.source, self.reason = result, source, reason
        said = REJECT_RESULTS.get(result, f"result {result}")
        why = REJECT_REASONS.get((source, reason), f"source {source}, reason {reason}")
        super().__init__(f"{peer} rejected the association: {said}; {why}")


class Aborted(AssociationError):
    """An A-ABORT from the peer (`source`, `reason` as sent), or the connection
    closed under the association (both None)."""

    def __init__(self, message: str, source: int | None = None, reason: int | None = None):
        self.source, self.reason = source, reason
        super().__init__(message)


class NotAccepted(AssociationError):
    """The peer accepted no presentation context (in the role we asked for)
    for an abstract syntax."""


class ProtocolViolation(AssociationError):
    """The peer sent what PS3.8 does not allow where it did (we aborted)."""


@dataclass(frozen=True)
class Proposal:
    """One presentation context to propose; `scp_role`: ask to be its SCP
    (SCP/SCU role selection, as a storage commitment report's sender is)."""

    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]
    scp_role: bool = False


@dataclass(frozen=True)
class AcceptedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntax: str


@dataclass(frozen=True)
class Message:
    """A DIMSE message received: its command set, and its dataset (None if it has none)."""

    context_id: int
    command: dimse.Command
    dataset: bytes | None


class Requestor:
    """Opens associations as `calling_ae`, each wait within `timeout` seconds."""

    def __init__(self, calling_ae: str, *, timeout: float, max_pdu: int = REQUESTOR_MAX_PDU):
        self.calling_ae = calling_ae
        self.timeout = timeout
        self.max_pdu = max_pdu

    def associate(
        self, host: str, port: int, called_ae: str, proposals: list[Proposal]
    ) -> "RequestorAssociation":
        """An established association with `called_ae` at `host`:`port`, or an
        AssociationError saying why not."""
        association = RequestorAssociation(self, host, port, called_ae, proposals)
        association.handle(Event.LOCAL_ASSOCIATE_REQUEST)
        while association.state is not State.ESTABLISHED:
            association.handle(*association.next_event())
        return association


class RequestorAssociation:
    """One association we requested; its own methods are PS3.8's actions."""

    def __init__(self, requestor, host: str, port: int, called_ae: str, proposals):
        self.host, self.port, self.called_ae = host, port, called_ae
        self.peer = f"{called_ae}@{host}:{port}"
        self.calling_ae = requestor.calling_ae
        self.timeout = requestor.timeout
        self.max_pdu = requestor.max_pdu
        self.proposals = proposals
        self.state = State.IDLE
        self.sock: socket.socket | None = None
        self.peer_max_pdu = 0  # what the peer receives: 0 = no limit
        self.contexts: list[AcceptedContext] = []
        self._abort_reason = REASON_UNEXPECTED_PDU
        # The largest PDU we take (`next_event`); its pages are mapped as used.
        self._received = ReceiveBuffer(max(self.max_pdu, MAX_CONTROL_PDU))
        self._command = bytearray()  # the fragments of the message being received
        self._received_command: dimse.Command | None = None  # its command, once whole
        self._dataset = bytearray()
        self._message: Message | None = None

    def __enter__(self) -> "RequestorAssociation":
        return self

    def __exit__(self, *exc_info) -> None:
        """Released when still established, whether the work went well or not."""
        if self.state is State.ESTABLISHED:
            # The exchange has succeeded or failed already: how the release
            # goes changes neither (the peer closing instead is common).
            with contextlib.suppress(AssociationError):
                self.release()

    # -- what the caller calls ------------------------------------------------------

    def context(self, abstract_syntax: str) -> AcceptedContext:
        """The accepted context for `abstract_syntax` (in the role proposed);
        NotAccepted when there is none."""
        for context in self.contexts:
            if context.abstract_syntax == abstract_syntax:
                return context
        raise NotAccepted(f"{self.peer} does not accept the {UID(abstract_syntax).name}")

    def send(self, context: AcceptedContext, command: bytes, dataset: bytes = b"") -> None:
        """One DIMSE message as P-DATA-TF PDUs within the peer's maximum length."""
        self.handle(
            Event.LOCAL_P_DATA,
            [p_data_pdus(context.context_id, command, dataset, self.peer_max_pdu)],
        )

    def send_from(self, context: AcceptedContext, command: bytes, pieces, length: int) -> None:
        """One DIMSE message whose `length`-byte data set comes as `pieces`,
        sent a piece at a time (`streamed_p_data_pdus`)."""
        for buffers in streamed_p_data_pdus(
            context.context_id, command, pieces, length, self.peer_max_pdu
        ):
            self.handle(Event.LOCAL_P_DATA, buffers)

    def receive(self) -> Message:
        """The next whole DIMSE message from the peer."""
        while self._message is None:
            self.handle(*self.next_event())
        message, self._message = self._message, None
        return message

    def release(self) -> None:
        """A-RELEASE-RQ, and the peer's A-RELEASE-RP awaited; a peer that closes
        the connection instead has released too."""
        self.handle(Event.LOCAL_RELEASE_REQUEST, RELEASE_RQ_PDU)
        try:
            while self.state is not State.IDLE:
                self.handle(*self.next_event())
        except Aborted as exc:
            if exc.source is not None:  # an A-ABORT, not a close
                raise

    def abort(self) -> None:
        """A-ABORT from us (the caller has no use for the association any more)."""
        if (self.state, Event.LOCAL_ABORT) in REQUESTOR_TRANSITIONS:
            self.handle(Event.LOCAL_ABORT)

    # -- the state machine ----------------------------------------------------------

    def handle(self, event: Event, detail=None) -> None:
        """Take one event: enter the next state and run its action, which may
        raise the AssociationError the caller is to see."""
        previous = self.state
        _, action, self.state = REQUESTOR_TRANSITIONS[previous, event]
        getattr(self, action)(previous, event, detail)

    def next_event(self) -> tuple[Event, object]:
        """The next event from the peer: a PDU (its body), a close (its
        OSError), bytes that are no PDU (why), or the timeout."""
        try:
            header = self._read_exactly(PDU_HEADER.size)
            kind, length = PDU_HEADER.unpack(header)
            event = PDU_EVENTS.get(kind)
            if event is None:
                self._abort_reason = REASON_UNRECOGNIZED_PDU
                # The rest may be a web server's page: the first byte says enough.
                return Event.INVALID_PDU, (
                    f"{self.host}:{self.port} answered something that is not DICOM"
                    f" (PDU type '0x{kind:02X}')"
                )
            limit = len(self._received.buffer)
            if length > limit:
                self._abort_reason = REASON_INVALID_PARAMETER
                return Event.INVALID_PDU, (
                    f"{self.peer} sent a PDU of {length} bytes, over the {limit} we take"
                )
            return event, self._read_exactly(length)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO expired
            if self.state is State.AWAITING_CLOSE:
                return Event.ARTIM_EXPIRED, None
            return Event.LOCAL_ABORT, NoAnswer(self._no_answer())
        except OSError as exc:  # closed under us, or reset
            return Event.CONNECTION_CLOSED, exc

    def _no_answer(self) -> str:
        if self.state is State.AWAITING_ASSOCIATE_RESPONSE:
            return f"no association with {self.peer} (no answer within {self.timeout:g} s)"
        if self.state is State.ESTABLISHED:
            return f"{self.peer} did not answer within {self.timeout:g} s"
        return f"{self.peer} did not answer the A-RELEASE-RQ within {self.timeout:g} s"

    def _read_exactly(self, count: int) -> memoryview:
        """The next `count` bytes, valid until the next read (each PDU's action
        takes what it keeps); ConnectionError when the peer closes first."""
        got = self._received.read_exactly(self.sock, count)
        if got is None:
            raise ConnectionError("connection closed")
        return got

    # -- actions (PS3.8 tables 9-6 to 9-9) --------------------------------------------

    def connect(self, previous, event, detail) -> None:
        """AE-1: the transport connection, then AE-2 on its confirmation."""
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except socket.gaierror as exc:
            self.state = State.IDLE
            raise ConnectFailed(f"cannot resolve {self.host}: {exc.strerror or exc}") from exc
        except TimeoutError as exc:
            self.state = State.IDLE
            raise NoAnswer(
                f"no association with {self.peer} (no answer within {self.timeout:g} s)"
            ) from exc
        except OSError as exc:
            self.state = State.IDLE
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        # As on the connections we accept: a data set's last, short PDU goes out
        # at once instead of waiting for the ACK of the one before (a move's
        # sub-operations are a stream of such messages).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)
        set_kernel_timeout(self.sock, self.timeout)
        self.handle(Event.TRANSPORT_CONFIRM, self._associate_request())

    def _associate_request(self) -> bytes:
        primitive = A_ASSOCIATE()
        primitive.application_context_name = APPLICATION_CONTEXT_NAME
        primitive.calling_ae_title = self.calling_ae
        primitive.called_ae_title = self.called_ae
        primitive.presentation_context_definition_list = self._proposed_contexts()
        information = our_user_information(self.max_pdu)
        for proposal in self.proposals:
            if proposal.scp_role:
                role = SCP_SCU_RoleSelectionNegotiation()
                role.sop_class_uid = proposal.abstract_syntax
                role.scu_role, role.scp_role = False, True
                information.append(role)
        primitive.user_information = information
        request = A_ASSOCIATE_RQ()
        request.from_primitive(primitive)
        return request.encode()

    def _proposed_contexts(self) -> list:
        contexts = []
        for number, proposal in enumerate(self.proposals):
            context = build_context(proposal.abstract_syntax, list(proposal.transfer_syntaxes))
            context.context_id = 2 * number + 1
            if proposal.scp_role:
                context.scu_role, context.scp_role = False, True
            contexts.append(context)
        return contexts

    def confirm_accept(self, previous, event, body: bytes) -> None:
        """AE-3: the A-ASSOCIATE-AC read: the accepted contexts (in the roles
        proposed) and the peer's maximum PDU length."""
        accept = A_ASSOCIATE_AC()
        try:
            accept.decode(PDU_HEADER.pack(0x02, len(body)) + body)
            primitive = accept.to_primitive()
            roles = {}
            for item in primitive.user_information:
                if isinstance(item, MaximumLengthNotification):
                    self.peer_max_pdu = item.maximum_length_received or 0
                elif isinstance(item, SCP_SCU_RoleSelectionNegotiation):
                    roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
            results = negotiate_as_requestor(
                self._proposed_contexts(),
                primitive.presentation_context_definition_results_list,
                roles,
            )
        except Exception:  # pynetdicom raises what the bytes make it raise
            self._invalid_content(
                previous, f"{self.peer} sent an A-ASSOCIATE-AC that does not decode"
            )
        wanted = {p.abstract_syntax: p.scp_role for p in self.proposals}
        self.contexts = [
            AcceptedContext(cx.context_id, cx.abstract_syntax, cx.transfer_syntax[0])
            for cx in results
            if cx.result == 0x00 and (cx.as_scp if wanted[cx.abstract_syntax] else cx.as_scu)
        ]

    def confirm_reject(self, previous, event, body: bytes) -> None:
        """AE-4: the A-ASSOCIATE-RJ, decoded."""
        self._close()
        if len(body) < 4:
            raise ProtocolViolation(f"{self.peer} sent an A-ASSOCIATE-RJ of {len(body)} bytes")
        raise Rejected(self.peer, body[1], body[2], body[3])

    def send_pdu(self, previous, event, pdu: bytes) -> None:
        self.send_p_data(previous, event, [pdu])

    def send_p_data(self, previous, event, buffers: list) -> None:
        try:
            send_buffers(self.sock, buffers)
        except BlockingIOError as exc:  # SO_SNDTIMEO expired
            self.state = State.IDLE
            self._close()
            raise NoAnswer(f"{self.peer} took nothing we sent for {self.timeout:g} s") from exc
        except OSError as exc:  # the peer reset or closed the connection
            self.state = State.IDLE
            self._close()
            raise Aborted(f"{self.peer}: {exc}") from exc

    def send_release_rp(self, previous, event, body) -> None:
        self.send_pdu(previous, event, RELEASE_RP_PDU)

    def indicate_p_data(self, previous, event, body: bytes) -> None:
        """DT-2: the PDVs, gathered into a message; the message once whole."""
        try:
            for context_id, control, fragment in pdvs(body):
                if self._message is not None:  # one message at a time: we asked one thing
                    raise ProtocolError("a PDV after a whole message, before it was read")
                if control & 1:
                    if self._received_command is not None:
                        raise ProtocolError("a command PDV where its dataset was due")
                    self._command += fragment
                    if control & 2:
                        self._received_command = dimse.read_command(self._command)
                        if not self._received_command.has_dataset:
                            self._complete(context_id, None)
                else:
                    if self._received_command is None:
                        raise ProtocolError("a dataset PDV before its command")
                    self._dataset += fragment
                    if control & 2:
                        self._complete(context_id, bytes(self._dataset))
        except (ProtocolError, dimse.CommandError) as exc:
            self._invalid_content(
                previous, f"{self.peer} sent a P-DATA-TF that breaks DIMSE: {exc}"
            )

    def _invalid_content(self, previous: State, why: str) -> None:
        """A PDU whose content its action finds invalid: taken as an invalid PDU
        in the state it came in (AA-8, which raises ProtocolViolation)."""
        self._abort_reason = REASON_INVALID_PARAMETER
        self.state = previous
        self.handle(Event.INVALID_PDU, why)

    def _complete(self, context_id: int, dataset: bytes | None) -> None:
        self._message = Message(context_id, self._received_command, dataset)
        self._command, self._dataset, self._received_command = bytearray(), bytearray(), None

    def indicate_release(self, previous, event, body) -> None:
        """AR-2: the peer asks for the release; our A-RELEASE-RP (AR-4) at once."""
        self.send_pdu(previous, event, RELEASE_RP_PDU)
        self._await_close(CLOSE_TIMEOUT)
        raise Aborted(f"{self.peer} released the association before answering")

    def indicate_abort(self, previous, event, body: bytes) -> None:
        """AA-3: the peer's A-ABORT, its source and reason decoded."""
        self._close()
        source, reason = (body[2], body[3]) if len(body) >= 4 else (0, 0)
        said = ABORT_SOURCES.get(source, f"source {source}")
        why = ABORT_REASONS.get(reason, f"reason {reason}")
        raise Aborted(f"{self.peer} aborted the association ({said}, {why})", source, reason)

    def indicate_provider_abort(self, previous, event, error: OSError) -> None:
        """AA-4: the connection closed or failed under the association."""
        self._close()
        if isinstance(error, ConnectionError) and not error.errno:
            raise Aborted(f"{self.peer} closed the connection")
        raise Aborted(f"{self.peer}: {error}")

    def provider_abort(self, previous, event, detail) -> None:
        """AA-8: A-ABORT to the peer from the provider, and the reason raised."""
        self._send_abort(ABORT_SOURCE_PROVIDER, self._abort_reason)
        self._await_close(CLOSE_TIMEOUT_AFTER_ABORT)
        if isinstance(detail, str):
            raise ProtocolViolation(detail)
        kind = next(kind for kind, pdu_event in PDU_EVENTS.items() if pdu_event is event)
        waiting_for = _ANSWERING.get(previous)
        raise ProtocolViolation(
            f"{self.peer} answered {waiting_for} with PDU type {kind}"
            if waiting_for
            else f"{self.peer} sent PDU type {kind} on the established association"
        )

    def send_abort(self, previous, event, error) -> None:
        """AA-1 (our A-ABORT: a timeout, or the caller's) and AA-7 (a PDU in Sta13)."""
        if event is Event.LOCAL_ABORT:
            self._send_abort(ABORT_SOURCE_USER, REASON_NOT_SPECIFIED)
            self._await_close(CLOSE_TIMEOUT_AFTER_ABORT)
            if error is not None:
                raise error
        else:
            self._send_abort(ABORT_SOURCE_PROVIDER, REASON_UNEXPECTED_PDU)

    def ignore(self, previous, event, body) -> None:
        pass

    def close(self, previous, event, detail) -> None:
        self._close()

    def _send_abort(self, source: int, reason: int) -> None:
        with contextlib.suppress(OSError):  # the peer may be gone
            self.sock.sendall(abort_pdu(source, reason))
            self.sock.shutdown(socket.SHUT_WR)

    def _await_close(self, artim: float) -> None:
        """Sta13: what the peer still sends, until it closes or ARTIM expires
        (in all: a peer that keeps sending does not keep us)."""
        deadline = time.monotonic() + min(self.timeout, artim)
        while self.state is State.AWAITING_CLOSE:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.handle(Event.ARTIM_EXPIRED)
                continue
            with contextlib.suppress(OSError):
                set_kernel_timeout(self.sock, remaining)
            self.handle(*self.next_event())

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# What the peer answers in the states where we wait for one answer, for messages.
_ANSWERING = {
    State.AWAITING_ASSOCIATE_RESPONSE: "the A-ASSOCIATE-RQ",
    State.AWAITING_RELEASE_RP: "the A-RELEASE-RQ",
    State.COLLISION_AWAITING_RELEASE_RP: "the A-RELEASE-RQ",
}
