"""Whether this process can write its index, known without asking the database.

The writer (storage.catalog.writer.Writer) says when a write failed for want of the index
(its connection lost, no answer within index_timeout, another process holding
SQLite's write lock) and when one succeeds again; the listener reads the state
for each new association and for a C-ECHO at the cost of an attribute read.
While the index is unavailable a probe (`Writer.probe`, from `IndexMonitor`)
reconnects and tries a write transaction once a second: that is what clears
the state when no sender is let in to find out. A damaged SQLite file is out
for good: nothing but `imaging-scp rebuild`, with serve stopped, repairs it.

`Deadlines` bounds each write: a thread that cuts the connection of a write
still waiting at its deadline (a frozen PostgreSQL answers nothing, and its
kernel still acknowledges what is sent, so no socket timeout would fire).
"""

import threading
import time
from collections.abc import Callable

_TICK = 0.1  # seconds between two looks at the deadline of the write in progress
PROBE_INTERVAL = 1.0  # seconds between two probes while the index is unavailable


class IndexUnavailable(Exception):
    """Nothing was written: the index could not be reached within the bound."""

    comment = "index unavailable: send again later"  # for a sender's ErrorComment


class IndexInterrupted(Exception):
    """The connection was lost while a transaction was on its way: it may have
    committed or not. Read back, on a new connection, before answering."""

    def __init__(
        self, reason: str, deadline: float, comment: str = "index connection lost: send again"
    ):
        super().__init__(reason)
        self.deadline = deadline  # time.monotonic() by which the sender is answered
        self.comment = comment  # for a sender's ErrorComment


DAMAGED = "index damaged: run imaging-scp rebuild with serve stopped"  # fits an ErrorComment


class IndexHealth:
    """Available, unavailable since when and why, or damaged and why. Listeners
    hear each change (from the thread that saw it): `listener(reason, since,
    damaged)` when the index goes (reason None, `since` its unavailable_since,
    when it comes back; a damaged index never does)."""

    def __init__(self):
        self.unavailable_since: float | None = None  # time.time()
        self.reason = ""
        self.damage: str | None = None  # what found the file damaged: for good
        self._listeners: list[Callable[[str | None, float, bool], None]] = []
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return self.unavailable_since is None and self.damage is None

    def headline(self) -> str:
        """ "index unavailable since 03:55:12 UTC" (fits a DICOM ErrorComment)."""
        if self.damage is not None:
            return DAMAGED
        since = self.unavailable_since
        if since is None:
            return "index available"
        return f"index unavailable since {time.strftime('%H:%M:%S UTC', time.gmtime(since))}"

    def describe(self) -> str:
        """For people: "index unavailable since 03:55:12 UTC: <reason>", or
        "index damaged: the index <path> is damaged (…): run …"."""
        if self.damage is not None:
            return f"index damaged: {self.damage}"
        if self.unavailable_since is None:
            return "index available"
        return f"{self.headline()}: {self.reason}"

    def error_comment(self) -> str:
        """What a C-ECHO's ErrorComment says (64 characters)."""
        if self.damage is not None:
            return DAMAGED  # what to do; the path is in the log
        return f"{self.headline()}; reason in its log"

    def subscribe(self, listener: Callable[[str | None, float, bool], None]) -> None:
        self._listeners.append(listener)

    def damaged(self, reason: str) -> None:
        """The index file was found damaged (`reason` names it and what to do)."""
        with self._lock:
            if self.damage is not None:
                return
            self.damage = reason
        for listener in self._listeners:
            listener(self.describe(), time.time(), True)

    def went(self, reason: str) -> None:
        with self._lock:
            if self.unavailable_since is not None:
                self.reason = reason  # the latest: what an admin would look at
                return
            self.unavailable_since, self.reason = time.time(), reason
            since = self.unavailable_since
        for listener in self._listeners:
            listener(reason, since, False)

    def came_back(self) -> None:
        """It answers again (a damage, if any, stays)."""
        with self._lock:
            since = self.unavailable_since
            if since is None:
                return
            self.unavailable_since, self.reason = None, ""
        for listener in self._listeners:
            listener(None, since, False)


class Deadlines:
    """The one write in progress (an Catalog writes one transaction at a time)
    and its deadline; once the deadline has passed, its connection is cut
    (`Database.interrupt`) and `cut` says so."""

    def __init__(self):
        self._lock = threading.Lock()
        self._watched = None  # (database, deadline) of the write in progress
        self.cut = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="imaging-scp-deadlines", daemon=True)
        self._thread.start()

    def watch(self, database, deadline: float) -> None:
        """The write in progress, on `database`, must end by `deadline`. Called
        for every write: two assignments when nothing is watched."""
        if self._thread is None or deadline == float("inf"):
            return
        with self._lock:
            self._watched, self.cut = (database, deadline), False

    def unwatch(self) -> None:
        if self._watched is not None:
            with self._lock:
                self._watched = None

    def _run(self) -> None:
        while True:
            time.sleep(_TICK)
            with self._lock:
                if self._watched is None or self.cut:
                    continue
                database, deadline = self._watched
                if time.monotonic() >= deadline:
                    # Said before the cut: the waiting thread wakes the moment
                    # the socket is shut, and asks why. Not cut while it has no
                    # connection (a reconnect's connect is bounded by libpq's
                    # connect_timeout): the next tick tries.
                    self.cut = True
                    self.cut = database.interrupt()


class IndexMonitor:
    """While the index is unavailable, `probe` once a second until it succeeds
    (not for a damaged one: a transaction that succeeds proves nothing of its
    other pages)."""

    def __init__(self, health: IndexHealth, probe: Callable[[], None]):
        self.health = health
        self.probe = probe
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imaging-scp-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(PROBE_INTERVAL):
            if self.health.unavailable_since is None:
                continue
            try:
                self.probe()  # clears the state when it succeeds
            except Exception as exc:  # noqa: BLE001 - whatever failed, the index is still out
                self.health.went(_reason(exc))


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
