"""The DICOM upper layer (PS3.8 §9), acceptor side: one socket, one thread.

`UpperLayer.run` reads PDUs with blocking reads and drives the state machine
of PS3.8 table 9-10 through `TRANSITIONS`, one line per (state, event) an
acceptor can meet. Events come from the peer (a PDU, the connection closing,
bytes that are no PDU) or from the local service user (`ServiceUser`, called
in the same thread: accept or reject, P-DATA, the release response, abort).
A pair that is not in the table is a bug of ours, not of the peer's: every
PDU the peer can send has a row in every state in which we read from it
(Sta2, Sta6, Sta13).

The service user may also have messages of its own to send (a C-FIND's
responses, one per match): the loop sends them one at a time, each only when
nothing from the peer is waiting, so a C-CANCEL is read before the next one;
they go through the same LOCAL_P_DATA event as every other message.

The acceptor never requests a release itself (the requestor releases, as
storescp and Orthanc's acceptor do), so the requestor-side and collision
states Sta4, Sta5, Sta7 and Sta9-Sta12 never occur here (scp.requestor has
the requestor's table), and an A-RELEASE-RP from the peer is an unexpected
PDU. The ARTIM timer is the socket's read timeout
in Sta2 (waiting for the A-ASSOCIATE-RQ) and Sta13 (waiting for the peer to
close after our A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT).
"""

import contextlib
import enum
import select
import socket
import ssl
import struct
from dataclasses import dataclass

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)

# The read buffer, and so the largest PDU we take, is max_pdu but at least
# this: an A-ASSOCIATE-RQ with the maximum 128 presentation contexts, each with
# many transfer syntaxes, stays well below it. A longer PDU is refused unread.
MAX_CONTROL_PDU = 1024 * 1024

# Seconds the peer has to close its side (ARTIM in Sta13) after our RJ or RP,
# and after our A-ABORT: a peer that sent garbage gets little of our time.
CLOSE_TIMEOUT = 5.0
CLOSE_TIMEOUT_AFTER_ABORT = 0.5

PDU_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")


class State(enum.Enum):
    """PS3.8's states; Sta2, Sta3 and Sta8 are the acceptor's, Sta4, Sta5, Sta7
    and Sta11 the requestor's (scp.requestor), the others both sides'."""

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


# The rows both sides have (scp.requestor's table takes them too): data
# transfer in Sta6, and Sta13, awaiting the peer's close after our RJ, RP or
# A-ABORT. Each side adds how a release goes in Sta6.
SHARED_TRANSITIONS: Transitions = {
    (S.ESTABLISHED, E.P_DATA_PDU): ("DT-2", "indicate_p_data", S.ESTABLISHED),
    (S.ESTABLISHED, E.LOCAL_P_DATA): ("DT-1", "send_pdu", S.ESTABLISHED),
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

# (state, event): (PS3.8 action, method of UpperLayer, next state). An action
# whose next state depends on what it does returns that state instead.
TRANSITIONS: Transitions = {
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
    (S.AWAITING_LOCAL_RELEASE_RESPONSE, E.LOCAL_P_DATA): ("AR-7", "send_pdu", S.AWAITING_LOCAL_RELEASE_RESPONSE),  # noqa: E501
    (S.AWAITING_LOCAL_RELEASE_RESPONSE, E.LOCAL_ABORT): ("AA-1", "send_abort", S.AWAITING_CLOSE),
    # Sta13 (and SHARED_TRANSITIONS)
    (S.AWAITING_CLOSE, E.LOCAL_ABORT): ("AA-2", "close", S.IDLE),  # a stop: already ending
    **SHARED_TRANSITIONS,
}  # fmt: skip
# Sta3 and Sta8 last only while the service user answers, in this same thread:
# no PDU is read in them, so they have rows for local events only. The local
# events that Sta13 has no row for are never issued there: the service user is
# only called from the indications above.


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


RELEASE_RQ_PDU = bytes((0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0))  # the requestor's (scp.requestor)
RELEASE_RP_PDU = bytes((0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0))


@dataclass(frozen=True)
class Abort:
    """How an association was aborted, for the service user's log."""

    by: str  # "peer", "us" or "connection" (closed or failed without an A-ABORT)
    reason: str


class ProtocolError(Exception):
    """A P-DATA whose content breaks the rules of the DIMSE layer: the service
    user raises it, the upper layer aborts (AA-8)."""


class ServiceUser:
    """What the upper layer tells the service above it, in its own thread."""

    def associate_requested(self, layer: "UpperLayer", pdu: bytes) -> None:
        """`pdu` is the whole A-ASSOCIATE-RQ PDU. Must end with layer.accept(...),
        layer.reject(...) or layer.abort(...)."""
        raise NotImplementedError

    def p_data(self, layer: "UpperLayer", context_id: int, control: int, fragment) -> None:
        """One PDV. `fragment` is a memoryview valid until the call returns.
        Raises ProtocolError for a PDV the DIMSE layer cannot take."""
        raise NotImplementedError

    def released(self) -> None: ...

    def aborted(self, abort: Abort) -> None: ...

    def has_output(self) -> bool:
        """Whether the user has messages of its own to send (a query's
        responses): the layer asks for them one at a time, between reads."""
        return False

    def send_output(self, layer: "UpperLayer") -> None:
        """Send the next of those messages (with layer.send_message)."""


class UpperLayer:
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
        self._buffer = bytearray(max(max_pdu, MAX_CONTROL_PDU))
        self._view = memoryview(self._buffer)
        self._start = self._end = 0  # the bytes received and not yet taken
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
            self._view.release()
            self._view = self._buffer = None

    def handle(self, event: Event, detail=None) -> None:
        """Take one event: run its action and enter the next state (or the one
        the action returns). An action may raise local events itself."""
        previous = self.state
        _, action, self.state = TRANSITIONS[previous, event]
        override = getattr(self, action)(previous, event, detail)
        if override is not None:
            self.state = override

    def _next_event(self) -> tuple[Event, object]:
        """The next event from the peer (or a stop), with its PDU or a reason."""
        if self._stop_requested:
            return Event.LOCAL_ABORT, "the service is stopping"
        try:
            header = self._read_exactly(6)
            if header is None:
                return self._closed()
            kind, length = PDU_HEADER.unpack_from(header)
            event = PDU_EVENTS.get(kind)
            if event is None or length > len(self._buffer):
                self._abort_reason = (
                    REASON_UNRECOGNIZED_PDU if event is None else REASON_INVALID_PARAMETER
                )
                return Event.INVALID_PDU, f"PDU type 0x{kind:02X} of length {length}"
            body = self._read_exactly(length)
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

    def _read_exactly(self, count: int) -> memoryview | None:
        """The next `count` bytes, from the reused buffer (valid until the next
        read); None when the peer closes first. Each read from the socket takes
        what has arrived, up to the buffer's end: a small C-STORE's command and
        dataset PDUs come in one read, a large one's PDUs a megabyte at a time."""
        start = self._start
        if self._end - start < count:
            if start + count > len(self._buffer):  # make room: what is left goes first
                left = self._end - start
                self._view[:left] = self._view[start : self._end]
                start, self._end = 0, left
            sock = self.sock
            while self._end - start < count:
                if _TCP_QUICKACK is not None:
                    # Linux turns quick ACKs off again by itself. Re-armed before
                    # each read, the kernel ACKs what arrives at once, while this
                    # thread is still waking: a Nagle-on sender never waits 40 ms
                    # for our ACK, nor for this thread, to send its next segment.
                    sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
                got = sock.recv_into(self._view[self._end :])
                if got == 0:
                    return None
                self._end += got
        self._start = start + count
        return self._view[start : start + count]

    def _set_timeout(self, seconds: float) -> None:
        if not self._kernel_timeouts:
            self.sock.settimeout(seconds)
            return
        whole = int(seconds)
        value = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)

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
            Event.LOCAL_P_DATA, p_data_pdus(context_id, command, dataset, self.peer_max_pdu)
        )

    def send_message_from(self, context_id: int, command: bytes, source, length: int) -> None:
        """A DIMSE message whose data set is the next `length` bytes of the file
        `source`, streamed a PDU at a time (`streamed_p_data_pdus`)."""
        for pdu in streamed_p_data_pdus(context_id, command, source, length, self.peer_max_pdu):
            self.handle(Event.LOCAL_P_DATA, pdu)
            if self.state is not State.ESTABLISHED:
                return

    def _input_waiting(self) -> bool:
        return self._end > self._start or self._stop_requested or self._arrives_within(0)

    def peer_is_leaving(self, wait: float) -> bool:
        """Whether the peer's next PDU, arriving within `wait` seconds, is an
        A-RELEASE-RQ or an A-ABORT (or it closed): it has no use for this
        association any more. The PDU is left to be read as usual."""
        if self._end > self._start:
            kind = self._buffer[self._start]
        else:
            self._start = self._end = 0
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
            self._end = self.sock.recv_into(self._view)
        finally:
            self.sock.settimeout(self.network_timeout)
        return self._buffer[0] if self._end else None

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


# The piece of a streamed data set read at a time when the peer takes PDUs of
# any length: what `p_data_pdus` would put in one PDU stays bounded.
_STREAM_PIECE = 256 * 1024


def streamed_p_data_pdus(context_id: int, command: bytes, source, length: int, peer_max_pdu: int):
    """The P-DATA-TF PDUs of one DIMSE message whose data set is the next
    `length` bytes of the binary file `source`, read a PDU at a time: each PDU
    yielded (a memoryview of one reused buffer, valid until the next) is
    within the peer's maximum length; the command's PDUs go with the first.
    OSError when the file ends early."""
    chunk = max(peer_max_pdu - 6, 256) if peer_max_pdu else _STREAM_PIECE
    head = p_data_pdus(context_id, command, b"", peer_max_pdu)
    buffer = bytearray(len(head) + 12 + min(chunk, max(length, 0)))
    view = memoryview(buffer)
    view[: len(head)] = head
    start = len(head)
    left = length
    while left > 0:
        piece = min(chunk, left)
        left -= piece
        PDU_HEADER.pack_into(buffer, start, 0x04, piece + 6)
        _PDV_HEADER.pack_into(buffer, start + 6, piece + 2, context_id, 0 if left else 2)
        body = view[start + 12 : start + 12 + piece]
        got = source.readinto(body)
        while got < piece:
            more = source.readinto(body[got:])
            if not more:
                raise OSError(f"the file ends {piece - got + left} bytes early")
            got += more
        yield view[: start + 12 + piece]
        start = 0
    if length <= 0:  # no data set PDV: only the command
        yield view[: len(head)]
