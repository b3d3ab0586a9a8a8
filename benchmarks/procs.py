"""Process plumbing: free ports, readiness, memory sampling, stopping process groups."""

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_listening(port: int) -> bool:
    """True if some socket listens on `port` (read from /proc: no connection is made,
    so the receiver sees no stray association)."""
    wanted = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[1].endswith(wanted) and fields[3] == "0A":
                return True
    return False


def wait_until(predicate, timeout: float, process: subprocess.Popen | None = None, what=""):
    """Poll `predicate` until true; raise if `process` exits or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"{what} exited with status {process.returncode} before it was ready"
            )
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s")


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def descendants(pid: int) -> set[int]:
    """`pid`'s children, grandchildren, ... (scans /proc: no /proc/PID/task/*/children here)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


class RssSampler:
    """Samples VmRSS of a process tree every `interval` seconds; at the end also reads
    VmHWM (the kernel's own high-water mark, per process) before the process is stopped."""

    def __init__(self, pid: int, interval: float = 0.02, rescan: float = 0.25):
        self.pid = pid
        self.interval = interval
        self.rescan = rescan
        self.pids = {pid}
        self.peak_tree_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> "RssSampler":
        self._sample()
        self._thread.start()
        return self

    def _sample(self) -> None:
        total = sum(_status_kib(p, "VmRSS:") for p in self.pids)
        self.peak_tree_kib = max(self.peak_tree_kib, total)
        self.samples += 1

    def _run(self) -> None:
        last_scan = time.monotonic()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if now - last_scan >= self.rescan:
                self.pids = {self.pid} | descendants(self.pid)
                last_scan = now
            self._sample()

    def current_kib(self) -> int:
        return sum(_status_kib(p, "VmRSS:") for p in self.pids)

    def finish(self) -> dict:
        """Stop sampling; call while the process still runs. Sizes in KiB."""
        self._stop.set()
        self._thread.join()
        self.pids = {self.pid} | descendants(self.pid)
        self._sample()
        hwm = {p: _status_kib(p, "VmHWM:") for p in self.pids}
        hwm_root = hwm.get(self.pid, 0)
        return {
            "peak_kib": max(self.peak_tree_kib, hwm_root),
            "peak_sampled_tree_kib": self.peak_tree_kib,
            "vmhwm_root_kib": hwm_root,
            "vmhwm_sum_kib": sum(hwm.values()),
            "processes": len(self.pids),
            "samples": self.samples,
        }


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is `pgid`."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[2]) == pgid:
            members.append(int(entry.name))
    return members


def stop_group(process: subprocess.Popen, timeout: float = 40.0) -> int | None:
    """SIGTERM the process group of `process` (started with start_new_session=True),
    wait up to `timeout`, then SIGKILL what is left of the group. Returns the leader's
    exit status (None if it had to be killed)."""
    killed = False
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            killed = True
    # Members of the group that outlived the leader (the group id cannot have been
    # reused while a member exists, so this never signals a stranger).
    if killed or group_members(process.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(10)
    return None if killed else process.returncode
