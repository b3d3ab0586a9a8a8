"""The Query/Retrieve MOVE and GET services as SCP: C-MOVE and C-GET from the index.

A retrieve's identifier (unique keys only, PS3.4 C.4.2.2.1) is matched by
C-FIND's code (`storage.catalog.find`); the matches come from the cursor one at
a time, and each is one C-STORE sub-operation (scp.sub_operations).

A C-MOVE sends them on an association of ours to the Move Destination, an AE
title looked up in `peers` (a new one after the destination aborts, see
`Destination`); a C-GET sends them back on the requester's own
association, on the storage contexts on which it accepted the SCP role (role
selection, PS3.7 D.3.3.4). Either runs as the request's streamed responses
(`Outbox.stream`): one sub-operation per turn of the association's loop, which
reads between turns, so a C-CANCEL-RQ is seen between two sub-operations; a
C-GET's turn waits for the requester's C-STORE-RSP. A Pending response goes
with a sub-operation's end at most every PENDING_INTERVAL seconds.

Statuses: Pending 0xFF00; Success, Warning 0xB000 (some sub-operations failed
or warned), 0xA702 (none could be sent), Cancel 0xFE00, each with the counts;
0xA801 for a Move Destination not in `peers`; 0xA900 for an identifier that
names no level or breaks the hierarchical rules, 0xC000 for one that does not
decode; 0x0122 for a SOP class that is no MOVE or GET model.

The moves and gets at once are bounded by `max_associations`: each runs on its
requester's association, a move's outbound one lives within it.
"""

from scp import dimse, metrics
from scp.association import (
    Conversation,
    Identifier,
    IndexResponses,
    Outbox,
    Refused,
    Session,
    Unserved,
    failure_response,
    unrecognized,
)
from scp.config import peer_address
from scp.sub_operations import (
    CANCEL,
    SUCCESS,
    UNABLE_TO_PERFORM_SUB_OPERATIONS,
    WARNING,
    Destination,
    DestinationLost,
    Match,
    Matches,
    Tally,
    Unsendable,
    choose_syntax,
    proposals,
    send_instance,
    store_failure,
)
from scp.upper_layer import AssociationError, Requestor
from storage.catalog import find
from storage.catalog.engines import IndexLocation
from storage.catalog.health import IndexHealth
from storage.codec.datasets import decode_dataset, value_text
from storage.codec.syntax import transfer_syntax as syntax_of

PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
ROOTS = {
    PATIENT_ROOT_MOVE: find.PATIENT_ROOT,
    STUDY_ROOT_MOVE: find.STUDY_ROOT,
    PATIENT_ROOT_GET: find.PATIENT_ROOT,
    STUDY_ROOT_GET: find.STUDY_ROOT,
}

MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH = 0xA900
SOP_CLASS_NOT_SUPPORTED = 0x0122
UNABLE_TO_PROCESS = 0xC000


class RetrieveService:
    def __init__(self, config, index_health: IndexHealth):
        self.location: IndexLocation = config.index_location
        self.index_timeout = config.index_timeout
        self.data_dir = config.data_dir
        self.config = config  # `peers` and the timeouts of our associations
        self.index_health = index_health

    def join(self, session: Session) -> "RetrieveConversation":
        return RetrieveConversation(self, session)


class RetrieveConversation(Conversation):
    def __init__(self, service: RetrieveService, session: Session):
        self.service = service
        self.session = session
        self.get: Get | None = None  # the C-GET whose C-STORE-RSP is awaited

    def request(
        self, command: dimse.Command, outbox: Outbox
    ) -> "IncomingIdentifier | Unserved | None":
        if _RESPONSE.get(outbox.abstract_syntax) != dimse.response_field(command.field):
            # Not an operation of the context's SOP class (a C-MOVE on a storage context).
            if command.has_dataset:
                return Unserved(self.session, command, outbox)
            outbox.send(unrecognized(self.session, command))
            return None
        if command.has_dataset:
            return IncomingIdentifier(self, command, outbox)
        reason = "retrieve request without an identifier"
        operation = _kind(command).name
        self.session.log.warning(
            f"{operation}.refused", status=f"0x{UNABLE_TO_PROCESS:04X}", reason=reason
        )
        if metrics.recorder is not None:
            metrics.recorder.retrieve_ended(operation, "refused")
        outbox.send(failure_response(command, UNABLE_TO_PROCESS, reason))
        return None

    def response(self, command: dimse.Command) -> bool:
        get = self.get
        if command.field != dimse.C_STORE_RSP or get is None:
            return False
        return get.stored(command)


class IncomingIdentifier(Identifier):
    """A C-MOVE-RQ's or C-GET-RQ's identifier on its way in, then the retrieve."""

    limit = 16 * 1024 * 1024  # a long list of UIDs

    def __init__(self, conversation: RetrieveConversation, command, outbox: Outbox):
        super().__init__(command, outbox)
        self.conversation = conversation

    def finish(self) -> None:
        kind = _kind(self.command)
        self.outbox.stream(lambda: kind(self, bytes(self._data)))


class Retrieval(IndexResponses):
    """One retrieve being served: `next_response` runs one sub-operation at a
    time and gives a response when one is due (None otherwise) until `done`."""

    name = ""  # "move" or "get", for the log

    def __init__(self, incoming: IncomingIdentifier, data: bytes):
        conversation = incoming.conversation
        super().__init__(conversation.service, conversation.session, incoming.command)
        self.outbox = incoming.outbox
        syntax = syntax_of(self.outbox.transfer_syntax)
        sop_class = self.command.uid(dimse.AFFECTED_SOP_CLASS_UID) or ""
        self.tally = Tally(
            dimse.response_field(self.command.field), self.message_id, sop_class,
            explicit=not syntax.implicit,
        )  # fmt: skip
        try:
            self.query = self._read(sop_class, data)
        except Refused as refused:
            self._failure = refused

    def _read(self, sop_class: str, data: bytes) -> find.Query:
        root = ROOTS.get(sop_class)
        if root is None or dimse.response_field(self.command.field) != _RESPONSE[sop_class]:
            raise Refused(
                SOP_CLASS_NOT_SUPPORTED, f"{sop_class} is no Patient or Study Root {self.name}"
            )
        try:
            dataset = decode_dataset(data, self.outbox.transfer_syntax)
            level = str(dataset.get("QueryRetrieveLevel", "") or "").strip().upper()
            find.check_level(level)
            keys = {}
            for keyword in find.retrieve_keywords(level):
                value = value_text(dataset.get(keyword))
                if value is not None:
                    keys[keyword] = value
            query = find.Query(root, level, keys)
            find.check_retrieve(query)
        except find.QueryError as exc:
            raise Refused(IDENTIFIER_DOES_NOT_MATCH, str(exc)) from exc
        except Exception as exc:  # pydicom raises many kinds on malformed data
            raise Refused(UNABLE_TO_PROCESS, f"identifier does not decode: {exc}") from exc
        return query

    # -- the responses -----------------------------------------------------------------

    def next_response(self) -> tuple[bytes, bytes] | None:
        if self._failure is not None:
            return self._refused(self._failure)
        try:
            if self._rows is None:
                return self._start()
            if self.cancelled:
                return self._final(cancelled=True)
            match = next(self._rows, None)
        except Exception as exc:
            return self._index_unread(exc)
        if match is None:
            return self._final()
        return self._sub_operation(match)

    def _start(self) -> tuple[bytes, bytes] | None:
        """Count the matches, get ready to send them; the first response if
        there is nothing to send."""
        contents = self._open_reader().retrieve_contents(self.query)
        self.matches = self.tally.remaining = sum(contents.values())
        self.session.log.info(
            f"{self.name}.request",
            level=self.query.level,
            root=self.query.root,
            keys=self.query.keys,
            matches=self.matches,
            **self._describe(),
        )
        refusal = self._prepare(contents)
        if refusal is not None:
            return refusal
        if not self.matches:
            return self._final()
        self._rows = Matches(self.service.data_dir, self._reader.retrieve(self.query))
        return None

    def _sub_operation(self, match: Match) -> tuple[bytes, bytes] | None:
        raise NotImplementedError

    def _prepare(self, contents: dict) -> tuple[bytes, bytes] | None:
        """Ready the sub-operations; a final response if they cannot start."""
        raise NotImplementedError

    def _describe(self) -> dict:
        return {}

    def _failed(self, instance: find.StoredInstance, reason: str) -> None:
        self.tally.did_fail(instance.sop_instance_uid)
        if metrics.recorder is not None:
            metrics.recorder.sub_operation_ended(self.name, "failed")
        self.session.log.warning(
            "retrieve.failed",
            sop_instance_uid=instance.sop_instance_uid,
            sop_class_uid=instance.sop_class_uid,
            reason=reason,
            **self._describe(),
        )

    def _stored(self, instance: find.StoredInstance, status: int, comment: str) -> None:
        why = store_failure(status, comment)
        if why is not None:
            self._failed(instance, why)
        else:
            self.tally.succeeded(warned=status != 0)
            if metrics.recorder is not None:
                metrics.recorder.sub_operation_ended(
                    self.name, "warning" if status != 0 else "completed"
                )

    def _fail_the_rest(self, reason: str) -> None:
        """Every match not sent yet is a failed sub-operation (the way to send is gone)."""
        for instance in self._rows.unsent():
            self._failed(instance, reason)

    def _final(self, cancelled: bool = False) -> tuple[bytes, bytes]:
        self.done = True
        self.close()
        status, response = self.tally.final(cancelled)
        tally = self.tally
        self.session.log.info(
            f"{self.name}.end",
            status=f"0x{status:04X}",
            matches=self.matches,
            completed=tally.completed,
            failed=tally.failed,
            warning=tally.warning,
            cancelled=cancelled,
            ms=self._ms(),
            **self._describe(),
        )
        if metrics.recorder is not None:
            metrics.recorder.retrieve_ended(self.name, _OUTCOMES[status])
        return response

    def _refused(self, refused: Refused, outcome: str = "refused") -> tuple[bytes, bytes]:
        """The one response, without counts, to a retrieve refused before its
        sub-operations, or whose index could not be read ("failed")."""
        self.done = True
        self.close()
        self.session.log.warning(
            f"{self.name}.refused",
            status=f"0x{refused.status:04X}",
            reason=refused.reason,
            **self._describe(),
        )
        if metrics.recorder is not None:
            metrics.recorder.retrieve_ended(self.name, outcome)
        return self.tally.refusal(refused.status, refused.reason)

    def close(self) -> None:
        if self._rows is not None:  # the check ahead ends, its file is closed
            self._rows.close()
        super().close()

    def _index_unread(self, exc: Exception) -> tuple[bytes, bytes]:
        why = self._index_failed(exc, f"{self.name}.failed", "retrieve")
        return self._refused(Refused(UNABLE_TO_PROCESS, why), outcome="failed")


class Move(Retrieval):
    """A C-MOVE: sub-operations on one association of ours to the destination."""

    name = "move"

    def __init__(self, incoming: IncomingIdentifier, data: bytes):
        self.destination_ae = incoming.command.text(dimse.MOVE_DESTINATION).strip()
        self.destination: Destination | None = None
        super().__init__(incoming, data)

    def _describe(self) -> dict:
        return {"destination": self.destination_ae}

    def _prepare(self, contents: dict) -> tuple[bytes, bytes] | None:
        config = self.service.config
        address = peer_address(config, self.destination_ae)
        if address is None:
            return self._refused(
                Refused(
                    MOVE_DESTINATION_UNKNOWN,
                    f"move destination {self.destination_ae!r} unknown: add it to peers"
                    " (AE = HOST:PORT)",
                )
            )
        if not contents:
            return None
        requestor = Requestor(config.aet, timeout=config.network_timeout)
        host, port, wanted = address[0], address[1], proposals(contents)
        originator = (self.session.provenance.calling_ae, self.message_id)
        try:
            self.destination = Destination(
                lambda: requestor.associate(host, port, self.destination_ae, wanted), originator
            )
        except AssociationError as exc:
            self._rows = Matches(self.service.data_dir, self._reader.retrieve(self.query))
            self._fail_the_rest(str(exc))
            return self._final()
        return None

    def _sub_operation(self, match: Match) -> tuple[bytes, bytes] | None:
        try:
            status, comment = self.destination.store(match, self._rows.check_ahead)
        except (Unsendable, AssociationError) as exc:  # the next goes on
            self._failed(match.instance, str(exc))
        except DestinationLost as exc:
            self._failed(match.instance, str(exc))
            self._fail_the_rest(str(exc))
            return self._final()
        else:
            self._stored(match.instance, status, comment)
        return self.tally.pending_due()

    def _final(self, cancelled: bool = False) -> tuple[bytes, bytes]:
        if self.destination is not None:
            destination, self.destination = self.destination, None
            destination.close()
        return super()._final(cancelled)

    def close(self) -> None:
        if self.destination is not None:  # the requester went away mid-move
            destination, self.destination = self.destination, None
            destination.abort()
        super().close()


class Get(Retrieval):
    """A C-GET: sub-operations back on the requester's association."""

    name = "get"

    def __init__(self, incoming: IncomingIdentifier, data: bytes):
        self.conversation = incoming.conversation
        self._sending: find.StoredInstance | None = None
        self._message_ids = 0
        self._settled = False
        super().__init__(incoming, data)

    def _prepare(self, contents: dict) -> tuple[bytes, bytes] | None:
        self.conversation.get = self
        return None

    def _sub_operation(self, match: Match) -> tuple[bytes, bytes] | None:
        instance = match.instance
        backs = [
            o for o in self.outbox.requests_back() if o.abstract_syntax == instance.sop_class_uid
        ]
        self._message_ids = self._message_ids % 0xFFFF + 1
        command = dimse.store_request(
            self._message_ids, instance.sop_class_uid, instance.sop_instance_uid
        )
        try:
            syntax = choose_syntax(instance, (o.transfer_syntax for o in backs))
            back = next(o for o in backs if o.transfer_syntax == syntax)
            send_instance(back.send, back.send_from, match, syntax, command)
        except Unsendable as exc:
            self._failed(instance, str(exc))
            return self.tally.pending_due()
        except OSError as exc:  # the file, read while sending: nothing can follow
            self._failed(instance, f"reading {instance.path} failed while sending: {exc}")
            raise
        self._sending, self.awaiting_response = instance, True
        self._rows.check_ahead()  # while the requester stores this one
        return None

    def stored(self, command: dimse.Command) -> bool:
        """The requester's C-STORE-RSP to the sub-operation in flight."""
        instance = self._sending
        if instance is None or command.responds_to != self._message_ids:
            return False
        self._sending, self.awaiting_response, self._settled = None, False, True
        status = command.status if command.status is not None else UNABLE_TO_PROCESS
        self._stored(instance, status, command.text(dimse.ERROR_COMMENT))
        return True

    def next_response(self) -> tuple[bytes, bytes] | None:
        if self._settled:  # a C-STORE-RSP came in since the last turn
            self._settled = False
            pending = self.tally.pending_due()
            if pending is not None:
                return pending
        return super().next_response()

    def close(self) -> None:
        if self.conversation.get is self:
            self.conversation.get = None
        super().close()


_RESPONSE = {
    PATIENT_ROOT_MOVE: dimse.C_MOVE_RSP,
    STUDY_ROOT_MOVE: dimse.C_MOVE_RSP,
    PATIENT_ROOT_GET: dimse.C_GET_RSP,
    STUDY_ROOT_GET: dimse.C_GET_RSP,
}
# A retrieve's final status, as its outcome in the metrics.
_OUTCOMES = {
    SUCCESS: "success",
    WARNING: "warning",
    UNABLE_TO_PERFORM_SUB_OPERATIONS: "failed",
    CANCEL: "cancelled",
}
# Every outcome a retrieve is counted with: a refused one has no final status of its own.
OUTCOMES = (*_OUTCOMES.values(), "refused")


def _kind(command: dimse.Command) -> type[Retrieval]:
    """The retrieve a C-MOVE-RQ or C-GET-RQ asks for."""
    return Move if command.field == dimse.C_MOVE_RQ else Get
