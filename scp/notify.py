"""The sd_notify protocol, spoken directly (no libsystemd binding).

systemd gives a `Type=notify` service the address of a datagram socket in
``$NOTIFY_SOCKET``: a path, or ``@name`` for a socket in the Linux abstract
namespace. Each message is one datagram of newline-separated ``KEY=VALUE``
lines (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``); the kernel
attaches our credentials, which is how systemd knows the sender is the main
process (``NotifyAccess=main``).

Outside systemd (``NOTIFY_SOCKET`` unset) every function here does nothing, so
the service runs the same from a terminal. Sending never raises: a lost
notification must not take the receiver down.

The watchdog: with ``WatchdogSec=`` systemd sets ``WATCHDOG_USEC`` (and
``WATCHDOG_PID``, which must then be our pid) and restarts the service when no
``WATCHDOG=1`` arrives within that time. `Watchdog` pings at half the interval.
"""

import os
import socket
import time
from datetime import date

import structlog

log = structlog.get_logger("imaging_scp")
_failure_logged = False


def _address() -> str | None:
    """The notification socket's address, or None when there is none to use."""
    name = os.environ.get("NOTIFY_SOCKET", "")
    if name.startswith("@"):
        return "\0" + name[1:]  # abstract namespace: a leading NUL byte
    if name.startswith("/"):
        return name
    return None  # unset, empty, or a transport we do not speak (vsock:...)


def notify(*lines: str) -> bool:
    """Send one datagram of ``KEY=VALUE`` lines; True if it was sent."""
    address = _address()
    if address is None:
        return False
    message = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # A datagram socket blocks when the receiver's queue is full: never
            # let a stalled reader hold the accept loop (the watchdog) for long.
            sock.settimeout(1.0)
            sock.connect(address)
            sock.sendall(message)
    except OSError as exc:
        global _failure_logged
        if not _failure_logged:  # once: the watchdog would repeat it every few seconds
            _failure_logged = True
            log.warning("notify.failed", socket=os.environ["NOTIFY_SOCKET"], error=str(exc))
        return False
    return True


def _status(text: str) -> str:
    return "STATUS=" + " ".join(text.splitlines())  # one line, whatever we were given


def ready(status: str | None = None) -> bool:
    """Startup is complete: the service accepts work."""
    return notify("READY=1", *([_status(status)] if status else []))


def status(text: str) -> bool:
    """A one-line description of what the service is doing (`systemctl status`)."""
    return notify(_status(text))


def stopping(status: str | None = None) -> bool:
    """The service is shutting down."""
    return notify("STOPPING=1", *([_status(status)] if status else []))


def watchdog() -> bool:
    """Keep-alive ping for ``WatchdogSec=``."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds, or None when no watchdog is asked of us.

    As sd_watchdog_enabled(3): ``WATCHDOG_USEC`` is a positive integer of
    microseconds; when ``WATCHDOG_PID`` is set it must be our pid (the variable
    was meant for us, not inherited from a parent).
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec.isdecimal() or int(usec) == 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000


class Watchdog:
    """Sends WATCHDOG=1 at half the watchdog interval when `ping_if_due` is
    called often enough. Call it from the loop whose liveness it should prove."""

    def __init__(self, interval: float | None = None):
        if interval is None:
            interval = watchdog_interval()
        self.period = interval / 2 if interval else None
        self._next = 0.0  # the first call pings

    def ping_if_due(self) -> bool:
        if self.period is None:
            return False
        now = time.monotonic()
        # A little early rather than a whole caller's loop late.
        if now < self._next - self.period / 10:
            return False
        self._next = now + self.period
        return watchdog()


class ServiceStatus:
    """The STATUS= line: "listening on :11112, 3 associations, 12,345 instances
    today", sent only when it changes. "Today" counts from local midnight or
    from the start of this process, whichever is later."""

    def __init__(self, host: str, port: int):
        where = "" if host in ("", "0.0.0.0", "::") else host
        if ":" in where:
            where = f"[{where}]"  # an IPv6 address
        self.listening = f"listening on {where}:{port}"
        self._day = date.today()
        self._stored_before_today = 0
        self._last = ""

    def text(self, associations: int, stored_total: int, problem: str | None = None) -> str:
        """`problem`: what keeps the service from storing ("index unavailable
        since …"), said first."""
        today = date.today()
        if today != self._day:  # local midnight: start the day's count again
            self._day = today
            self._stored_before_today = stored_total
        stored_today = stored_total - self._stored_before_today
        plural = "" if associations == 1 else "s"
        return (
            (f"{problem}; " if problem else "")
            + f"{self.listening}, {associations} association{plural}, "
            f"{stored_today:,} instance{'' if stored_today == 1 else 's'} today"
        )

    def ready(self, associations: int = 0, stored_total: int = 0) -> bool:
        self._last = self.text(associations, stored_total)
        return ready(self._last)

    def update(self, associations: int, stored_total: int, problem: str | None = None) -> bool:
        text = self.text(associations, stored_total, problem)
        if text == self._last:
            return False
        self._last = text
        return status(text)
