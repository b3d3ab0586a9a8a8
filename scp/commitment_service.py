"""The Storage Commitment Push Model service as SCP (PS3.4 Annex J, IHE RAD-10).

An N-ACTION-RQ (Action Type 1) is recorded in the index before its
N-ACTION-RSP says Success. Its instances are then checked
(`storage.commitment.check_request`) and the N-EVENT-REPORT-RQ sent on the
same association, unless the requester is already releasing it. A report not
acknowledged there is left to `scp.reports.Reporter`, which sends it on a new
association to the requester's address in `peers`, with retries.

A repeated Transaction UID with the same references is answered Success and
its recorded result reported again: a modality that lost our N-ACTION-RSP to a
dropped connection retries with the same UID, and a 0x0131 would leave it
without the report it is owed. The same UID with other references is refused
with 0x0131 (duplicate Transaction UID): it is another request, and answering
it with the first one's result would be a false commitment.
"""

import time

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import dsutils
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from scp import dimse, metrics
from scp.association import Conversation, Outbox, Session
from storage.catalog import Catalog, commitments
from storage.catalog.commitments import CommitmentRequest, CommitmentResult, Recorded, Reference
from storage.codec.datasets import decode_dataset
from storage.codec.syntax import transfer_syntax as syntax_of
from storage.commitment import check_request
from storage.uids import is_valid_uid

STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP instance
REQUEST_STORAGE_COMMITMENT = 1  # Action Type ID
ALL_COMMITTED, FAILURES_EXIST = 1, 2  # Event Type ID

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
INVALID_ARGUMENT_VALUE = 0x0115
INVALID_OBJECT_INSTANCE = 0x0117
NO_SUCH_SOP_CLASS = 0x0118
NO_SUCH_ACTION = 0x0123
DUPLICATE_TRANSACTION_UID = 0x0131
RESOURCE_LIMITATION = 0x0213
# Every status an N-ACTION is refused with.
REFUSAL_STATUSES = (
    PROCESSING_FAILURE,
    INVALID_ARGUMENT_VALUE,
    INVALID_OBJECT_INSTANCE,
    NO_SUCH_SOP_CLASS,
    NO_SUCH_ACTION,
    DUPLICATE_TRANSACTION_UID,
    RESOURCE_LIMITATION,
)

# 16 MiB of Action Information is over 100,000 references: more is no study.
MAX_ACTION_INFORMATION = 16 * 1024 * 1024

SAME_ASSOCIATION, NEW_ASSOCIATION = "same association", "new association"

# Seconds a requester has, after our N-ACTION-RSP and the check, to show that it
# is releasing (most release at once and want the report on a new association)
# before the report goes out on its association: one sent into a release
# confuses requesters (pynetdicom's raises in its reactor thread).
RELEASE_GRACE = 0.2


class ActionRefused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def is_storage_class(uid: str) -> bool:
    """A SOP class we would store: every one but those of another DICOM service."""
    return uid_to_service_class(uid) in (StorageServiceClass, ServiceClass)


def event_information(result: CommitmentResult, aet: str) -> tuple[int, Dataset]:
    """The Event Type ID and Event Information of a result's N-EVENT-REPORT."""
    info = Dataset()
    info.TransactionUID = result.transaction_uid
    if result.committed:
        info.RetrieveAETitle = aet
        info.ReferencedSOPSequence = Sequence([_reference_item(r) for r in result.committed])
    if result.failed:
        failed = []
        for failure in result.failed:
            item = _reference_item(failure.reference)
            item.FailureReason = failure.reason
            failed.append(item)
        info.FailedSOPSequence = Sequence(failed)
    return (ALL_COMMITTED if result.all_committed else FAILURES_EXIST), info


def _reference_item(reference: Reference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = reference.sop_class_uid
    item.ReferencedSOPInstanceUID = reference.sop_instance_uid
    return item


def encode_dataset(dataset: Dataset, transfer_syntax: str) -> bytes:
    syntax = syntax_of(transfer_syntax)
    return dsutils.encode(dataset, syntax.implicit, syntax.little_endian, syntax.deflated)


class CommitmentService:
    """N-ACTION (request) and N-EVENT-REPORT (report) for every association."""

    def __init__(self, index: Catalog, aet: str, peers: dict, network_timeout: float):
        self.index = index
        self.aet = aet
        self.peers = peers
        # How long the requester's association has the report to itself before
        # retries may send it on a new one.
        self.hold = network_timeout
        self.wake_reporter = lambda: None  # set by the Reporter of this process

    def join(self, session: Session) -> "CommitmentConversation":
        return CommitmentConversation(self, session)

    def refusal(self, session: Session, command: dimse.Command, refused: ActionRefused) -> bytes:
        session.log.warning(
            "commitment.refused", status=f"0x{refused.status:04X}", reason=refused.reason
        )
        if metrics.recorder is not None:
            metrics.recorder.commitment_refused(refused.status)
        return action_response(command, refused.status, refused.reason)

    # -- an N-ACTION's dataset has arrived ---------------------------------------------

    def request(
        self, session: Session, command: dimse.Command, transfer_syntax: str, data: bytes | None
    ) -> tuple[bytes, str | None]:
        """Record the request (`data`: its Action Information, None when it was
        too long to keep); the N-ACTION-RSP, and the transaction to report on
        (None when refused)."""
        try:
            request = self._read_request(session, command, transfer_syntax, data)
            try:
                recorded = commitments.record_request(self.index, request, hold=self.hold)
            except Exception as exc:
                session.log.exception("commitment.record_failed")
                raise ActionRefused(
                    PROCESSING_FAILURE, f"could not record the request: {type(exc).__name__}"
                ) from exc
            if recorded is Recorded.CONFLICTING:
                raise ActionRefused(
                    DUPLICATE_TRANSACTION_UID,
                    f"Transaction UID {request.transaction_uid} was used for other instances",
                )
        except ActionRefused as refused:
            return self.refusal(session, command, refused), None
        if recorded is Recorded.REPEATED:
            commitments.reopen(self.index, request.transaction_uid, hold=self.hold)
        session.log.info(
            "commitment.requested",
            transaction_uid=request.transaction_uid,
            instances=len(request.references),
            repeated=recorded is Recorded.REPEATED,
        )
        if metrics.recorder is not None:
            metrics.recorder.commitment_requested()
        return action_response(command, SUCCESS), request.transaction_uid

    def _read_request(
        self, session: Session, command: dimse.Command, transfer_syntax: str, data: bytes | None
    ) -> CommitmentRequest:
        requested_class = command.uid(dimse.REQUESTED_SOP_CLASS_UID)
        if requested_class != STORAGE_COMMITMENT_PUSH_MODEL:
            raise ActionRefused(NO_SUCH_SOP_CLASS, f"N-ACTION for SOP class {requested_class}")
        instance = command.uid(dimse.REQUESTED_SOP_INSTANCE_UID)
        if instance != STORAGE_COMMITMENT_INSTANCE:
            raise ActionRefused(
                INVALID_OBJECT_INSTANCE,
                f"N-ACTION for instance {instance}, not {STORAGE_COMMITMENT_INSTANCE}",
            )
        action = command.us(dimse.ACTION_TYPE_ID)
        if action != REQUEST_STORAGE_COMMITMENT:
            raise ActionRefused(NO_SUCH_ACTION, f"Action Type ID {action}, not 1")
        if data is None:
            raise ActionRefused(
                RESOURCE_LIMITATION,
                f"Action Information over {MAX_ACTION_INFORMATION // 2**20} MiB: split the request",
            )
        try:
            dataset = decode_dataset(data, transfer_syntax)
            transaction_uid = str(dataset.get("TransactionUID", "") or "")
            items = dataset.get("ReferencedSOPSequence") or []
            references = [
                Reference(
                    str(item.get("ReferencedSOPClassUID", "") or ""),
                    str(item.get("ReferencedSOPInstanceUID", "") or ""),
                )
                for item in items
            ]
        except Exception as exc:  # pydicom raises many kinds on malformed data
            raise ActionRefused(
                INVALID_ARGUMENT_VALUE, f"Action Information does not decode: {exc}"
            ) from exc
        if not is_valid_uid(transaction_uid):
            raise ActionRefused(
                INVALID_ARGUMENT_VALUE, f"Transaction UID {transaction_uid!r} is not a UID"
            )
        if not references:
            raise ActionRefused(INVALID_ARGUMENT_VALUE, "Referenced SOP Sequence is empty")
        for position, reference in enumerate(references, 1):
            if not (
                is_valid_uid(reference.sop_class_uid) and is_valid_uid(reference.sop_instance_uid)
            ):
                raise ActionRefused(
                    INVALID_ARGUMENT_VALUE,
                    f"Referenced SOP Sequence item {position}: no valid class and instance UIDs",
                )
        provenance = session.provenance
        return CommitmentRequest(
            transaction_uid, references, provenance.calling_ae, session.peer, session.id
        )

    def check(self, log, transaction_uid: str, *, hold: float = 0.0) -> CommitmentResult | None:
        """Check a recorded request and log the result; None if that failed
        (the Reporter checks it again later)."""
        started = time.perf_counter()
        try:
            result = check_request(
                self.index,
                transaction_uid,
                is_storage_class,
                hold=hold,
            )
        except Exception:
            log.exception("commitment.check_failed", transaction_uid=transaction_uid)
            return None
        log.info(
            "commitment.checked",
            transaction_uid=transaction_uid,
            committed=len(result.committed),
            failed=len(result.failed),
            by_reason=result.failures_by_reason(),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        if metrics.recorder is not None:
            metrics.recorder.commitment_checked(len(result.committed), len(result.failed))
        return result

    def not_answered(self, session: Session, transaction_uid: str, reason: str) -> None:
        """The requester's association did not take the report: a new one
        will, if we know where the requester listens."""
        calling_ae = session.provenance.calling_ae
        if calling_ae in self.peers:
            commitments.delivery_failed(
                self.index, transaction_uid, reason, retry_in=0.0, attempt=False
            )
            session.log.info(
                "commitment.report_deferred",
                transaction_uid=transaction_uid,
                reason=reason,
                to=calling_ae,
            )
            self.wake_reporter()
            return
        error = f"{reason}; no address for AE {calling_ae!r} in peers"
        commitments.delivery_failed(self.index, transaction_uid, error, retry_in=None)
        session.log.warning(
            "commitment.delivery_failed",
            transaction_uid=transaction_uid,
            reason=error,
            gave_up=True,
        )
        if metrics.recorder is not None:
            metrics.recorder.report_failed(gave_up=True)


class CommitmentConversation(Conversation):
    """Storage commitment on one association: its N-ACTIONs, and our
    N-EVENT-REPORTs on it not yet answered."""

    def __init__(self, service: CommitmentService, session: Session):
        self.service = service
        self.session = session
        self.reports_awaiting_answer: dict[int, str] = {}  # Message ID -> Transaction UID
        self.last_message_id = 0  # of our requests on this association

    def request(self, command: dimse.Command, outbox: Outbox) -> "IncomingAction | None":
        if command.has_dataset:
            return IncomingAction(self, command, outbox)
        refused = ActionRefused(INVALID_ARGUMENT_VALUE, "N-ACTION-RQ without Action Information")
        outbox.send(self.service.refusal(self.session, command, refused))
        return None

    def report_on(self, transaction_uid: str, outbox: Outbox) -> None:
        """Check the request and send its report on the requester's association,
        unless the requester is already leaving it."""
        service, session = self.service, self.session
        result = service.check(session.log, transaction_uid, hold=service.hold)
        if result is None:
            return
        if outbox.peer_is_leaving(RELEASE_GRACE):
            service.not_answered(session, transaction_uid, "requester released before the report")
            return
        event_type, info = event_information(result, service.aet)
        self.last_message_id = self.last_message_id % 0xFFFF + 1
        self.reports_awaiting_answer[self.last_message_id] = transaction_uid
        outbox.send(
            dimse.event_report_request(
                self.last_message_id,
                STORAGE_COMMITMENT_PUSH_MODEL,
                STORAGE_COMMITMENT_INSTANCE,
                event_type,
            ),
            encode_dataset(info, outbox.transfer_syntax),
        )

    def response(self, command: dimse.Command) -> bool:
        """An N-EVENT-REPORT-RSP: True when it answers one of our reports."""
        service, session = self.service, self.session
        transaction_uid = self.reports_awaiting_answer.pop(command.responds_to, None)
        if transaction_uid is None:
            return False
        status = command.status
        if status != SUCCESS:
            service.not_answered(
                session, transaction_uid, f"N-EVENT-REPORT-RSP status 0x{status or 0:04X}"
            )
            return True
        commitments.delivered(service.index, transaction_uid, SAME_ASSOCIATION)
        session.log.info(
            "commitment.reported",
            transaction_uid=transaction_uid,
            delivery=SAME_ASSOCIATION,
            attempts=1,
        )
        if metrics.recorder is not None:
            metrics.recorder.report_delivered()
        return True

    def ended(self, session: Session) -> None:
        """Reports not answered here go to the Reporter (or are given up)."""
        try:
            for transaction_uid in self.reports_awaiting_answer.values():
                self.service.not_answered(
                    session, transaction_uid, "association ended before the answer"
                )
        except Exception:
            session.log.exception("commitment.handover_failed")
        self.reports_awaiting_answer.clear()


def action_response(command: dimse.Command, status: int, comment: str | None = None) -> bytes:
    return dimse.response(
        dimse.N_ACTION_RSP,
        command.message_id,
        status,
        sop_class_uid=command.uid(dimse.REQUESTED_SOP_CLASS_UID),
        sop_instance_uid=command.uid(dimse.REQUESTED_SOP_INSTANCE_UID),
        error_comment=comment,
        action_type=command.us(dimse.ACTION_TYPE_ID) if status == SUCCESS else None,
    )


class IncomingAction:
    """The Action Information of one N-ACTION-RQ, on its way in (kept in memory:
    a list of references, bounded by MAX_ACTION_INFORMATION)."""

    def __init__(
        self, conversation: CommitmentConversation, command: dimse.Command, outbox: Outbox
    ):
        self.conversation = conversation
        self.command = command
        self.outbox = outbox
        self._data = bytearray()
        self._length = 0

    def write(self, fragment) -> None:
        self._length += len(fragment)
        if self._length <= MAX_ACTION_INFORMATION:
            self._data += fragment

    def discard(self) -> None:
        self._data = bytearray()

    def finish(self) -> None:
        """Record the request and answer it; then report on it, on this association."""
        data = bytes(self._data) if self._length <= MAX_ACTION_INFORMATION else None
        self.discard()
        conversation, outbox = self.conversation, self.outbox
        response, transaction_uid = conversation.service.request(
            conversation.session, self.command, outbox.transfer_syntax, data
        )
        outbox.send(response)
        if transaction_uid is not None:
            conversation.report_on(transaction_uid, outbox)
