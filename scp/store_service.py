"""The Storage and Verification services: C-STORE and C-ECHO as SCP.

A C-STORE-RQ becomes one `InstanceStore.receive` whose dataset bytes arrive
fragment by fragment; its `StoreResult` or `StoreRefused` becomes the status
of the C-STORE-RSP, and one log event.
"""

import threading
import time

from scp import dimse
from scp.session import Session
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
ECHO_PROCESSING_FAILURE = 0x0110  # a C-ECHO while this node cannot store
NO_DATASET_STATUS = 0xC000


class StoreService:
    """C-STORE and C-ECHO for every association of a listener process."""

    def __init__(self, store: InstanceStore):
        self.store = store
        self.stored = 0  # instances stored since start, for the service's STATUS= line
        self._stored_lock = threading.Lock()

    def echo(self, session: Session, command: dimse.Command) -> bytes:
        """Success while this node can store; while its index is unavailable, a
        processing failure saying since when (the reason is in the log)."""
        health = self.store.index.health
        if health.available:
            session.log.info("echo")
            status, comment = SUCCESS, None
        else:
            session.log.warning("echo.failed", reason=health.describe())
            status, comment = ECHO_PROCESSING_FAILURE, health.error_comment()
        return dimse.response(
            dimse.C_ECHO_RSP,
            command.message_id,
            status,
            sop_class_uid=command.uid(dimse.AFFECTED_SOP_CLASS_UID),
            error_comment=comment,
        )

    def store_without_dataset(self, session: Session, command: dimse.Command) -> bytes:
        session.refused += 1
        reason = "C-STORE-RQ announces no data set"
        session.log.warning("instance.refused", status=f"0x{NO_DATASET_STATUS:04X}", reason=reason)
        return store_response(command, NO_DATASET_STATUS, reason)

    def receive(
        self, session: Session, command: dimse.Command, transfer_syntax: str
    ) -> "IncomingStore":
        return IncomingStore(self, session, command, transfer_syntax)

    def count_stored(self) -> None:
        with self._stored_lock:
            self.stored += 1


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

    def __init__(
        self,
        service: StoreService,
        session: Session,
        command: dimse.Command,
        transfer_syntax: str,
    ):
        self.service = service
        self.session = session
        self.command = command
        self.sop_instance_uid = command.uid(dimse.AFFECTED_SOP_INSTANCE_UID)
        self.incoming = service.store.receive(
            transfer_syntax,
            command.uid(dimse.AFFECTED_SOP_CLASS_UID),
            self.sop_instance_uid,
            session.provenance,
        )
        self.write = self.incoming.write
        self.result: StoreResult | None = None
        self.elapsed = 0.0  # ms, from the request's dataset to its response

    def discard(self) -> None:
        self.incoming.discard()

    def finish(self) -> bytes:
        """Store what arrived; the C-STORE-RSP to send. Then `report`."""
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
            return store_response(self.command, code, refused.comment)
        except Exception as exc:
            session.refused += 1
            session.log.exception("instance.failed", request_sop_instance_uid=self.sop_instance_uid)
            self.discard()
            return store_response(
                self.command, INTERNAL_ERROR_STATUS, f"internal error: {type(exc).__name__}"
            )
        self.elapsed = round(
            result.timings.get("receive", 0.0) + (time.perf_counter() - started) * 1000, 2
        )
        return store_response(self.command, SUCCESS)

    def report(self) -> None:
        """After the C-STORE-RSP went out: count a stored instance and log it.
        The sender prepares its next request meanwhile, so this work is not
        part of its wait."""
        result = self.result
        if result is None:  # refused or failed: logged before the response
            return
        session = self.session
        session.instances += 1
        session.delivered_into.add(result.header.series_uid)
        if result.outcome is not Outcome.IDENTICAL_RESEND:  # something new was written
            session.written_into.add(result.header.series_uid)
        session.bytes += result.size
        self.service.count_stored()
        header = result.header
        session.log.info(
            "instance.stored",
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            sop_instance_uid=header.sop_instance_uid,
            outcome=str(result.outcome),
            bytes=result.size,
            ms=self.elapsed,
            timings=result.timings,
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
