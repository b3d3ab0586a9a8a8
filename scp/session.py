"""What we know and count about one association, and how its end is logged.

Each association gets a `Session`: an id, a logger bound once with the id and
the peer (and, once the request is read, the AE titles), and the totals its
end reports. What a service keeps about an association is in its own
`Conversation` (scp/service.py).
"""

import itertools
import os
import time
from dataclasses import dataclass, field

import structlog

from scp import metrics
from storage.catalog.index import Provenance

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
