"""Commitment reports the requester's association did not take, delivered on
a new association to the address `peers` gives for its AE title.

One `Reporter` thread in the main process (workers leave this to it: one
sender, so one delivery at a time per transaction). It wakes when an
association hands it a report, at the next retry time, and every few seconds
for what a worker process handed over. Retries back off from
`report_retry_interval` (doubling, at most 15 minutes) for `report_attempts`
attempts. What is pending survives a restart: it is in the index.

The association out is pynetdicom's requestor (its public API: this is not the
receive path): we propose the Storage Commitment Push Model with SCP/SCU role
selection asking for the SCP role, as PS3.4 J.3.3 and IHE RAD-10 have it.
"""

import threading

import structlog
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role

from scp.commitment_service import (
    NEW_ASSOCIATION,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH_MODEL,
    CommitmentService,
    event_information,
)
from scp.config import Config, peer_address
from storage import commitment

log = structlog.get_logger("imaging_scp")

_MAX_BACKOFF = 15 * 60.0
_LOOK_FOR_OTHERS = 5.0  # seconds: reports handed over by worker processes


class DeliveryError(Exception):
    """The peer could not be reached or did not acknowledge the report."""


def send_report(config: Config, called_ae: str, address: tuple[str, int], event_type, info):
    """One N-EVENT-REPORT on a new association; DeliveryError unless answered Success."""
    ae = AE(ae_title=config.aet)
    timeout = min(config.network_timeout, 30.0)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(
        STORAGE_COMMITMENT_PUSH_MODEL, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    )
    role = build_role(STORAGE_COMMITMENT_PUSH_MODEL, scu_role=False, scp_role=True)
    host, port = address
    assoc = ae.associate(host, port, ae_title=called_ae, ext_neg=[role])
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "not established (unreachable or aborted)"
        raise DeliveryError(f"association to {called_ae} at {host}:{port} {why}")
    try:
        try:
            status, _ = assoc.send_n_event_report(
                info, event_type, STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_INSTANCE
            )
        except ValueError as exc:  # pynetdicom: no context with us as SCP
            raise DeliveryError(f"{called_ae} at {host}:{port}: {exc}") from exc
        code = getattr(status, "Status", None)
        if code is None:
            raise DeliveryError(f"no N-EVENT-REPORT-RSP from {called_ae} at {host}:{port}")
        if code != 0x0000:
            raise DeliveryError(f"{called_ae} answered the report with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()


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
                for due in commitment.due_reports(self.config.index_location, starting=starting):
                    if self._stopping:
                        return
                    self._deliver(due)
                wait = commitment.next_attempt_in(self.config.index_location)
            except Exception:  # a bug or a broken index: log, and try again later
                log.exception("commitment.reporter_failed")
                wait = None
            starting = False
            self._wake.wait(_LOOK_FOR_OTHERS if wait is None else min(wait, _LOOK_FOR_OTHERS))
            self._wake.clear()

    def _deliver(self, due: commitment.DueReport) -> None:
        uid = due.transaction_uid
        bound = log.bind(transaction_uid=uid, requester_ae=due.requester_ae)
        # Covers the attempt (its connect and its exchange, each within
        # network_timeout): another node's reporter takes it only after that.
        if not commitment.claim(self.service.index, uid, 3 * self.config.network_timeout):
            return  # another node's reporter has it
        if due.checked:
            reader = self.config.index_location.open_reader()
            try:
                result = commitment.load_result(reader, uid)
            finally:
                reader.close()
        else:
            result = self.service.check(bound, uid)
            if result is None:
                return
        address = peer_address(self.config, due.requester_ae)
        index = self.service.index
        if address is None:
            error = f"no address for AE {due.requester_ae!r} in peers"
            commitment.delivery_failed(index, uid, error, retry_in=None)
            bound.warning("commitment.delivery_failed", reason=error, gave_up=True)
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
            commitment.delivery_failed(index, uid, str(exc), retry_in=retry_in)
            bound.warning(
                "commitment.delivery_failed",
                reason=str(exc),
                attempts=attempt,
                gave_up=gave_up,
                **({} if retry_in is None else {"retry_in": retry_in}),
            )
            return
        commitment.delivered(index, uid, NEW_ASSOCIATION)
        bound.info(
            "commitment.reported",
            delivery=NEW_ASSOCIATION,
            attempts=attempt,
            to=f"{address[0]}:{address[1]}",
            event_type=event_type,
        )
