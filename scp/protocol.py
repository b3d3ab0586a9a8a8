"""Faults of pynetdicom's protocol code that a listener on an open network
meets, corrected on each accepted association.

- A connection closed before its A-ASSOCIATE-RQ (a port scan, a load
  balancer's health check) left the association thread waiting for a request
  until `acse_timeout`, holding its slot against `max_associations`, and
  holding up a stop. `ReceiverDUL.receive_pdu` waits in short slices and
  gives up as soon as the connection is gone.
- A local primitive that the state machine has no transition for in its
  current state (our A-ASSOCIATE-AC, or a P-DATA, queued just as the DUL
  aborted on a bad PDU and entered Sta13) raised InvalidEventError outside
  pynetdicom's exception handling and killed the DUL thread, leaving the
  connection open. `ReceiverStateMachine.do_action` drops such a primitive:
  the association is already being torn down, and nobody can receive it. A
  local A-ABORT with no transition (a stop while a connection has not yet sent
  its request) closes the connection instead.
- An action that fails on a PDU that decoded but makes no sense (an
  A-ASSOCIATE-RQ with an even presentation context ID) killed the DUL thread
  with a raw traceback and no word to the peer. The peer now gets an A-ABORT,
  as pynetdicom does for errors elsewhere in its reactor, and the association
  ends as aborted.
- A C-STORE-RQ without a mandatory UID in its command (Affected SOP Class or
  Instance UID) was ignored, and the sender waited for a response until its
  own timeout. `ReceiverAssociation` hands it to the C-STORE handler, which
  answers it with a failure status; one without a Message ID, which no
  response could name, aborts the association.

All are installed by changing the class of pynetdicom's own instances: they
only override methods, which Python looks up at call time.
"""

import time

import structlog
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import TRANSITION_TABLE, StateMachine
from pynetdicom.pdu import A_ABORT_RQ

log = structlog.get_logger("imaging_scp")

# How often a waiting association thread checks that its connection still exists.
_WAIT_SLICE = 0.05

# Events raised by the local user's primitives (PS3.8 9.2), each of which
# `DULServiceProvider._process_recv_primitive` queued while leaving its
# primitive at the head of `to_provider_queue` for the action to take.
_LOCAL_PRIMITIVE_EVENTS = frozenset({"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})


class ReceiverDUL(DULServiceProvider):
    """pynetdicom's DUL, whose blocking wait ends when the connection does."""

    def receive_pdu(self, wait: bool = False, timeout: float | None = None):
        if not wait:
            return super().receive_pdu(wait=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = _WAIT_SLICE if deadline is None else deadline - time.monotonic()
            primitive = super().receive_pdu(
                wait=True, timeout=max(0.0, min(_WAIT_SLICE, remaining))
            )
            if primitive is not None:
                return primitive
            if self._connection_gone() and self.to_user_queue.empty():
                return None
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _connection_gone(self) -> bool:
        """True once the socket is closed and the state machine knows it, or
        the DUL thread has ended: nothing more can arrive from the peer."""
        if not self.is_alive():
            return True
        socket = self.socket
        closed = socket is None or socket.socket is None
        return closed and self.event_queue.empty() and self.state_machine.current_state == "Sta1"


class ReceiverStateMachine(StateMachine):
    """pynetdicom's state machine, which drops a local primitive it cannot act
    on instead of dying of it."""

    def do_action(self, event: str) -> None:
        if event in _LOCAL_PRIMITIVE_EVENTS and (event, self.current_state) not in TRANSITION_TABLE:
            queue = self.dul.to_provider_queue
            primitive = queue.get_nowait() if not queue.empty() else None
            log.debug(
                "dul.primitive_dropped",
                fsm_event=event,
                state=self.current_state,
                primitive=type(primitive).__name__,
            )
            if event == "Evt15" and self.dul.socket is not None:
                # An abort that this state cannot send (a stop, before the peer's
                # A-ASSOCIATE-RQ): closing the connection is all that is left of it.
                self.dul.socket.close()
            return
        try:
            super().do_action(event)
        except Exception as exc:  # pynetdicom has logged it and stopped the DUL
            log.warning(
                "dul.action_failed",
                fsm_event=event,
                state=self.current_state,
                reason=f"{type(exc).__name__}: {exc}",
            )
            self._abort_connection()

    def _abort_connection(self) -> None:
        dul = self.dul
        abort = A_ABORT_RQ()
        abort.source = 0x02  # service provider
        abort.reason_diagnostic = 0x00  # reason not specified
        if dul.socket is not None:  # send() takes any failure for a closed connection
            dul.socket.send(abort.encode())
        assoc = dul.assoc
        was_established = assoc.is_established
        assoc.is_aborted = True
        assoc.is_established = False
        assoc._kill = True
        if was_established:  # pynetdicom's reactor would end it without a word
            evt.trigger(assoc, evt.EVT_ABORTED, {})


class IncompleteStoreRequest(C_STORE):
    """A C-STORE-RQ that lacks a UID pynetdicom requires before it serves one."""

    @property
    def is_valid_request(self) -> bool:
        return self.MessageID is not None


class ReceiverAssociation(Association):
    """pynetdicom's association, which lets an incomplete C-STORE-RQ through to
    the handler instead of leaving the sender without an answer."""

    def _serve_request(self, msg, context_id: int) -> None:
        if type(msg) is C_STORE and not msg.is_valid_request:
            if msg.MessageID is None:
                log.warning("dimse.request_without_message_id", peer=self._peer())
                self.abort()
                return
            msg.__class__ = IncompleteStoreRequest
        super()._serve_request(msg, context_id)

    def _peer(self) -> str:
        address = self.requestor.address_info
        return f"{address.address}:{address.port}"


def install(assoc: Association) -> None:
    """Give a freshly created association the corrected behaviour."""
    assoc.__class__ = ReceiverAssociation
    assoc.dul.__class__ = ReceiverDUL
    assoc.dul.state_machine.__class__ = ReceiverStateMachine
