"""The DICOM upper layer (PS3.8 §9), requestor side: the associations we open
ourselves (`imaging-scp echo`, commitment reports on a new association).

`Requestor.associate` connects, sends the A-ASSOCIATE-RQ and returns a
`RequestorAssociation` once the peer accepts; the caller then sends DIMSE
messages and reads the answers (`send`, `receive`), and ends with `release`
or `abort`. Everything runs in the caller's thread on one blocking socket,
each wait within `timeout`. The state machine is PS3.8 table 9-10 as data,
like the acceptor's in scp.upper_layer: `TRANSITIONS` has one entry per
(state, event) a requestor can meet, and every PDU the peer can send has a
row in every state in which we read from it (Sta5, Sta6, Sta7, Sta11, Sta13).

Every way an association fails is an `AssociationError` subclass with a
message naming the peer: the connection (`ConnectFailed`), no answer in time
(`NoAnswer`), an A-ASSOCIATE-RJ (`Rejected`, its result, source and reason
decoded), an A-ABORT or a dropped connection (`Aborted`), no accepted context
for an abstract syntax (`NotAccepted`), and bytes that break the protocol
(`ProtocolViolation`, answered with an A-ABORT).

PDU items are encoded and decoded by pynetdicom's PDU classes (as the
acceptor's negotiation does); the P-DATA framing and the A-ABORT and release
PDUs are the acceptor's own.
"""

import contextlib
import socket
import time
from dataclasses import dataclass

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import build_context, negotiate_as_requestor

from scp import dimse
from scp.negotiation import APPLICATION_CONTEXT_NAME, our_user_information
from scp.upper_layer import (
    ABORT_SOURCE_PROVIDER,
    ABORT_SOURCE_USER,
    CLOSE_TIMEOUT,
    CLOSE_TIMEOUT_AFTER_ABORT,
    MAX_CONTROL_PDU,
    PDU_EVENTS,
    PDU_HEADER,
    REASON_INVALID_PARAMETER,
    REASON_NOT_SPECIFIED,
    REASON_UNEXPECTED_PDU,
    REASON_UNRECOGNIZED_PDU,
    RELEASE_RP_PDU,
    RELEASE_RQ_PDU,
    SHARED_TRANSITIONS,
    Event,
    ProtocolError,
    State,
    Transitions,
    abort_pdu,
    ends_by_abort_or_close,
    p_data_pdus,
    pdvs,
    provider_aborts,
    streamed_p_data_pdus,
)

MAX_PDU = 65536  # the P-DATA-TF variable field we announce we receive

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


S = State
E = Event
# (state, event): (PS3.8 action, method of RequestorAssociation, next state).
TRANSITIONS: Transitions = {
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


class Requestor:
    """Opens associations as `calling_ae`, each wait within `timeout` seconds."""

    def __init__(self, calling_ae: str, *, timeout: float, max_pdu: int = MAX_PDU):
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
            p_data_pdus(context.context_id, command, dataset, self.peer_max_pdu),
        )

    def send_from(self, context: AcceptedContext, command: bytes, source, length: int) -> None:
        """One DIMSE message whose data set is the next `length` bytes of the
        binary file `source`, read and sent a PDU at a time."""
        for pdu in streamed_p_data_pdus(
            context.context_id, command, source, length, self.peer_max_pdu
        ):
            self.handle(Event.LOCAL_P_DATA, pdu)

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
        if (self.state, Event.LOCAL_ABORT) in TRANSITIONS:
            self.handle(Event.LOCAL_ABORT)

    # -- the state machine ----------------------------------------------------------

    def handle(self, event: Event, detail=None) -> None:
        """Take one event: enter the next state and run its action, which may
        raise the AssociationError the caller is to see."""
        previous = self.state
        _, action, self.state = TRANSITIONS[previous, event]
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
            limit = max(self.max_pdu, MAX_CONTROL_PDU)
            if length > limit:
                self._abort_reason = REASON_INVALID_PARAMETER
                return Event.INVALID_PDU, (
                    f"{self.peer} sent a PDU of {length} bytes, over the {limit} we take"
                )
            return event, self._read_exactly(length)
        except TimeoutError:
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

    def _read_exactly(self, count: int) -> bytes:
        data = bytearray(count)
        view = memoryview(data)
        got = 0
        while got < count:
            received = self.sock.recv_into(view[got:])
            if received == 0:
                raise ConnectionError("connection closed")
            got += received
        return bytes(data)

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
        try:
            self.sock.sendall(pdu)
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
                self.sock.settimeout(remaining)
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
