"""The Storage service as SCP: C-STORE.

A C-STORE-RQ becomes one `InstanceStore.receive` whose dataset bytes arrive
fragment by fragment; its `StoreResult` or `StoreRefused` becomes the status
of the C-STORE-RSP, and one log event. An association that breaks off marks
the series it wrote into incomplete; one released clears the mark of the
series it delivered.
"""

import threading
import time

from scp import dimse, metrics
from scp.association import Conversation, Outbox, Session
from storage.catalog.series import clear_incomplete, mark_incomplete
from storage.store import InstanceStore, Outcome, Refusal, StoreRefused, StoreResult

SUCCESS = 0x0000

# C-STORE failure statuses (PS3.4 B.2.3): A7xx out of resources, A900 dataset
# does not match SOP class, Cxxx cannot understand. The low byte of our Cxxx
# codes tells admins which check failed; the ErrorComment says it in words.
# Every write failure is 0xA700, the code senders know to retry on; the
# ErrorComment tells a full disk from an I/O error.
REFUSAL_STATUS = {
    Refusal.OUT_OF_SPACE: 0xA700,
    Refusal.WRITE_FAILED: 0xA700,
    Refusal.INDEX_CORRUPT: 0xA700,
    Refusal.MISMATCH: 0xA900,
    Refusal.UNREADABLE: 0xC000,
    Refusal.MISSING_UID: 0xC001,
    Refusal.INVALID_UID: 0xC002,
    Refusal.SERIES_IN_OTHER_STUDY: 0xC003,
    Refusal.DUPLICATE: 0xC004,
    # Not a retry's matter (A7xx) nor the SOP class's (A900): the dataset is read
    # and understood, and names another patient than its study's.
    Refusal.OTHER_PATIENT: 0xC005,
}
INTERNAL_ERROR_STATUS = 0xC0FF
NO_DATASET_STATUS = 0xC000
# Every status a C-STORE here can fail with.
FAILURE_STATUSES = sorted({*REFUSAL_STATUS.values(), NO_DATASET_STATUS, INTERNAL_ERROR_STATUS})


class StoreService:
    """C-STORE for every association of a listener process."""

    def __init__(self, store: InstanceStore):
        self.store = store
        self.stored = 0  # instances stored since start, for the service's STATUS= line
        self._stored_lock = threading.Lock()

    def join(self, session: Session) -> "StoreConversation":
        return StoreConversation(self, session)

    def count_stored(self) -> None:
        with self._stored_lock:
            self.stored += 1


class StoreConversation(Conversation):
    """C-STORE on one association, and the series it touched."""

    def __init__(self, service: StoreService, session: Session):
        self.service = service
        self.session = session
        # Series this association wrote new instances into: marked incomplete if it
        # breaks off. An identical resend adds nothing that could be half-sent.
        self.written_into: set[str] = set()
        # Series it delivered instances of, resends included: a release clears their
        # incomplete mark (the sender finished sending them).
        self.delivered_into: set[str] = set()

    def request(self, command: dimse.Command, outbox: Outbox) -> "IncomingStore | None":
        if command.has_dataset:
            return IncomingStore(self, command, outbox)
        session = self.session
        session.refused += 1
        reason = "C-STORE-RQ announces no data set"
        session.log.warning("instance.refused", status=f"0x{NO_DATASET_STATUS:04X}", reason=reason)
        if metrics.recorder is not None:
            metrics.recorder.refused(NO_DATASET_STATUS)
        outbox.send(store_response(command, NO_DATASET_STATUS, reason))
        return None

    def ended(self, session: Session) -> None:
        if session.established and session.outcome != "released" and self.written_into:
            self._mark_incomplete()
        elif session.outcome == "released" and self.delivered_into:
            self._clear_incomplete()

    def _mark_incomplete(self) -> None:
        """An association that ends without a release may have left its series
        half-sent: say so until more instances arrive or an admin clears it."""
        session = self.session
        series = sorted(self.written_into)
        reason = (
            f"association {session.id} from {session.provenance.calling_ae}"
            f" ({session.peer}) {session.outcome} after {session.instances} instances"
        )
        try:
            marked = mark_incomplete(self.service.store.index, series, reason)
        except Exception:
            session.log.exception("series.mark_incomplete_failed")
            return
        if marked:
            session.log.warning("series.incomplete", series=marked, reason=reason)

    def _clear_incomplete(self) -> None:
        session = self.session
        try:
            cleared = clear_incomplete(self.service.store.index, sorted(self.delivered_into))
        except Exception:
            session.log.exception("series.clear_incomplete_failed")
            return
        if cleared:
            session.log.info(
                "series.complete_again", series=cleared, reason="released after resending"
            )


def store_response(command: dimse.Command, status: int, comment: str | None = None) -> bytes:
    return dimse.response(
        dimse.C_STORE_RSP,
        command.message_id,
        status,
        sop_class_uid=command.uid(dimse.AFFECTED_SOP_CLASS_UID),
        sop_instance_uid=command.uid(dimse.AFFECTED_SOP_INSTANCE_UID),
        error_comment=comment,
    )


class IncomingStore:
    """The dataset of one C-STORE-RQ, on its way in."""

    def __init__(self, conversation: StoreConversation, command: dimse.Command, outbox: Outbox):
        self.conversation = conversation
        self.session = conversation.session
        self.command = command
        self.outbox = outbox
        self.sop_instance_uid = command.uid(dimse.AFFECTED_SOP_INSTANCE_UID)
        self.incoming = conversation.service.store.receive(
            outbox.transfer_syntax,
            command.uid(dimse.AFFECTED_SOP_CLASS_UID),
            self.sop_instance_uid,
            self.session.provenance,
        )
        self.write = self.incoming.write
        self.result: StoreResult | None = None
        self.elapsed = 0.0  # ms, from the request's dataset to its response

    def discard(self) -> None:
        self.incoming.discard()

    def finish(self) -> None:
        """Store what arrived, answer, then count and log it. The sender
        prepares its next request meanwhile, so that work is not part of its
        wait."""
        self.outbox.send(self._store())
        self._report()

    def _store(self) -> bytes:
        """Store what arrived; the C-STORE-RSP to send."""
        session = self.session
        started = time.perf_counter()
        try:
            self.result = result = self.incoming.finish()
        except StoreRefused as refused:
            session.refused += 1
            code = REFUSAL_STATUS[refused.refusal]
            # The request's UIDs are what the sender knows the object by; the
            # dataset's, when read, go beside them (they differ in a mismatch).
            dataset = refused.header
            session.log.warning(
                "instance.refused",
                request_sop_class_uid=self.command.uid(dimse.AFFECTED_SOP_CLASS_UID),
                request_sop_instance_uid=self.sop_instance_uid,
                **(
                    {
                        "dataset_sop_class_uid": dataset.sop_class_uid,
                        "dataset_sop_instance_uid": dataset.sop_instance_uid,
                    }
                    if dataset is not None
                    else {}
                ),
                **refused.details,
                status=f"0x{code:04X}",
                reason=refused.reason,
            )
            if (
                refused.refusal is Refusal.INDEX_CORRUPT
            ):  # the admin's to repair: the reason says how
                session.log.error("index.corrupt", reason=refused.reason)
            if metrics.recorder is not None:
                metrics.recorder.refused(code)
            return store_response(self.command, code, refused.comment)
        except Exception as exc:
            session.refused += 1
            session.log.exception("instance.failed", request_sop_instance_uid=self.sop_instance_uid)
            self.discard()
            if metrics.recorder is not None:
                metrics.recorder.refused(INTERNAL_ERROR_STATUS)
            return store_response(
                self.command, INTERNAL_ERROR_STATUS, f"internal error: {type(exc).__name__}"
            )
        self.elapsed = round(
            result.timings.get("receive", 0.0) + (time.perf_counter() - started) * 1000, 2
        )
        return store_response(self.command, SUCCESS)

    def _report(self) -> None:
        """After the C-STORE-RSP went out: count a stored instance and log it."""
        result = self.result
        if result is None:  # refused or failed: logged before the response
            return
        session = self.session
        session.instances += 1
        conversation = self.conversation
        conversation.delivered_into.add(result.header.series_uid)
        if result.outcome is not Outcome.IDENTICAL_RESEND:  # something new was written
            conversation.written_into.add(result.header.series_uid)
        session.bytes += result.size
        conversation.service.count_stored()
        if metrics.recorder is not None:
            metrics.recorder.stored(result)
        header = result.header
        session.log.info("instance.stored", **result.log_fields(), ms=self.elapsed)
        for level, name, kept, incoming in result.disagreements:
            session.log.warning(
                "index.disagreement",
                level=level,
                field=name,
                kept=kept,
                received=incoming,
                sop_instance_uid=header.sop_instance_uid,
            )
