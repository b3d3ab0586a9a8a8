"""Commitment reports the requester's association did not take, delivered on
a new association to the address `peers` gives for its AE title.

One `Reporter` thread in the main process (workers leave this to it: one
sender, so one delivery at a time per transaction). It wakes when an
association hands it a report, at the next retry time, and every few seconds
for what a worker process handed over. Retries back off from
`report_retry_interval` (doubling, at most 15 minutes) for `report_attempts`
attempts. What is pending survives a restart: it is in the index.

The association out is our requestor (scp.upper_layer): we propose the Storage
Commitment Push Model with SCP/SCU role selection asking for the SCP role, as
PS3.4 J.3.3 and IHE RAD-10 have it.
"""

import threading

import structlog
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from scp import dimse, metrics
from scp.commitment_service import (
    NEW_ASSOCIATION,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH_MODEL,
    CommitmentService,
    encode_dataset,
    event_information,
)
from scp.config import Config, peer_address
from scp.upper_layer import AssociationError, Proposal, Requestor
from storage.catalog import commitments

log = structlog.get_logger("imaging_scp")

_MAX_BACKOFF = 15 * 60.0
_LOOK_FOR_OTHERS = 5.0  # seconds: reports handed over by worker processes
# A report on a new association: we ask for the SCP role of the commitment class
# (PS3.4 J.3.3), the one that sends N-EVENT-REPORTs.
REPORT_PROPOSAL = Proposal(
    STORAGE_COMMITMENT_PUSH_MODEL, (ExplicitVRLittleEndian, ImplicitVRLittleEndian), scp_role=True
)


class DeliveryError(Exception):
    """The peer could not be reached or did not acknowledge the report."""


def send_report(config: Config, called_ae: str, address: tuple[str, int], event_type, info):
    """One N-EVENT-REPORT on a new association; DeliveryError unless answered Success."""
    host, port = address
    peer = f"{called_ae}@{host}:{port}"
    requestor = Requestor(config.aet, timeout=min(config.network_timeout, 30.0))
    try:
        with requestor.associate(host, port, called_ae, [REPORT_PROPOSAL]) as association:
            context = association.context(STORAGE_COMMITMENT_PUSH_MODEL)
            request = dimse.event_report_request(
                1, STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_INSTANCE, event_type
            )
            association.send(context, request, encode_dataset(info, context.transfer_syntax))
            response = association.receive().command
    except AssociationError as exc:
        raise DeliveryError(str(exc)) from exc
    if response.field != dimse.N_EVENT_REPORT_RSP or response.responds_to != 1:
        raise DeliveryError(
            f"{peer} answered the N-EVENT-REPORT-RQ with command field"
            f" 0x{response.field or 0:04X} to message {response.responds_to}"
        )
    if response.status is None:
        raise DeliveryError(f"{peer} answered the report without a status")
    if response.status != 0x0000:
        raise DeliveryError(f"{peer} answered the report with status 0x{response.status:04X}")


class Reporter:
    def __init__(self, config: Config, service: CommitmentService):
        self.config = config
        self.service = service
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="imaging-scp-reports", daemon=True)
        service.wake_reporter = self._wake.set

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        # A delivery cut short stays pending: the next start sends it again.
        self._thread.join(5)

    def _run(self) -> None:
        # At start-up no association holds a report: whatever is pending or
        # unchecked was left by a stop or a crash, and is owed now.
        starting = True
        while not self._stopping:
            try:
                for due in commitments.due_reports(self.service.index, starting=starting):
                    if self._stopping:
                        return
                    self._deliver(due)
                wait = commitments.next_attempt_in(self.service.index)
            except Exception:  # a bug or a broken index: log, and try again later
                log.exception("commitment.reporter_failed")
                wait = None
            starting = False
            self._wake.wait(_LOOK_FOR_OTHERS if wait is None else min(wait, _LOOK_FOR_OTHERS))
            self._wake.clear()

    def _deliver(self, due: commitments.DueReport) -> None:
        uid = due.transaction_uid
        bound = log.bind(transaction_uid=uid, requester_ae=due.requester_ae)
        # Covers the attempt (its connect and its exchange, each within
        # network_timeout): another node's reporter takes it only after that.
        if not commitments.claim(self.service.index, uid, 3 * self.config.network_timeout):
            return  # another node's reporter has it
        if due.checked:
            result = commitments.load_result(self.service.index, uid)
        else:
            result = self.service.check(bound, uid)
            if result is None:
                return
        address = peer_address(self.config, due.requester_ae)
        index = self.service.index
        if address is None:
            error = f"no address for AE {due.requester_ae!r} in peers"
            commitments.delivery_failed(index, uid, error, retry_in=None)
            bound.warning("commitment.delivery_failed", reason=error, gave_up=True)
            if metrics.recorder is not None:
                metrics.recorder.report_failed(gave_up=True)
            return
        attempt = due.attempts + 1
        event_type, info = event_information(result, self.config.aet)
        try:
            send_report(self.config, due.requester_ae, address, event_type, info)
        except DeliveryError as exc:
            gave_up = attempt >= self.config.report_attempts
            retry_in = (
                None
                if gave_up
                else min(self.config.report_retry_interval * 2 ** (attempt - 1), _MAX_BACKOFF)
            )
            commitments.delivery_failed(index, uid, str(exc), retry_in=retry_in)
            bound.warning(
                "commitment.delivery_failed",
                reason=str(exc),
                attempts=attempt,
                gave_up=gave_up,
                **({} if retry_in is None else {"retry_in": retry_in}),
            )
            if metrics.recorder is not None:
                metrics.recorder.report_failed(gave_up)
            return
        commitments.delivered(index, uid, NEW_ASSOCIATION)
        bound.info(
            "commitment.reported",
            delivery=NEW_ASSOCIATION,
            attempts=attempt,
            to=f"{address[0]}:{address[1]}",
            event_type=event_type,
        )
        if metrics.recorder is not None:
            metrics.recorder.report_delivered()
