"""What we know and count about one association, and how its end is recorded.

Each association gets a `Session`: an id, a logger bound once with the id and
the peer (and, once the request is read, the AE titles), and running totals.
"""

import itertools
import os
import time
from dataclasses import dataclass, field

import structlog

from storage.changes import clear_incomplete, mark_incomplete
from storage.index import Index, Provenance

_association_numbers = itertools.count(1)
_STARTED = int(time.time()) % 0x10000


@dataclass
class Session:
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
    # Series this association wrote new instances into: marked incomplete if it
    # breaks off. An identical resend adds nothing that could be half-sent.
    written_into: set[str] = field(default_factory=set)
    # Series it delivered instances of, resends included: a release clears their
    # incomplete mark (the sender finished sending them).
    delivered_into: set[str] = field(default_factory=set)
    # Our N-EVENT-REPORT-RQs on this association not yet answered: Message ID -> Transaction UID.
    reports_awaiting_answer: dict[int, str] = field(default_factory=dict)
    last_message_id: int = 0  # of the requests we send on this association

    @classmethod
    def open(cls, host: str, port: int) -> "Session":
        # The pid and start time tell apart the associations of listener processes
        # (workers fork after this module is imported) and of restarts.
        session_id = f"{os.getpid():x}-{_STARTED:04x}-{next(_association_numbers)}"
        peer = f"{host}:{port}"
        log = structlog.get_logger("imaging_scp").bind(assoc=session_id, peer=peer)
        return cls(id=session_id, host=host, peer=peer, log=log)

    def requested(self, calling_ae: str, called_ae: str) -> None:
        self.provenance = Provenance(calling_ae, called_ae, self.peer, self.id)
        self.log = self.log.bind(calling_ae=calling_ae, called_ae=called_ae)

    def ended(self, index: Index) -> None:
        """Log the end; an association that broke off marks its series incomplete."""
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
        if self.established and self.outcome != "released" and self.written_into:
            self._mark_incomplete(index)
        elif self.outcome == "released" and self.delivered_into:
            self._clear_incomplete(index)

    def _mark_incomplete(self, index: Index) -> None:
        """An association that ends without a release may have left its series
        half-sent: say so until more instances arrive or an admin clears it."""
        series = sorted(self.written_into)
        reason = (
            f"association {self.id} from {self.provenance.calling_ae}"
            f" ({self.peer}) {self.outcome} after {self.instances} instances"
        )
        try:
            marked = mark_incomplete(index, series, reason)
        except Exception:
            self.log.exception("series.mark_incomplete_failed")
            return
        if marked:
            self.log.warning("series.incomplete", series=marked, reason=reason)

    def _clear_incomplete(self, index: Index) -> None:
        try:
            cleared = clear_incomplete(index, sorted(self.delivered_into))
        except Exception:
            self.log.exception("series.clear_incomplete_failed")
            return
        if cleared:
            self.log.info(
                "series.complete_again", series=cleared, reason="released after resending"
            )
