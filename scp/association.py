"""One association, from its A-ASSOCIATE-RQ to its end, in its connection's thread.

`Association` is the service user of the upper layer: it decides whether to
accept (who calls, from where, whether there is room), assembles DIMSE
messages from P-DATA fragments, and routes each by its Command Field through
the table of services (scp/service.py), which answer through the `Outbox` of
the request's presentation context. A dataset's fragments go straight to the
service that receives it; nothing of a message is kept beyond its command set.
"""

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from scp import dimse, metrics, negotiation
from scp.access import CallerPolicy
from scp.config import Config
from scp.service import Conversation, Incoming, Responses, Service, Unserved, unrecognized
from scp.session import Session
from scp.upper_layer import Abort, ProtocolError, ServiceUser, State, UpperLayer
from storage.store import InstanceStore

_COMMAND = 0x01
_LAST = 0x02
_MAX_COMMAND_SET = 64 * 1024  # a command set is a few hundred bytes
VERIFICATION = "1.2.840.10008.1.1"


@dataclass
class Associations:
    """The live associations of one listener process, and what they share."""

    config: Config
    store: InstanceStore  # whether there is room, and whether its index is available
    services: dict[int, Service]  # Command Field -> the service its messages go to
    callers: CallerPolicy  # replaced as a whole on SIGHUP; read once per request
    live: set["Association"] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self, sock: socket.socket, host: str, port: int) -> None:
        """Serve one connection until it closes (in its own thread)."""
        association = Association(self, sock, Session.open(host, port))
        with self.lock:
            self.live.add(association)
        try:
            association.run()
        finally:
            with self.lock:
                self.live.discard(association)

    def active(self) -> list["Association"]:
        with self.lock:
            return list(self.live)


def _verification_only(request: negotiation.Request) -> bool:
    return all(str(cx.abstract_syntax) == VERIFICATION for cx in request.contexts)


class _DiscardedDataset:
    """The dataset of a response: read and dropped (no response of ours has one)."""

    def write(self, data) -> None:
        pass

    def discard(self) -> None:
        pass

    def finish(self) -> None:
        pass


class _Outbox:
    """One accepted presentation context, as the services' way back to the requester."""

    __slots__ = ("association", "context_id", "transfer_syntax")

    def __init__(self, association: "Association", context_id: int, transfer_syntax: str):
        self.association = association
        self.context_id = context_id
        self.transfer_syntax = transfer_syntax

    def send(self, command: bytes, dataset: bytes = b"") -> None:
        self.association.layer.send_message(self.context_id, command, dataset)

    def stream(self, start: Callable[[], Responses]) -> None:
        self.association.stream(self.context_id, start)

    def peer_is_leaving(self, wait: float) -> bool:
        return self.association.layer.peer_is_leaving(wait)


class Association(ServiceUser):
    def __init__(self, associations: Associations, sock: socket.socket, session: Session):
        config = associations.config
        self.associations = associations
        self.session = session
        self.layer = UpperLayer(
            sock,
            self,
            max_pdu=config.max_pdu,
            # ARTIM while waiting for the A-ASSOCIATE-RQ: no longer than a
            # silent connection may last otherwise.
            artim_timeout=min(config.network_timeout, 30),
            network_timeout=config.network_timeout,
        )
        self.outboxes: dict[int, _Outbox] = {}  # by accepted presentation context ID
        # Each service's part in this association, by the Command Fields routed to it.
        self.conversations: dict[int, Conversation] = {}
        self._command = bytearray()
        self._command_context: int | None = None
        self._dataset: Incoming | None = None
        self._dataset_context: int | None = None
        self._streaming: Responses | None = None  # a request whose responses are going out
        self._streaming_context = 0

    @property
    def established(self) -> bool:
        """Between its A-ASSOCIATE-AC and its release or abort: work may be in flight."""
        return self.layer.state in (State.ESTABLISHED, State.AWAITING_LOCAL_RELEASE_RESPONSE)

    def run(self) -> None:
        try:
            self.layer.run()
        except Exception as exc:  # a bug of ours: this association ends, the service goes on
            self.session.outcome, self.session.reason = "aborted", f"internal error: {exc!r}"
            self.session.log.exception("association.failed")
        finally:
            if self._dataset is not None:  # the transfer broke off
                self._dataset.discard()
            if self._streaming is not None:
                self._streaming.close()
            # Each service finishes its part first: once association.end is
            # logged, its series are marked and its reports handed over.
            for conversation in dict.fromkeys(self.conversations.values()):
                conversation.ended(self.session)
            self.session.ended()

    def stop(self) -> None:
        """From another thread: abort now (a stop, after the drain)."""
        self.layer.request_stop()

    # -- association establishment -----------------------------------------------

    def associate_requested(self, layer: UpperLayer, pdu: bytes) -> None:
        session = self.session
        try:
            request = negotiation.read_request(pdu)
        except negotiation.RequestError as exc:
            session.outcome, session.reason = "aborted", str(exc)
            session.log.warning("association.aborted", reason=str(exc))
            layer.abort(str(exc))
            return
        session.requested(request.calling_ae, request.called_ae)
        config = self.associations.config
        reason, rejection = self._refusal(request)
        if reason is not None:
            session.outcome, session.reason = "rejected", reason
            session.log.warning("association.rejected", reason=reason, permanent=rejection[0] == 1)
            if metrics.recorder is not None:
                metrics.recorder.association_rejected(rejection)
            layer.reject(*rejection)
            return
        agreement = negotiation.agree(request, config.max_pdu)
        self.outboxes = {
            context_id: _Outbox(self, context_id, str(cx.transfer_syntax[0]))
            for context_id, cx in agreement.contexts.items()
        }
        # A service serving several Command Fields has one part in the association.
        joined: dict[Service, Conversation] = {}
        for field_, service in self.associations.services.items():
            if service not in joined:
                joined[service] = service.join(session)
            self.conversations[field_] = joined[service]
        layer.accept(agreement.pdu, request.max_pdu)
        session.established = True
        session.log.info(
            "association.accepted",
            contexts=len(agreement.contexts),
            rejected_contexts=agreement.rejected,
        )

    def _refusal(self, request: negotiation.Request) -> tuple[str | None, tuple[int, int, int]]:
        """Why the request is refused and the A-ASSOCIATE-RJ that says so, or (None, ())."""
        config = self.associations.config
        context_ids = [cx.context_id for cx in request.contexts]
        if len(context_ids) > negotiation.MAX_PRESENTATION_CONTEXTS or len(set(context_ids)) != len(
            context_ids
        ):
            # PS3.8 allows 128 contexts with distinct odd IDs; more is an attack or a bug.
            return f"{len(context_ids)} presentation contexts", negotiation.REJECT_NO_REASON
        if request.application_context != negotiation.APPLICATION_CONTEXT_NAME:
            return (
                f"application context {request.application_context!r} is not DICOM's",
                negotiation.REJECT_APPLICATION_CONTEXT,
            )
        if config.require_called_aet and request.called_ae != config.aet:
            return (
                f"called AE title {request.called_ae!r} is not ours ({config.aet})",
                negotiation.REJECT_CALLED_AE,
            )
        if not self.associations.callers.permits(request.calling_ae, self.session.host):
            return "calling AE title not allowed from this address", negotiation.REJECT_CALLING_AE
        if len(self.associations.active()) > config.max_associations:
            return (
                f"{config.max_associations} associations already in progress",
                negotiation.REJECT_BUSY,
            )
        if not self.associations.store.has_room():
            # Transient: the sender may retry once an admin has made room.
            return "receiver's disk is below its free-space floor", negotiation.REJECT_BUSY
        health = self.associations.store.index.health
        if not health.available and not _verification_only(request):
            # Transient, as for a full disk; a C-ECHO alone is let in, for its
            # failure status to say why (`imaging-scp echo` prints it).
            return health.describe(), negotiation.REJECT_BUSY
        return None, ()

    # -- DIMSE messages ----------------------------------------------------------------

    def p_data(self, layer: UpperLayer, context_id: int, control: int, fragment) -> None:
        outbox = self.outboxes.get(context_id)
        if outbox is None:
            raise ProtocolError(f"P-DATA on presentation context {context_id}, not accepted")
        if control & _COMMAND:
            if self._dataset is not None:
                raise ProtocolError("a command fragment while a data set was arriving")
            if self._command_context not in (None, context_id):
                raise ProtocolError("a command's fragments on two presentation contexts")
            self._command_context = context_id
            self._command += fragment
            if len(self._command) > _MAX_COMMAND_SET:
                raise ProtocolError(f"a command set longer than {_MAX_COMMAND_SET} bytes")
            if control & _LAST:
                command = bytes(self._command)
                self._command.clear()
                self._command_context = None
                self._command_received(layer, outbox, command)
            return
        if self._dataset is None:
            raise ProtocolError("a data set fragment without its command")
        if context_id != self._dataset_context:
            raise ProtocolError("a data set on another presentation context than its command")
        self._dataset.write(fragment)
        if control & _LAST:
            dataset, self._dataset = self._dataset, None
            dataset.finish()

    def _command_received(self, layer: UpperLayer, outbox: _Outbox, data: bytes) -> None:
        try:
            command = dimse.read_command(data)
        except dimse.CommandError as exc:
            raise ProtocolError(str(exc)) from exc
        field_ = command.field
        if field_ is None:
            raise ProtocolError("a command set without a Command Field")
        conversation = self.conversations.get(field_)
        if field_ & 0x8000:  # a response: to one of our requests, or to nothing
            if command.has_dataset:
                self._dataset_context = outbox.context_id
                self._dataset = _DiscardedDataset()
            if conversation is None or not conversation.response(command):
                self.session.log.warning(
                    "dimse.unexpected_response", command_field=f"0x{field_:04X}"
                )
            return
        if field_ == dimse.C_CANCEL_RQ:  # names the request it cancels, has no ID of its own
            # Only streamed responses last long enough to be cancelled; the
            # others are answered at once.
            streaming = self._streaming
            if streaming is not None and command.responds_to == streaming.message_id:
                streaming.cancel()
            return
        if command.message_id is None:
            # No response could name the request it answers.
            self.session.log.warning("dimse.request_without_message_id")
            layer.abort("a request without a Message ID")
            return
        if conversation is not None:
            incoming = conversation.request(command, outbox)
        elif command.has_dataset:
            incoming = Unserved(self.session, command, outbox)
        else:
            outbox.send(unrecognized(self.session, command))
            incoming = None
        if incoming is not None:
            self._dataset, self._dataset_context = incoming, outbox.context_id

    def stream(self, context_id: int, start: Callable[[], Responses]) -> None:
        """Send a request's responses one at a time, between reads (`send_output`)."""
        if self._streaming is not None:  # beyond the 1/1 window we answered
            raise ProtocolError(
                "a request answered by several responses while those to Message ID"
                f" {self._streaming.message_id} are going out"
            )
        self._streaming, self._streaming_context = start(), context_id

    def has_output(self) -> bool:
        return self._streaming is not None

    def send_output(self, layer: UpperLayer) -> None:
        streaming = self._streaming
        command, dataset = streaming.next_response()
        if streaming.done:
            self._streaming = None
        layer.send_message(self._streaming_context, command, dataset)

    # -- the end -------------------------------------------------------------------

    def released(self) -> None:
        self.session.outcome = "released"

    def aborted(self, abort: Abort) -> None:
        session = self.session
        if session.outcome in ("rejected", "released"):
            return
        session.outcome, session.reason = "aborted", f"{abort.by}: {abort.reason}"
