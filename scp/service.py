"""The DIMSE service protocol: what the association asks of a service, and the
outbox through which a service answers.

The association frames P-DATA into messages and routes each by its Command
Field through one table (`Receiver` builds it: Command Field -> `Service`).
When an association is established, every service of the table joins it: its
`Conversation` holds what the service keeps about that association. Each
request goes to `Conversation.request` with the `Outbox` of its presentation
context; a request that announces a data set is answered once that data set
has arrived (`Incoming.finish`). A response to one of our own requests goes to
`Conversation.response`. A service never sees the upper layer: the outbox is
all it can do on the association. A new service is one module with a
`Service` and one line in the table.
"""

from collections.abc import Callable
from typing import Protocol

from scp import dimse
from scp.session import Session


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

    def send_from(self, command: bytes, source, length: int) -> None:
        """A message whose data set is the next `length` bytes of the binary
        file `source`, read and sent a PDU at a time."""
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


def index_read_failed(
    session: Session, location, health, exc: Exception, event: str, what: str
) -> str:
    """A read of the index for a `what` ("query", "retrieve") failed with `exc`:
    damage is logged and told to `health` (the admin's to repair: the reason
    says how), anything else is logged as `event` with its traceback. The
    ErrorComment that says so."""
    damage = location.corruption(exc)
    if damage is not None:
        session.log.error("index.corrupt", reason=str(damage))
        health.damaged(str(damage))
        return "receiver's index is damaged"
    session.log.exception(event)
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


def unrecognized(session: Session, command: dimse.Command) -> bytes:
    """The response to a request no service of ours serves."""
    session.log.warning("dimse.unrecognized", command_field=f"0x{command.field:04X}")
    return dimse.response(
        dimse.response_field(command.field),
        command.message_id,
        dimse.UNRECOGNIZED_OPERATION,
        sop_class_uid=command.uid(dimse.AFFECTED_SOP_CLASS_UID),
        error_comment="operation not served by this SCP",
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
