"""One association, from its A-ASSOCIATE-RQ to its end, in its connection's thread.

`Association` is the service user of the upper layer: it decides whether to
accept (who calls, from where, whether there is room), assembles DIMSE
messages from P-DATA fragments, and hands each request to its service. A
dataset's fragments go straight to the service that receives it; nothing of
a message is kept beyond its command set.
"""

import socket
import threading
from dataclasses import dataclass, field

from scp import dimse, find_service, negotiation
from scp.access import CallerPolicy
from scp.commitment_service import Channel, CommitmentService, IncomingAction
from scp.config import Config
from scp.find_service import FindService, IncomingQuery, RunningQuery
from scp.session import Session
from scp.store_service import IncomingStore, StoreService
from scp.upper_layer import Abort, ProtocolError, ServiceUser, State, UpperLayer

_COMMAND = 0x01
_LAST = 0x02
_MAX_COMMAND_SET = 64 * 1024  # a command set is a few hundred bytes
VERIFICATION = "1.2.840.10008.1.1"


@dataclass
class Acceptor:
    """What every association of one listener process shares."""

    config: Config
    storage: StoreService
    commitment: CommitmentService
    find: FindService
    callers: CallerPolicy  # replaced as a whole on SIGHUP; read once per request
    associations: set["Association"] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self, sock: socket.socket, host: str, port: int) -> None:
        """Serve one connection until it closes (in its own thread)."""
        association = Association(self, sock, Session.open(host, port))
        with self.lock:
            self.associations.add(association)
        try:
            association.run()
        finally:
            with self.lock:
                self.associations.discard(association)

    def active(self) -> list["Association"]:
        with self.lock:
            return list(self.associations)


def _verification_only(request: negotiation.Request) -> bool:
    return all(str(cx.abstract_syntax) == VERIFICATION for cx in request.contexts)


class _DiscardedDataset:
    """The dataset of a request we do not serve: read and dropped."""

    def __init__(self, command: dimse.Command):
        self.command = command

    def write(self, data) -> None:
        pass

    def discard(self) -> None:
        pass


class Association(ServiceUser):
    def __init__(self, acceptor: Acceptor, sock: socket.socket, session: Session):
        config = acceptor.config
        self.acceptor = acceptor
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
        self.contexts: dict[int, str] = {}  # accepted context ID: transfer syntax
        self._command = bytearray()
        self._command_context: int | None = None
        self._dataset: IncomingStore | IncomingAction | IncomingQuery | _DiscardedDataset | None
        self._dataset = None
        self._dataset_context: int | None = None
        self._query: RunningQuery | None = None  # a C-FIND whose responses are going out
        self._query_context = 0

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
            if self._query is not None:
                self._query.close()
            try:
                self.acceptor.commitment.association_ended(self.session)
            except Exception:
                self.session.log.exception("commitment.handover_failed")
            self.session.ended(self.acceptor.storage.store.index)

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
        config = self.acceptor.config
        reason, rejection = self._refusal(request)
        if reason is not None:
            session.outcome, session.reason = "rejected", reason
            session.log.warning("association.rejected", reason=reason, permanent=rejection[0] == 1)
            layer.reject(*rejection)
            return
        agreement = negotiation.agree(request, config.max_pdu)
        self.contexts = {
            context_id: str(cx.transfer_syntax[0]) for context_id, cx in agreement.contexts.items()
        }
        layer.accept(agreement.pdu, request.max_pdu)
        session.established = True
        session.log.info(
            "association.accepted",
            contexts=len(agreement.contexts),
            rejected_contexts=agreement.rejected,
        )

    def _refusal(self, request: negotiation.Request) -> tuple[str | None, tuple[int, int, int]]:
        """Why the request is refused and the A-ASSOCIATE-RJ that says so, or (None, ())."""
        config = self.acceptor.config
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
        if not self.acceptor.callers.permits(request.calling_ae, self.session.host):
            return "calling AE title not allowed from this address", negotiation.REJECT_CALLING_AE
        if len(self.acceptor.active()) > config.max_associations:
            return (
                f"{config.max_associations} associations already in progress",
                negotiation.REJECT_BUSY,
            )
        if not self.acceptor.storage.store.has_room():
            # Transient: the sender may retry once an admin has made room.
            return "receiver's disk is below its free-space floor", negotiation.REJECT_BUSY
        health = self.acceptor.storage.store.index.health
        if not health.available and not _verification_only(request):
            # Transient, as for a full disk; a C-ECHO alone is let in, for its
            # failure status to say why (`imaging-scp echo` prints it).
            return health.describe(), negotiation.REJECT_BUSY
        return None, ()

    # -- DIMSE messages ----------------------------------------------------------------

    def p_data(self, layer: UpperLayer, context_id: int, control: int, fragment) -> None:
        transfer_syntax = self.contexts.get(context_id)
        if transfer_syntax is None:
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
                self._command_received(layer, context_id, transfer_syntax, command)
            return
        if self._dataset is None:
            raise ProtocolError("a data set fragment without its command")
        if context_id != self._dataset_context:
            raise ProtocolError("a data set on another presentation context than its command")
        self._dataset.write(fragment)
        if control & _LAST:
            dataset, self._dataset = self._dataset, None
            self._dataset_received(layer, context_id, dataset)

    def _command_received(
        self, layer: UpperLayer, context_id: int, transfer_syntax: str, data: bytes
    ) -> None:
        try:
            command = dimse.read_command(data)
        except dimse.CommandError as exc:
            raise ProtocolError(str(exc)) from exc
        field_ = command.field
        if field_ is None:
            raise ProtocolError("a command set without a Command Field")
        if field_ & 0x8000:  # a response: to one of our reports, or to nothing
            if command.has_dataset:
                self._dataset_context = context_id
                self._dataset = _DiscardedDataset(command)
            if not (
                field_ == dimse.N_EVENT_REPORT_RSP
                and self.acceptor.commitment.answered(self.session, command)
            ):
                self.session.log.warning(
                    "dimse.unexpected_response", command_field=f"0x{field_:04X}"
                )
            return
        if field_ == dimse.C_CANCEL_RQ:  # names the request it cancels, has no ID of its own
            # Only a C-FIND lasts long enough to be cancelled; the others are answered at once.
            if self._query is not None and command.responds_to == self._query.message_id:
                self._query.cancel()
            return
        if command.message_id is None:
            # No response could name the request it answers.
            self.session.log.warning("dimse.request_without_message_id")
            layer.abort("a request without a Message ID")
            return
        if not command.has_dataset:
            layer.send_message(context_id, self._serve_without_dataset(command))
            return
        self._dataset_context = context_id
        if field_ == dimse.C_STORE_RQ:
            self._dataset = self.acceptor.storage.receive(self.session, command, transfer_syntax)
        elif field_ == dimse.N_ACTION_RQ:
            self._dataset = self.acceptor.commitment.receive(self.session, command, transfer_syntax)
        elif field_ == dimse.C_FIND_RQ:
            self._dataset = self.acceptor.find.receive(self.session, command, transfer_syntax)
        else:
            self._dataset = _DiscardedDataset(command)

    def _serve_without_dataset(self, command: dimse.Command) -> bytes:
        field_ = command.field
        if field_ == dimse.C_ECHO_RQ:
            return self.acceptor.storage.echo(self.session, command)
        if field_ == dimse.C_STORE_RQ:
            return self.acceptor.storage.store_without_dataset(self.session, command)
        if field_ == dimse.N_ACTION_RQ:
            return self.acceptor.commitment.action_without_dataset(self.session, command)
        if field_ == dimse.C_FIND_RQ:
            self.session.log.warning("find.refused", reason="C-FIND-RQ without an identifier")
            return dimse.response(
                dimse.C_FIND_RSP,
                command.message_id,
                find_service.UNABLE_TO_PROCESS,
                sop_class_uid=command.uid(dimse.AFFECTED_SOP_CLASS_UID),
                error_comment="C-FIND-RQ without an identifier",
            )
        return self._unrecognized(command)

    def _dataset_received(self, layer: UpperLayer, context_id: int, dataset) -> None:
        if isinstance(dataset, IncomingStore):
            layer.send_message(context_id, dataset.finish())
            dataset.report()
        elif isinstance(dataset, IncomingAction):
            response, transaction_uid = dataset.finish()
            layer.send_message(context_id, response)
            if transaction_uid is not None:
                channel = Channel(layer, context_id, self.contexts[context_id])
                self.acceptor.commitment.report_on(self.session, channel, transaction_uid)
        elif isinstance(dataset, IncomingQuery):
            if self._query is not None:  # beyond the 1/1 window we answered
                raise ProtocolError("a C-FIND-RQ while another C-FIND is being answered")
            self._query, self._query_context = dataset.start(), context_id
        elif not dataset.command.field & 0x8000:  # a response's dataset is only dropped
            layer.send_message(context_id, self._unrecognized(dataset.command))

    def _unrecognized(self, command: dimse.Command) -> bytes:
        self.session.log.warning("dimse.unrecognized", command_field=f"0x{command.field:04X}")
        return dimse.response(
            dimse.response_field(command.field),
            command.message_id,
            dimse.UNRECOGNIZED_OPERATION,
            sop_class_uid=command.uid(dimse.AFFECTED_SOP_CLASS_UID),
            error_comment="operation not served by this SCP",
        )

    def has_output(self) -> bool:
        return self._query is not None

    def send_output(self, layer: UpperLayer) -> None:
        query = self._query
        command, identifier = query.next_response()
        if query.done:
            self._query = None
        layer.send_message(self._query_context, command, identifier)

    # -- the end -------------------------------------------------------------------

    def released(self) -> None:
        self.session.outcome = "released"

    def aborted(self, abort: Abort) -> None:
        session = self.session
        if session.outcome in ("rejected", "released"):
            return
        session.outcome, session.reason = "aborted", f"{abort.by}: {abort.reason}"
