"""Process plumbing: free ports, readiness, memory sampling, stopping process groups."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

# On ext4 without a journal a new file's inode skips the inodes of its group
# deleted within the last 60 s, 360 s while their inode table block is not yet
# written back (RECENTCY_MIN/RECENTCY_DIRTY in fs/ext4/ialloc.c, kernel 6.x), each
# skip a buffer-cache lookup. A run started right after thousands of files were
# deleted paid 0.2-0.3 ms more per file it created (imaging-scp 484/s just after a
# deletion, 605/s without one; perf: 28 % of the server's samples in
# recently_deleted()/find_inode_bit()). So a benchmark's deletion is followed by a
# sync and noted, and the next measurement waits until the window has passed.
RECENTLY_DELETED_WINDOW = 61  # seconds, once the deleted inodes are written back
DELETED_AT = Path(__file__).resolve().parent / "work" / "output-deleted-at"


def delete_directories(directories: list[Path]) -> None:
    """Remove benchmark output, and note when (`wait_out_deletions`)."""
    if not directories:
        return
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)
    files_deleted()


def files_deleted() -> None:
    """Note files a benchmark had deleted some other way (an `imaging-scp delete`)."""
    os.sync()  # the inode tables written back: the shorter window applies
    DELETED_AT.parent.mkdir(parents=True, exist_ok=True)
    DELETED_AT.write_text(f"{time.time():.0f}\n")


def wait_out_deletions() -> None:
    """Before a measurement: wait until the files a benchmark last deleted are
    out of ext4's window."""
    try:
        deleted_at = float(DELETED_AT.read_text())
    except (OSError, ValueError):
        return
    quiet = deleted_at + RECENTLY_DELETED_WINDOW - time.time()
    if quiet > 0:
        print(
            f"{quiet:.0f} s of quiet: ext4 avoids the inodes deleted in the last minute", flush=True
        )
        time.sleep(quiet)


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


CLK_TCK = os.sysconf("SC_CLK_TCK")


def steal_seconds() -> float:
    """CPU time the hypervisor gave to others, all CPUs, since boot (0 off Linux):
    a virtual machine's rates move with it, so each run records how much it saw."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return 0.0
    return int(fields[8]) / CLK_TCK if len(fields) > 8 else 0.0


VIRTIO_BALLOON_F_REPORTING = 5


def free_page_reporting() -> bool:
    """Whether this VM gives the memory its kernel frees back to the host (virtio-balloon
    free page reporting). Every page the page cache takes after that is faulted in by the
    host again: `dd` of 1 GiB with fsync cost 0.3-0.8 s of system time into memory the
    guest had just used, 3.4 s into memory it had given back (benchmarks/README.md,
    run 15). Cells that write much (big, ct) pay it as their output grows, whatever the
    receiver."""
    for features in Path("/sys/bus/virtio/drivers/virtio_balloon").glob("virtio*/features"):
        with contextlib.suppress(OSError):
            bits = features.read_text().strip()  # feature bit N is character N
            if len(bits) > VIRTIO_BALLOON_F_REPORTING and bits[VIRTIO_BALLOON_F_REPORTING] == "1":
                return True
    return False


def cpu_ticks(pid: int) -> tuple[int, int, int, int] | None:
    """(start time, ppid, utime + stime, cutime + cstime) of `pid` in clock ticks, from
    /proc/PID/stat; None if it is gone. A process's utime/stime include all its threads,
    also those that exited; cutime/cstime are its children that it waited for."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    try:
        own = int(fields[11]) + int(fields[12])
        return int(fields[19]), int(fields[1]), own, int(fields[13]) + int(fields[14])
    except (IndexError, ValueError):
        return None


class CpuMeter:
    """CPU time (user + system) used by a process tree.

    Every sample reads the tree's current members (the root and its descendants; pass
    the set, or it is scanned) and remembers each process's latest figure, own CPU plus
    that of the children it waited for, keyed by (pid, start time) so a reused pid is a
    new process. A process that disappears keeps its last figure, except when its
    parent, still in the tree, has meanwhile gained at least that much children's CPU
    (it waited for it: the figure moved to the parent's). CPU a vanished process used
    after its last sample is then missed, so sample often: RssSampler does, at every
    rescan. `sample()` returns the total in seconds; the difference of two samples is
    the CPU the tree used in between."""

    def __init__(self, pid: int):
        self.pid = pid
        self._figures: dict[tuple[int, int], int] = {}  # what counts, per process
        self._live: dict[tuple[int, int], tuple[int, int]] = {}  # key -> (ppid, children)
        self._seen = 0
        self._lock = threading.Lock()

    def sample(self, pids: set[int] | None = None) -> float:
        if pids is None:
            pids = {self.pid} | descendants(self.pid)
        with self._lock:
            now = {}
            for pid in pids:
                got = cpu_ticks(pid)
                if got is not None:
                    start, ppid, own, children = got
                    now[(pid, start)] = (ppid, own, children)
            vanished: dict[int, list[tuple[int, int]]] = {}
            for key, (ppid, _children) in self._live.items():
                if key not in now:
                    vanished.setdefault(ppid, []).append(key)
            for ppid, keys in vanished.items():
                parent = next((k for k in now if k[0] == ppid and k in self._live), None)
                if parent is None:
                    continue
                gained = now[parent][2] - self._live[parent][1]
                if gained >= sum(self._figures[k] for k in keys):
                    for key in keys:
                        del self._figures[key]  # now inside the parent's figure
            for key, (_ppid, own, children) in now.items():
                if key not in self._figures:
                    self._seen += 1
                self._figures[key] = own + children
            self._live = {key: (ppid, children) for key, (ppid, _own, children) in now.items()}
            return sum(self._figures.values()) / CLK_TCK

    @property
    def processes(self) -> int:
        """How many processes were seen so far."""
        with self._lock:
            return self._seen


class RssSampler:
    """Samples VmRSS of a process tree every `interval` seconds; at the end also reads
    VmHWM (the kernel's own high-water mark, per process) before the process is stopped.
    At every rescan of the tree it also samples `self.cpu` (a CpuMeter of the same tree),
    so the CPU of a process that exits during a run is counted up to its last rescan."""

    def __init__(self, pid: int, interval: float = 0.02, rescan: float = 0.25):
        self.pid = pid
        self.interval = interval
        self.rescan = rescan
        self.pids = {pid}
        self.peak_tree_kib = 0
        self.samples = 0
        self.cpu = CpuMeter(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> "RssSampler":
        self.pids = {self.pid} | descendants(self.pid)  # workers forked at start, too
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
                self.cpu.sample(self.pids)
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
