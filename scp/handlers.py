"""pynetdicom event handlers: the seam between the DICOM protocol and storage.

Each association gets a `Session`: an id, a logger bound once with the id, the
calling and called AE titles and the peer address, and running totals. The
C-STORE handler hands the dataset bytes to `InstanceStore.store` and turns its
answer into a DICOM status.
"""

import itertools
import os
import threading
import time
import weakref
from dataclasses import dataclass, field

import structlog
from pydicom.dataset import Dataset
from pynetdicom import evt

from scp.access import CallerPolicy
from scp.spool import discard_partial
from storage.index import Provenance
from storage.query import mark_incomplete
from storage.store import InstanceStore, Refusal, StoreRefused

SUCCESS = 0x0000

# C-STORE failure statuses (PS3.4 B.2.3): A7xx out of resources, A900 dataset
# does not match SOP class, Cxxx cannot understand. The low byte of our Cxxx
# codes tells admins which check failed; the ErrorComment says it in words.
# Every write failure is 0xA700, the code senders know to retry on; the
# ErrorComment tells a full disk from an I/O error.
REFUSAL_STATUS = {
    Refusal.OUT_OF_SPACE: 0xA700,
    Refusal.WRITE_FAILED: 0xA700,
    Refusal.MISMATCH: 0xA900,
    Refusal.UNREADABLE: 0xC000,
    Refusal.MISSING_UID: 0xC001,
    Refusal.INVALID_UID: 0xC002,
    Refusal.SERIES_IN_OTHER_STUDY: 0xC003,
    Refusal.DUPLICATE: 0xC004,
}
INTERNAL_ERROR_STATUS = 0xC0FF

_ERROR_COMMENT_LENGTH = 64  # LO

_association_numbers = itertools.count(1)


@dataclass
class Session:
    """What we know and count about one association."""

    id: str
    host: str
    peer: str
    log: structlog.typing.FilteringBoundLogger
    provenance: Provenance = field(default_factory=Provenance)
    started: float = field(default_factory=time.monotonic)
    instances: int = 0
    bytes: int = 0
    refused: int = 0
    outcome: str = "closed"
    established: bool = False
    connection_closed: bool = False
    # Series this association stored into: marked incomplete if it breaks off.
    series_uids: set[str] = field(default_factory=set)


def status(code: int, comment: str | None = None) -> Dataset:
    """A C-STORE/C-ECHO response status, with an ErrorComment when given."""
    response = Dataset()
    response.Status = code
    if comment:
        response.ErrorComment = comment[:_ERROR_COMMENT_LENGTH]
    return response


class ReceiverHandlers:
    """The handlers bound to the receiver's association server."""

    def __init__(self, store: InstanceStore, callers: CallerPolicy | None = None):
        self.store = store
        # Replaced as a whole on SIGHUP; read once per association request.
        self.callers = callers or CallerPolicy({})
        self.log = structlog.get_logger("imaging_scp")
        self._sessions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._finish_lock = threading.Lock()
        # Distinguishes associations across restarts and listener processes.
        self._id_prefix = f"{os.getpid():x}-{int(time.time()) % 0x10000:04x}"
        # Instances stored since start, for the service's STATUS= line.
        self.stored = 0
        self._stored_lock = threading.Lock()

    def bindings(self) -> list:
        return [
            (evt.EVT_CONN_OPEN, self.on_connection_open),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_CONN_CLOSE, self.on_connection_close),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
        ]

    def active_sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def _session(self, assoc) -> Session:
        session = self._sessions.get(assoc)
        if session is None:  # an event before EVT_CONN_OPEN should not happen
            address = assoc.requestor.address_info
            session = self._open_session(assoc, address.address, address.port)
        return session

    def _open_session(self, assoc, host: str, port: int) -> Session:
        session_id = f"{self._id_prefix}-{next(_association_numbers)}"
        session = Session(
            id=session_id,
            host=host,
            peer=f"{host}:{port}",
            log=self.log.bind(assoc=session_id, peer=f"{host}:{port}"),
        )
        self._sessions[assoc] = session
        return session

    def on_connection_open(self, event) -> None:
        self._open_session(event.assoc, event.address[0], event.address[1])

    def on_requested(self, event) -> None:
        session = self._session(event.assoc)
        request = event.assoc.requestor.primitive
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        session.provenance = Provenance(calling, called, session.peer, session.id)
        session.log = session.log.bind(calling_ae=calling, called_ae=called)
        context_ids = [cx.context_id for cx in request.presentation_context_definition_list]
        if len(context_ids) > 128 or len(set(context_ids)) != len(context_ids):
            # PS3.8 allows 128 contexts with distinct odd IDs; more is an attack or a bug.
            self._reject(event.assoc, session, f"{len(context_ids)} presentation contexts",
                         result=0x01, source=0x01, diagnostic=0x01)  # fmt: skip
        elif not self.callers.permits(calling, session.host):
            self._reject(event.assoc, session, "calling AE title not allowed from this address",
                         result=0x01, source=0x01, diagnostic=0x03)  # fmt: skip
        elif not self.store.has_room():
            # Transient: the sender may retry once an admin has made room.
            self._reject(event.assoc, session, "receiver's disk is below its free-space floor",
                         result=0x02, source=0x03, diagnostic=0x02)  # fmt: skip

    def _reject(self, assoc, session: Session, reason: str, **rejection: int) -> None:
        """A-ASSOCIATE-RJ from EVT_REQUESTED; pynetdicom then negotiates nothing."""
        assoc.acse.send_reject(rejection["result"], rejection["source"], rejection["diagnostic"])
        # As pynetdicom's own rejections do: wait until the DUL has sent the
        # A-ASSOCIATE-RJ, or the socket closes first and the peer sees an abort.
        assoc.kill()
        session.log.warning(
            "association.rejected",
            reason=reason,
            permanent=rejection["result"] == 0x01,
        )
        session.outcome = "rejected"

    def on_accepted(self, event) -> None:
        session = self._session(event.assoc)
        session.established = True
        session.log.info(
            "association.accepted",
            contexts=len(event.assoc.accepted_contexts),
            rejected_contexts=len(event.assoc.rejected_contexts),
        )

    def on_rejected(self, event) -> None:
        session = self._session(event.assoc)
        session.log.warning("association.rejected")
        self._finish(event.assoc, outcome="rejected")

    def on_released(self, event) -> None:
        self._finish(event.assoc, outcome="released")

    def on_aborted(self, event) -> None:
        self._finish(event.assoc, outcome="aborted")

    def on_connection_close(self, event) -> None:
        self._finish(event.assoc, closed=True)

    def _finish(self, assoc, *, outcome: str | None = None, closed: bool = False) -> None:
        """Record how an association ended; once both its outcome and the closing
        of its connection are known, log its end and forget it.

        pynetdicom reports the two from different threads, in either order: a
        peer's A-ABORT closes the connection before the abort is reported.
        """
        with self._finish_lock:
            session = self._sessions.get(assoc)
            if session is None:
                return
            if outcome is not None:
                session.outcome = outcome
            session.connection_closed |= closed
            outcome_known = session.outcome != "closed" or not session.established
            if not (session.connection_closed and outcome_known):
                return
            del self._sessions[assoc]
        if session.outcome != "released":
            discard_partial(assoc)
        self._log_end(session)

    def _log_end(self, session: Session) -> None:
        log = session.log.warning if session.outcome == "aborted" else session.log.info
        log(
            "association.end",
            outcome=session.outcome,
            instances=session.instances,
            bytes=session.bytes,
            refused=session.refused,
            seconds=round(time.monotonic() - session.started, 3),
        )
        if session.established and session.outcome != "released" and session.series_uids:
            self._mark_incomplete(session)

    def _mark_incomplete(self, session: Session) -> None:
        """An association that ends without a release may have left its series
        half-sent: say so until more instances arrive or an admin clears it."""
        reason = (
            f"association {session.id} from {session.provenance.calling_ae}"
            f" ({session.peer}) {session.outcome} after {session.instances} instances"
        )
        try:
            mark_incomplete(self.store.index, sorted(session.series_uids), reason)
        except Exception:
            session.log.exception("series.mark_incomplete_failed")
            return
        session.log.warning("series.incomplete", series=sorted(session.series_uids), reason=reason)

    def on_echo(self, event) -> int:
        self._session(event.assoc).log.info("echo")
        return SUCCESS

    def on_store(self, event) -> Dataset | int:
        session = self._session(event.assoc)
        started = time.perf_counter()
        request = event.request
        sop_instance_uid = request.AffectedSOPInstanceUID
        received = request.DataSet.received()
        try:
            result = self.store.store(
                received,
                str(event.context.transfer_syntax),
                request.AffectedSOPClassUID,
                sop_instance_uid,
                session.provenance,
            )
        except StoreRefused as refused:
            session.refused += 1
            code = REFUSAL_STATUS[refused.refusal]
            session.log.warning(
                "instance.refused",
                sop_instance_uid=sop_instance_uid,
                status=f"0x{code:04X}",
                reason=refused.reason,
            )
            return status(code, refused.reason)
        except Exception as exc:
            session.refused += 1
            session.log.exception("instance.failed", sop_instance_uid=sop_instance_uid)
            return status(INTERNAL_ERROR_STATUS, f"internal error: {type(exc).__name__}")
        finally:
            if received is not request.DataSet:
                received.close()  # a spool file: closing deletes it
        session.instances += 1
        session.series_uids.add(result.header.series_uid)
        session.bytes += result.size
        with self._stored_lock:
            self.stored += 1
        header = result.header
        session.log.info(
            "instance.stored",
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            sop_instance_uid=header.sop_instance_uid,
            outcome=str(result.outcome),
            bytes=result.size,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        for level, name, kept, incoming in result.disagreements:
            session.log.warning(
                "index.disagreement",
                level=level,
                field=name,
                kept=kept,
                received=incoming,
                sop_instance_uid=header.sop_instance_uid,
            )
        return SUCCESS
