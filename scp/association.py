"""One association, from its A-ASSOCIATE-RQ to its end, in its connection's thread.

`Association` is the service user of the upper layer (scp/upper_layer.py): it
decides whether to accept (who calls, from where, whether there is room) and
what (the presentation contexts, below), assembles DIMSE messages from P-DATA
fragments, and routes each by its Command Field through the table of services,
which answer through the `Outbox` of the request's presentation context. A
dataset's fragments go straight to the service that receives it; nothing of a
message is kept beyond its command set.

Each association has a `Session`: an id, a logger bound once with the id and
the peer (and, once the request is read, the AE titles), and the totals its end
reports.

**The DIMSE service protocol.** The table (`scp.server.Listeners` builds it) maps a Command
Field to a `Service`. A service joins an association at its first message: its
`Conversation` holds what the service keeps about that association. Each
request goes to `Conversation.request` with the `Outbox` of its presentation
context; a request that announces a data set is answered once that data set
has arrived (`Incoming.finish`). A response to one of our own requests goes to
`Conversation.response`. A service never sees the upper layer: the outbox is
all it can do on the association. A new service is one module with a
`Service` and one line in the table.

**What we accept.** pynetdicom decodes the A-ASSOCIATE-RQ, negotiates the
presentation contexts (with SCP/SCU role selection) and encodes the
A-ASSOCIATE-AC; `agree` decides. Every storage SOP class is accepted, private
and unknown ones included (in both roles: a C-GET's requester takes the SCP
role for them), with Verification, Storage Commitment Push Model and
Patient/Study Root FIND, MOVE and GET beside them. When a sender proposes several syntaxes
for a storage context, we take the one that lets it send its object as it is:
compressed before uncompressed, so a JPEG 2000 image is never decompressed on
the way (and dcmtk's storescu, which cannot convert, does not fail). Among the
uncompressed ones the proposal says nothing about the object: dcmtk's storescu
proposes [explicit LE] and [big endian, implicit LE] for every object (with -R
too), dcmsend all three in one context. Implicit VR before big endian, then, so
that what is common (implicit VR) goes as it is and what is retired (big
endian) is converted; a sender keeps a big-endian object as it is by proposing
big endian alone (storescu -xb).
"""

import functools
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import structlog
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import sop_class
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_items import (
    AbstractSyntaxSubItem,
    PresentationContextItemRQ,
    TransferSyntaxSubItem,
    UserInformationItem,
)
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from scp import dimse, metrics
from scp.access import CallerPolicy
from scp.config import Config
from scp.upper_layer import (
    APPLICATION_CONTEXT_NAME,
    Abort,
    AcceptorLayer,
    ProtocolError,
    ServiceUser,
    State,
    our_user_information,
)
from storage.catalog import Provenance
from storage.catalog.reads import CatalogReader
from storage.store import InstanceStore

# -- one association's record: its id, log and totals ----------------------------------

_association_numbers = itertools.count(1)
_STARTED = int(time.time()) % 0x10000


@dataclass
class Session:
    """What we know and count about one association, and how its end is logged."""

    id: str
    host: str
    peer: str
    log: structlog.typing.FilteringBoundLogger
    provenance: Provenance = field(default_factory=Provenance)
    started: float = field(default_factory=time.monotonic)
    instances: int = 0
    bytes: int = 0
    refused: int = 0
    outcome: str = "closed"  # closed (no association), rejected, released or aborted
    reason: str | None = None  # why it was rejected or aborted
    established: bool = False

    @classmethod
    def open(cls, host: str, port: int) -> "Session":
        # The pid and start time tell apart the associations of listener processes
        # (workers fork after this module is imported) and of restarts.
        session_id = f"{os.getpid():x}-{_STARTED:04x}-{next(_association_numbers)}"
        peer = f"{host}:{port}"
        log = structlog.get_logger("imaging_scp").bind(assoc=session_id, peer=peer)
        if metrics.recorder is not None:
            metrics.recorder.association_started()
        return cls(id=session_id, host=host, peer=peer, log=log)

    def requested(self, calling_ae: str, called_ae: str) -> None:
        self.provenance = Provenance(calling_ae, called_ae, self.peer, self.id)
        self.log = self.log.bind(calling_ae=calling_ae, called_ae=called_ae)

    def ended(self) -> None:
        """Log the end, with the association's totals."""
        log = self.log.warning if self.outcome == "aborted" else self.log.info
        log(
            "association.end",
            outcome=self.outcome,
            **({"reason": self.reason} if self.reason and self.outcome == "aborted" else {}),
            instances=self.instances,
            bytes=self.bytes,
            refused=self.refused,
            seconds=round(time.monotonic() - self.started, 3),
        )
        if metrics.recorder is not None:
            metrics.recorder.association_ended(self.outcome)


# -- the DIMSE service protocol --------------------------------------------------------


class Responses(Protocol):
    """A request answered by several responses over time (a C-FIND's, a
    C-MOVE's): the association asks for them one at a time between its reads,
    so that a C-CANCEL-RQ naming `message_id` is seen before the next one."""

    message_id: int
    done: bool  # the last response was given
    # Asked for nothing while True: a response from the peer is awaited (a
    # C-GET's C-STORE-RSP), which the association's reads bring in.
    awaiting_response: bool

    def next_response(self) -> tuple[bytes, bytes] | None:
        """The next (command set, data set) to send; None: nothing this turn
        (a retrieve's sub-operation went out instead)."""
        ...

    def cancel(self) -> None: ...

    def close(self) -> None:
        """The association ended, or the last response was given: let go."""
        ...


class Outbox(Protocol):
    """The way back to the requester, on the presentation context the request came on."""

    abstract_syntax: str
    transfer_syntax: str  # of that context, for the data sets sent on it

    def send(self, command: bytes, dataset: bytes = b"") -> None: ...

    def send_from(self, command: bytes, pieces, length: int) -> None:
        """A message whose `length`-byte data set comes as `pieces` (buffers
        in order, each valid until the next is taken), sent a piece at a time."""
        ...

    def requests_back(self) -> "list[Outbox]":
        """The association's contexts on which we may send requests to the
        requester (it took the SCP role there: a C-GET's storage contexts)."""
        ...

    def stream(self, start: Callable[[], Responses]) -> None:
        """Send the responses `start()` gives, one at a time between reads,
        until done. A request whose responses are to be streamed while another
        one's are still going out breaks the asynchronous operations window we
        negotiated (1/1): `start` is not called, the association is aborted."""
        ...

    def peer_is_leaving(self, wait: float) -> bool:
        """Whether the requester's next PDU, within `wait` seconds, releases or aborts."""
        ...


class Incoming(Protocol):
    """The data set of one request, on its way in."""

    def write(self, fragment) -> None:
        """One P-DATA fragment of it (a memoryview valid until the call returns)."""
        ...

    def discard(self) -> None:
        """The association ended before the last fragment."""
        ...

    def finish(self) -> None:
        """The last fragment arrived: answer through the outbox."""
        ...


class Identifier:
    """The identifier of a C-FIND, C-MOVE or C-GET request on its way in (an
    `Incoming`), kept up to `limit` bytes; `finish` answers the request."""

    limit = 1024 * 1024  # an identifier is a few hundred bytes (a list of UIDs, more)

    def __init__(self, command: dimse.Command, outbox: Outbox):
        self.command = command
        self.outbox = outbox
        self._data = bytearray()

    def write(self, fragment) -> None:
        if len(self._data) < self.limit:
            self._data += fragment

    def discard(self) -> None:
        self._data = bytearray()

    def finish(self) -> None:
        raise NotImplementedError


class Refused(Exception):
    """A request answered by one failure: its `status`, and `reason`, its ErrorComment."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class IndexResponses:
    """What the `Responses` of a request answered from the index share (a
    C-FIND's matches, a retrieve's sub-operations): the request, the failure
    found before any row (`_failure`), the catalog reader whose cursor gives the
    rows, and the end. The service has the index's `location` and `index_health`."""

    awaiting_response = False

    def __init__(self, service, session: Session, command: dimse.Command):
        self.service = service
        self.session = session
        self.command = command
        self.message_id = command.message_id
        self.done = False
        self.cancelled = False
        self.matches = 0
        self._started = time.perf_counter()
        self._reader: CatalogReader | None = None
        self._rows = None
        self._failure: Refused | None = None

    def _open_reader(self) -> CatalogReader:
        """A reader from this process's pool (within index_timeout), held until `close`."""
        self._reader = CatalogReader.open(
            self.service.location, pooled=True, timeout=self.service.index_timeout
        )
        return self._reader

    def cancel(self) -> None:
        self.cancelled = True

    def close(self) -> None:
        """The association ended, or the last response was given: let the cursor go."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _ms(self) -> float:
        """Milliseconds since the request arrived, for its end's log line."""
        return round((time.perf_counter() - self._started) * 1000, 1)

    def _index_failed(self, exc: Exception, event: str, what: str) -> str:
        """A read of the index for a `what` ("query", "retrieve") failed with
        `exc`: damage is logged and told to the index's health (the admin's to
        repair: the reason says how), anything else is logged as `event` with
        its traceback. The ErrorComment that says so."""
        damage = self.service.location.corruption(exc)
        if damage is not None:
            self.session.log.error("index.corrupt", reason=str(damage))
            self.service.index_health.damaged(str(damage))
            return "receiver's index is damaged"
        self.session.log.exception(event)
        return f"{what} failed: {type(exc).__name__}"


class Conversation:
    """A service's part in one association."""

    def request(self, command: dimse.Command, outbox: Outbox) -> Incoming | None:
        """A request of this service: the receiver of its data set when the
        command announces one, else None (answered already)."""
        raise NotImplementedError

    def response(self, command: dimse.Command) -> bool:
        """A response: True when it answers one of this service's requests."""
        return False

    def ended(self, session: Session) -> None:
        """The association ended (its outcome is in `session`)."""


class Service(Protocol):
    def join(self, session: Session) -> Conversation:
        """This service's part in a newly established association."""
        ...


def failure_response(command: dimse.Command, status: int, comment: str) -> bytes:
    """The one response to a request that fails with `status` before anything else."""
    return dimse.response(
        dimse.response_field(command.field),
        command.message_id,
        status,
        sop_class_uid=command.uid(dimse.AFFECTED_SOP_CLASS_UID),
        error_comment=comment,
    )


def unrecognized(session: Session, command: dimse.Command) -> bytes:
    """The response to a request no service of ours serves."""
    session.log.warning("dimse.unrecognized", command_field=f"0x{command.field:04X}")
    return failure_response(
        command, dimse.UNRECOGNIZED_OPERATION, "operation not served by this SCP"
    )


class Unserved:
    """The data set of a request we do not serve: read and dropped, then the
    request is answered as unrecognized."""

    def __init__(self, session: Session, command: dimse.Command, outbox: Outbox):
        self.session = session
        self.command = command
        self.outbox = outbox

    def write(self, fragment) -> None:
        pass

    def discard(self) -> None:
        pass

    def finish(self) -> None:
        self.outbox.send(unrecognized(self.session, self.command))


# -- what we accept --------------------------------------------------------------------

MAX_PRESENTATION_CONTEXTS = 128  # PS3.8 9.3.2.2: odd IDs 1 to 255

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_NO_REASON = (0x01, 0x01, 0x01)
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_BUSY = (0x02, 0x03, 0x02)  # transient: local limit exceeded
# How a connection ends (Session.outcome), as counted.
OUTCOMES = ("closed", "rejected", "released", "aborted")
# Each one's name in PS3.8's table, for the metrics.
REJECTION_NAMES = {
    REJECT_NO_REASON: "no-reason-given",
    REJECT_APPLICATION_CONTEXT: "application-context-name-not-supported",
    REJECT_CALLING_AE: "calling-ae-title-not-recognized",
    REJECT_CALLED_AE: "called-ae-title-not-recognized",
    REJECT_BUSY: "local-limit-exceeded",
}


class RequestError(ValueError):
    """An A-ASSOCIATE-RQ that does not decode."""


class Proposed(NamedTuple):
    """A presentation context the requester proposes."""

    context_id: int
    abstract_syntax: UID | None
    transfer_syntax: list[UID]  # in the requester's order


@dataclass(frozen=True)
class Request:
    """What an A-ASSOCIATE-RQ asks."""

    calling_ae: str
    called_ae: str
    application_context: str
    contexts: list[Proposed]
    max_pdu: int  # what the requestor receives: 0 = no limit
    roles: dict[str, tuple[bool, bool]]  # SOP class: (SCU role, SCP role)
    async_ops: tuple[int, int] | None


@dataclass
class Agreement:
    """The accepted contexts, by ID, and the A-ASSOCIATE-AC that says so."""

    pdu: bytes
    contexts: dict[int, PresentationContext] = field(default_factory=dict)
    rejected: int = 0


def read_request(pdu: bytes) -> Request:
    """Decode an A-ASSOCIATE-RQ PDU; RequestError for one pynetdicom cannot take
    apart or whose contents make no sense (an even context ID, say)."""
    try:
        rq = A_ASSOCIATE_RQ()
        rq.decode(pdu)
        # As rq.to_primitive(), but for the presentation contexts (`_proposed`).
        primitive = A_ASSOCIATE()
        primitive.calling_ae_title = rq.calling_ae_title
        primitive.called_ae_title = rq.called_ae_title
        primitive.application_context_name = rq.application_context_name
        contexts = []
        for item in rq.variable_items:
            if isinstance(item, PresentationContextItemRQ):
                contexts.append(_proposed(item))
            elif isinstance(item, UserInformationItem):
                primitive.user_information = item.to_primitive()
        roles, async_ops, max_pdu = {}, None, 0
        for item in primitive.user_information:
            if isinstance(item, MaximumLengthNotification):
                max_pdu = item.maximum_length_received or 0
            elif isinstance(item, SCP_SCU_RoleSelectionNegotiation):
                roles[str(item.sop_class_uid)] = (bool(item.scu_role), bool(item.scp_role))
            elif isinstance(item, AsynchronousOperationsWindowNegotiation):
                async_ops = (
                    item.maximum_number_operations_invoked,
                    item.maximum_number_operations_performed,
                )
        return Request(
            calling_ae=str(primitive.calling_ae_title).strip(),
            called_ae=str(primitive.called_ae_title).strip(),
            application_context=str(primitive.application_context_name or ""),
            contexts=contexts,
            max_pdu=max_pdu,
            roles=roles,
            async_ops=async_ops,
        )
    except Exception as exc:  # pynetdicom raises many kinds on malformed input
        raise RequestError(f"A-ASSOCIATE-RQ does not decode: {type(exc).__name__}: {exc}") from exc


def _proposed(item: PresentationContextItemRQ) -> Proposed:
    """A decoded presentation context item, read as pynetdicom's to_primitive
    reads it (the last abstract syntax; each transfer syntax once, empty ones
    left out) without building a PresentationContext: that validates again
    every UID the decoding validated (~500 for dcmtk getscu's request)."""
    context_id = item.presentation_context_id
    if context_id % 2 == 0:  # one byte: 0 to 255
        raise ValueError(f"even presentation context ID {context_id}")
    abstract_syntax, syntaxes = None, []
    for sub_item in item.abstract_transfer_syntax_sub_items:
        if isinstance(sub_item, TransferSyntaxSubItem):
            syntax = sub_item.transfer_syntax_name
            if syntax and syntax not in syntaxes:
                syntaxes.append(syntax)
        elif isinstance(sub_item, AbstractSyntaxSubItem):
            abstract_syntax = sub_item.abstract_syntax_name
    return Proposed(context_id, abstract_syntax, syntaxes)


@functools.lru_cache(maxsize=1024)
def transfer_syntax_preference(uid: str) -> int:
    """Rank of a proposed transfer syntax, lowest preferred. Kept per UID: a
    C-GET's requester proposes the same few syntaxes for each of ~120 classes."""
    syntax = UID(uid)
    if not syntax.is_transfer_syntax:
        # A private syntax: DICOM requires it to encode the dataset in explicit
        # VR little endian, which we can read; but a known syntax is safer.
        return 5
    if syntax.is_compressed:
        return 0
    if syntax.is_deflated:
        return 1
    return {ExplicitVRLittleEndian: 2, ImplicitVRLittleEndian: 3, ExplicitVRBigEndian: 4}.get(
        syntax, 5
    )


def sending_preference(uid: str) -> int:
    """Rank of a transfer syntax for a context we only send on (the C-STOREs of
    a C-GET), lowest preferred: the syntaxes every uncompressed stored object can
    be sent in (scp.sub_operations converts within little endian) before the
    rest, which fit only the objects stored in them."""
    return {ExplicitVRLittleEndian: 0, ImplicitVRLittleEndian: 1}.get(
        uid, 2 + transfer_syntax_preference(uid)
    )


class _Supported(NamedTuple):
    """A context we accept, as `negotiate_as_acceptor` reads it on the
    acceptor's side. Not a pynetdicom PresentationContext: that one validates
    each UID again when set, and these are the requester's, validated as its
    A-ASSOCIATE-RQ was decoded (or our own constants)."""

    abstract_syntax: str
    transfer_syntax: tuple[str, ...]  # in our order of preference
    scu_role: bool | None = None  # None: no role selection for it
    scp_role: bool | None = None


@functools.lru_cache(maxsize=1024)
def _storage_like(uid: UID) -> bool:
    """Whether an abstract syntax is accepted as storage: a storage SOP class,
    a private one, or one pynetdicom does not know (kept per UID, as above)."""
    service = sop_class.uid_to_service_class(uid)
    # Not by keyword alone: pynetdicom names some classes unlike pydicom
    # (Modality Worklist FIND), and those are not storage.
    storage_like = (
        uid.is_private
        or service is StorageServiceClass
        or (service is ServiceClass and not hasattr(sop_class, uid.keyword))
    )
    return storage_like and uid not in _SERVICES


def _storage_contexts(
    proposed: list[Proposed], roles: dict[str, tuple[bool, bool]]
) -> list[_Supported]:
    """Acceptor contexts for the proposed storage-like abstract syntaxes: each
    in every transfer syntax proposed for it, as SCU and SCP, in the order of
    `transfer_syntax_preference` — the acceptor's order is the one
    `negotiate_as_acceptor` chooses by — or of `sending_preference` for a class
    the requester takes only the SCP role of: we only send on its contexts."""
    syntaxes: dict[str, list[str]] = {}
    for cx in proposed:
        if _storage_like(cx.abstract_syntax):
            offered = syntaxes.setdefault(cx.abstract_syntax, [])
            offered += [ts for ts in cx.transfer_syntax if ts not in offered]
    contexts = []
    for uid, offered in syntaxes.items():
        only_sent = roles.get(uid) == (False, True)
        preference = sending_preference if only_sent else transfer_syntax_preference
        contexts.append(_Supported(uid, tuple(sorted(offered, key=preference)), True, True))
    return contexts


_QUERY_RETRIEVE = (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)
# Verification, Storage Commitment Push Model (scp.commitment_service), the
# FIND models (scp.find_service) and the MOVE and GET ones
# (scp.retrieve_service), as SCP.
_SERVICES = (Verification, StorageCommitmentPushModel, *_QUERY_RETRIEVE)
# Each in the uncompressed syntaxes (little endian only for queries: their
# responses are encoded by hand).
_SERVICE_CONTEXTS = [
    _Supported(
        uid,
        (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        + (() if uid in _QUERY_RETRIEVE else (ExplicitVRBigEndian,)),
    )
    for uid in _SERVICES
]


def agree(request: Request, max_pdu: int) -> Agreement:
    """Negotiate the proposed contexts and encode the A-ASSOCIATE-AC."""
    proposed = [cx for cx in request.contexts if cx.transfer_syntax]
    supported = _SERVICE_CONTEXTS + _storage_contexts(proposed, request.roles)
    results, roles = negotiate_as_acceptor(proposed, supported, request.roles)
    for rq in request.contexts:
        if not rq.transfer_syntax:  # nothing to choose from
            empty = PresentationContext()
            empty.context_id = rq.context_id
            empty.abstract_syntax = rq.abstract_syntax
            empty.transfer_syntax = [ImplicitVRLittleEndian]
            empty.result = 0x04  # transfer syntaxes not supported
            results.append(empty)
    results.sort(key=lambda cx: cx.context_id)

    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT_NAME
    primitive.calling_ae_title = request.calling_ae or "UNKNOWN"
    primitive.called_ae_title = request.called_ae
    primitive.result = 0x00
    primitive.result_source = 0x01
    primitive.presentation_context_definition_results_list = results
    information = our_user_information(max_pdu)
    if request.async_ops is not None:
        # One operation at a time, each way: what we serve (PS3.7 D.3.3.3).
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = 1
        window.maximum_number_operations_performed = 1
        information.append(window)
    information.extend(roles)
    primitive.user_information = information
    ac = A_ASSOCIATE_AC()
    ac.from_primitive(primitive)
    accepted = {cx.context_id: cx for cx in results if cx.result == 0x00}
    return Agreement(ac.encode(), accepted, len(results) - len(accepted))


# -- the association -------------------------------------------------------------------

_COMMAND = 0x01
_LAST = 0x02
_MAX_COMMAND_SET = 64 * 1024  # a command set is a few hundred bytes


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


def _verification_only(request: Request) -> bool:
    return all(cx.abstract_syntax == Verification for cx in request.contexts)


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

    __slots__ = ("association", "context_id", "abstract_syntax", "transfer_syntax", "as_scu")

    def __init__(self, association: "Association", context_id: int, cx: PresentationContext):
        self.association = association
        self.context_id = context_id
        self.abstract_syntax = str(cx.abstract_syntax)
        self.transfer_syntax = str(cx.transfer_syntax[0])
        self.as_scu = bool(cx.as_scu)  # we may send requests on it (role selection)

    def send(self, command: bytes, dataset: bytes = b"") -> None:
        self.association.layer.send_message(self.context_id, command, dataset)

    def send_from(self, command: bytes, pieces, length: int) -> None:
        self.association.layer.send_message_from(self.context_id, command, pieces, length)

    def requests_back(self) -> list["_Outbox"]:
        return [outbox for outbox in self.association.outboxes.values() if outbox.as_scu]

    def stream(self, start: Callable[[], Responses]) -> None:
        self.association.stream(self.context_id, start)

    def peer_is_leaving(self, wait: float) -> bool:
        return self.association.layer.peer_is_leaving(wait)


class Association(ServiceUser):
    def __init__(self, associations: Associations, sock: socket.socket, session: Session):
        config = associations.config
        self.associations = associations
        self.session = session
        self.layer = AcceptorLayer(
            sock,
            self,
            max_pdu=config.max_pdu,
            # ARTIM while waiting for the A-ASSOCIATE-RQ: no longer than a
            # silent connection may last otherwise.
            artim_timeout=min(config.network_timeout, 30),
            network_timeout=config.network_timeout,
        )
        self.outboxes: dict[int, _Outbox] = {}  # by accepted presentation context ID
        # The part in this association of each service it has used (a service
        # joins at its first message), by the Command Fields routed to it.
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

    def associate_requested(self, layer: AcceptorLayer, pdu: bytes) -> None:
        session = self.session
        try:
            request = read_request(pdu)
        except RequestError as exc:
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
                metrics.recorder.association_rejected(REJECTION_NAMES[rejection])
            layer.reject(*rejection)
            return
        agreement = agree(request, config.max_pdu)
        self.outboxes = {
            context_id: _Outbox(self, context_id, cx)
            for context_id, cx in agreement.contexts.items()
        }
        layer.accept(agreement.pdu, request.max_pdu)
        session.established = True
        session.log.info(
            "association.accepted",
            contexts=len(agreement.contexts),
            rejected_contexts=agreement.rejected,
        )

    def _refusal(self, request: Request) -> tuple[str | None, tuple[int, int, int]]:
        """Why the request is refused and the A-ASSOCIATE-RJ that says so, or (None, ())."""
        config = self.associations.config
        context_ids = [cx.context_id for cx in request.contexts]
        if len(context_ids) > MAX_PRESENTATION_CONTEXTS or len(set(context_ids)) != len(
            context_ids
        ):
            # PS3.8 allows 128 contexts with distinct odd IDs; more is an attack or a bug.
            return f"{len(context_ids)} presentation contexts", REJECT_NO_REASON
        if request.application_context != APPLICATION_CONTEXT_NAME:
            return (
                f"application context {request.application_context!r} is not DICOM's",
                REJECT_APPLICATION_CONTEXT,
            )
        if config.require_called_aet and request.called_ae != config.aet:
            return (
                f"called AE title {request.called_ae!r} is not ours ({config.aet})",
                REJECT_CALLED_AE,
            )
        if not self.associations.callers.permits(request.calling_ae, self.session.host):
            return "calling AE title not allowed from this address", REJECT_CALLING_AE
        if len(self.associations.active()) > config.max_associations:
            return (
                f"{config.max_associations} associations already in progress",
                REJECT_BUSY,
            )
        if not self.associations.store.has_room():
            # Transient: the sender may retry once an admin has made room.
            return "receiver's disk is below its free-space floor", REJECT_BUSY
        health = self.associations.store.index.health
        if not health.available and not _verification_only(request):
            # Transient, as for a full disk; a C-ECHO alone is let in, for its
            # failure status to say why (`imaging-scp echo` prints it).
            return health.describe(), REJECT_BUSY
        return None, ()

    # -- DIMSE messages ----------------------------------------------------------------

    def p_data(self, layer: AcceptorLayer, context_id: int, control: int, fragment) -> None:
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

    def _command_received(self, layer: AcceptorLayer, outbox: _Outbox, data: bytes) -> None:
        try:
            command = dimse.read_command(data)
        except dimse.CommandError as exc:
            raise ProtocolError(str(exc)) from exc
        field_ = command.field
        if field_ is None:
            raise ProtocolError("a command set without a Command Field")
        conversation = self.conversations.get(field_) or self._join(field_)
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

    def _join(self, field_: int) -> Conversation | None:
        """The part of the service serving `field_` in this association, once
        it has one (None: no service serves it). A service serving several
        Command Fields has one part."""
        service = self.associations.services.get(field_)
        if service is None:
            return None
        for other, service_of_other in self.associations.services.items():
            if service_of_other is service and other in self.conversations:
                conversation = self.conversations[other]
                break
        else:
            conversation = service.join(self.session)
        self.conversations[field_] = conversation
        return conversation

    def stream(self, context_id: int, start: Callable[[], Responses]) -> None:
        """Send a request's responses one at a time, between reads (`send_output`)."""
        if self._streaming is not None:  # beyond the 1/1 window we answered
            raise ProtocolError(
                "a request answered by several responses while those to Message ID"
                f" {self._streaming.message_id} are going out"
            )
        self._streaming, self._streaming_context = start(), context_id

    def has_output(self) -> bool:
        return self._streaming is not None and not self._streaming.awaiting_response

    def send_output(self, layer: AcceptorLayer) -> None:
        streaming = self._streaming
        response = streaming.next_response()
        if streaming.done:
            self._streaming = None
        if response is not None:
            layer.send_message(self._streaming_context, *response)

    # -- the end -------------------------------------------------------------------

    def released(self) -> None:
        self.session.outcome = "released"

    def aborted(self, abort: Abort) -> None:
        session = self.session
        if session.outcome in ("rejected", "released"):
            return
        session.outcome, session.reason = "aborted", f"{abort.by}: {abort.reason}"
