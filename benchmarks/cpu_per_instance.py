"""CPU time and system calls per instance of one receiver, robust to a busy machine.

    .venv/bin/python -m benchmarks.cpu_per_instance [--receiver imaging-scp|floor]
        [--corpus small|ct] [--count N] [--rounds R] [--beside-floor]
        [--no-strace] [--profile PSTATS] [--store-path]

Wall-clock rates mean little on a shared machine; the CPU a receiver spends per
instance, and the system calls it makes, depend less on who else runs (CPU
time still swells by ~20 % when the machine is busy: compare runs made side by
side, several times). One
dcmtk storescu (TCP_NODELAY=1 on both ends, as the benchmark's `nodelay` mode)
sends the first N files of a benchmark corpus over one association to a fresh
receiver (benchmarks/receivers.py), which is then checked to hold all N.

- CPU: utime + stime of the receiver's process tree (/proc, clock ticks) from
  just before the sender starts until it has exited, less what the receiver
  spends idle over as long (measured for 2 s before the send: imaging-scp's
  accept loop wakes twice a second). `--rounds R` runs it R times, each on a
  fresh receiver, and keeps the median; `--beside-floor` runs the floor after
  each and prints the median ratio.
- System calls: a second run, under `strace -c -f` attached to every thread of
  the fresh receiver, counts each call over the send (strace slows the receiver:
  its times are not used).
- With `--store-path`, only the storage side runs, in this process, on tmpfs
  (see `store_path_cpu`): the least noisy measure of a change there.
- With `--profile PSTATS`, a third run has every thread under cProfile with
  the thread's CPU clock (stats written to PSTATS, for `python -m pstats`).
  Each function's own time is counted in a group, by the first rule of GROUPS
  its name matches, else by its caller's (a builtin's time by each caller's):
  network+PDU, DIMSE, header walk, digest, file write, durability syscalls
  (open, fsync, close, link, unlink, mkdir of file and directory), index
  transaction, store checks, logging, other. cProfile slows Python code more
  than system calls: the shares are scaled to the CPU above, a rough split.

The corpora are the benchmark's own (benchmarks/corpus.py, cached under
benchmarks/work/); "ct" here is 200 instances of 512x512 (2 series of 100).
"""

import argparse
import collections
import os
import pstats
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import procs
from benchmarks.corpus import FULL_SPECS, CorpusSpec, ensure_corpus
from benchmarks.receivers import REPO, Floor, ImagingScp
from benchmarks.run import environment

STORESCU = "/usr/bin/storescu"
CORPORA = {"small": FULL_SPECS["small"], "ct": CorpusSpec("ct-200", 1, 2, 100, 512, 512)}
RECEIVERS = {"imaging-scp": ImagingScp, "floor": Floor}
IDLE_SECONDS = 2.0

# What a function's own CPU time is counted as: the first rule matching its name
# ("name (file:line)"; builtins as "<method 'execute' ...> (~:0)") decides. Others
# go to their callers' group (the caller with most time, up the stack).
GROUPS = [
    ("idle", re.compile(r"time\.sleep|\.acquire|\.wait\b|select|poll|accept")),
    ("durability syscalls", re.compile(r"posix\.(open|fsync|close|link|unlink|mkdir)\b")),
    ("index transaction", re.compile(r"storage/catalog/|sqlite3|psycopg")),
    ("logging", re.compile(r"structlog|scp/logs\.py|/json/|/logging/")),
    ("header walk", re.compile(r"storage/header\.py|storage/codec/")),
    ("digest", re.compile(r"_hashlib|hexdigest")),
    ("file write", re.compile(r"storage/files\.py|posix\.(write|writev|pwrite)\b|Received")),
    ("DIMSE", re.compile(r"scp/dimse\.py|store_service\.py|scp/service\.py")),
    # the request's checks, the resend's look, the free-space floor, the temp file's start
    ("store checks", re.compile(r"storage/store\.py|storage/uids\.py|pathlib")),
    (
        "network+PDU",
        re.compile(r"upper_layer\.py|scp/association\.py|_socket|floor\.py.*\((read|run)\)"),
    ),
]


def corpus_files(key: str, count: int | None) -> list[Path]:
    corpus = ensure_corpus(key, CORPORA[key], REPO / "benchmarks" / "work")
    paths = sorted(corpus.root.rglob("*.dcm"))
    return paths[:count] if count else paths


def send(receiver, paths: list[Path], env: dict) -> None:
    command = [STORESCU, "-aec", receiver.aet or "ANY", "127.0.0.1", str(receiver.port)]
    result = subprocess.run(
        [*command, *map(str, paths)], env=env, capture_output=True, text=True, timeout=1200
    )
    if result.returncode != 0:
        raise SystemExit(f"storescu failed ({result.returncode}): {result.stderr[-2000:]}")


def started(key: str, work: Path, env: dict, tag: str):
    receiver = RECEIVERS[key]()
    receiver.start(work / tag, env, work / f"{tag}.log")
    return receiver


def stopped(receiver, expected: int) -> None:
    status = receiver.stop()
    problems = receiver.verify(expected)
    if problems or status not in (0, -signal.SIGTERM, None):
        raise SystemExit(f"{receiver.key}: exit {status}; {'; '.join(problems)}")


def measure_cpu(key: str, paths: list[Path], work: Path, env: dict, tag: str) -> dict:
    receiver = started(key, work, env, tag)
    try:
        meter = procs.CpuMeter(receiver.process.pid)
        before_idle = meter.sample()
        time.sleep(IDLE_SECONDS)
        idle_rate = (meter.sample() - before_idle) / IDLE_SECONDS
        before, began = meter.sample(), time.monotonic()
        send(receiver, paths, env)
        cpu, seconds = meter.sample() - before, time.monotonic() - began
    finally:
        stopped(receiver, len(paths))
    busy = cpu - idle_rate * seconds
    return {
        "cpu_s": cpu,
        "idle_s": idle_rate * seconds,
        "ms_per_instance": busy * 1000 / len(paths),
    }


def _threads(pid: int) -> list[int]:
    tids = []
    for member in {pid} | procs.descendants(pid):
        tids += [int(t.name) for t in Path(f"/proc/{member}/task").iterdir()]
    return tids


def _traced(tid: int) -> bool:
    status = Path(f"/proc/{tid}/status").read_text()
    return re.search(r"^TracerPid:\s*0$", status, re.M) is None


def measure_syscalls(key: str, paths: list[Path], work: Path, env: dict) -> dict[str, int]:
    receiver = started(key, work, env, "strace")
    summary = work / "strace.txt"
    try:
        tids = _threads(receiver.process.pid)
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", "-o", str(summary), *(f"-p{tid}" for tid in tids)],
            stderr=subprocess.DEVNULL,
        )
        procs.wait_until(lambda: all(map(_traced, tids)), 30, tracer, "strace")
        send(receiver, paths, env)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(60)
    finally:
        stopped(receiver, len(paths))
    calls = {}
    for line in summary.read_text().splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(fields) in (5, 6) and fields[3].isdigit() and fields[-1] != "total":
            calls[fields[-1]] = int(fields[3])
    return calls


# Installed in the receiver through PYTHONPATH: every thread runs under a cProfile
# that counts its own CPU time (time.thread_time), all written out at exit.
_SITECUSTOMIZE = """
import atexit, cProfile, os, pstats, signal, sys, threading, time

_profiles = []


def _profiled(*_):
    profile = cProfile.Profile(time.thread_time)
    _profiles.append(profile)
    profile.enable()


def _dump():
    for profile in _profiles:
        profile.disable()
    stats = pstats.Stats(_profiles[0])
    for profile in _profiles[1:]:
        stats.add(profile)
    stats.dump_stats(os.environ["CPU_PER_INSTANCE_PROFILE"])


threading.setprofile(_profiled)
# SIGUSR2 (sent just before the send): forget the start-up's calls
signal.signal(signal.SIGUSR2, lambda *_: [profile.clear() for profile in _profiles])
# atexit runs on a SIGTERM too (imaging-scp installs its own handler, which exits)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
_profiled()
atexit.register(_dump)
"""


def measure_profile(key: str, paths: list[Path], env: dict, work: Path, output: Path):
    """CPU seconds by group, from a run under cProfile (slower than without: shares only)."""
    hook = work / "profile-hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    path = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    env = dict(env, PYTHONPATH=path, CPU_PER_INSTANCE_PROFILE=str(output))
    receiver = started(key, work, env, "profile")
    try:
        time.sleep(0.5)  # the receiver's threads are started
        os.kill(receiver.process.pid, signal.SIGUSR2)
        time.sleep(0.2)
        send(receiver, paths, env)
    finally:
        stopped(receiver, len(paths))
    stats = pstats.Stats(str(output)).stats
    groups: collections.Counter = collections.Counter()
    for function, (_calls, _primitive, own, _cumulative, callers) in stats.items():
        if function[0] == "~" and callers and _rule(function) is None:
            for caller, (_c, _p, caller_own, _cum) in callers.items():
                groups[_group(caller, stats)] += caller_own  # a builtin's time, per caller
            continue
        groups[_group(function, stats)] += own
    return groups


def _name(function: tuple) -> str:
    filename, line, name = function
    return f"{name} ({filename}:{line})"


def _rule(function: tuple) -> str | None:
    text = _name(function)
    return next((group for group, rule in GROUPS if rule.search(text)), None)


def _group(function: tuple, stats: dict, depth: int = 0) -> str:
    """The group of a function, or else of its callers' (the one with most time)."""
    if (group := _rule(function)) is not None:
        return group
    callers = stats.get(function, (0, 0, 0, 0, {}))[4]
    if depth < 8 and callers:
        caller = max(callers, key=lambda c: callers[c][3])
        return _group(caller, stats, depth + 1)
    return "other"


def store_path_cpu(key: str, paths: list[Path], directory: Path) -> float:
    """CPU ms per instance of the storage side alone, in this process, into
    `directory` (tmpfs: no disk wait, fsync nearly free): imaging-scp's
    `InstanceStore.receive` … `finish`, or the floor's `Received` and `keep`,
    given each dataset in fragments as a 256 KiB PDU carries them. Far less
    noisy than a whole receiver's CPU: for an A/B of a change on that path."""
    from storage import files

    datasets = []
    for path in paths:
        meta = files.read_file_meta(path)
        datasets.append((path.read_bytes()[meta.dataset_offset :], meta))
    fragment = 256 * 1024 - 6
    if key == "floor":
        from benchmarks import floor

        receiver = floor.Floor(directory)

        def store(view, meta):
            received = floor.Received(receiver, meta.transfer_syntax, {})
            for start in range(0, len(view), fragment):
                received.write(view[start : start + fragment])
            receiver.keep(received)
    else:
        from storage.catalog import Catalog, Provenance
        from storage.catalog.engines import IndexLocation
        from storage.policy import DuplicatePolicy
        from storage.store import InstanceStore

        files.prepare_data_dir(directory, "bench")
        catalog = Catalog.open(IndexLocation(directory), timeout=10)
        instances = InstanceStore(directory, catalog, DuplicatePolicy.KEEP_FIRST, node="bench")
        provenance = Provenance("STORESCU", "IMAGING_SCP", "127.0.0.1:1", "bench-1")

        def store(view, meta):
            incoming = instances.receive(
                meta.transfer_syntax, meta.sop_class_uid, meta.sop_instance_uid, provenance
            )
            for start in range(0, len(view), fragment):
                incoming.write(view[start : start + fragment])
            incoming.finish()

    started = time.process_time()
    for data, meta in datasets:
        store(memoryview(data), meta)
    return (time.process_time() - started) * 1000 / len(datasets)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receiver", choices=sorted(RECEIVERS), default="imaging-scp")
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="small")
    parser.add_argument("--count", type=int, help="send the first N files (default: all)")
    parser.add_argument("--no-strace", action="store_true", help="skip the syscall count")
    parser.add_argument(
        "--profile", metavar="PSTATS", help="CPU by group (cProfile); keep its stats here"
    )
    parser.add_argument(
        "--store-path",
        action="store_true",
        help="only the storage side, in this process, on tmpfs (/dev/shm): 3 runs",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="CPU runs, each of a fresh receiver (median)"
    )
    parser.add_argument(
        "--beside-floor", action="store_true", help="each CPU run followed by the floor's"
    )
    args = parser.parse_args(argv)
    paths = corpus_files(args.corpus, args.count)
    if args.store_path:
        runs = []
        for _ in range(3):
            with tempfile.TemporaryDirectory(prefix="cpu-per-instance-", dir="/dev/shm") as temp:
                runs.append(store_path_cpu(args.receiver, paths, Path(temp)))
        print(
            f"{args.receiver} store path, {len(paths)} {args.corpus} instances on tmpfs:"
            f" CPU {' / '.join(f'{run:.3f}' for run in runs)} ms/instance"
        )
        return 0
    env = environment(nodelay=True)
    n = len(paths)
    print(f"{args.receiver}, {n} {args.corpus} instances, one storescu (TCP_NODELAY=1)")
    with tempfile.TemporaryDirectory(prefix="cpu-per-instance-") as temp:
        work = Path(temp)
        keys = [args.receiver] + (["floor"] if args.beside_floor else [])
        runs: dict[str, list[float]] = {key: [] for key in keys}
        for round_ in range(args.rounds):  # interleaved: a burst of load hits both
            for key in keys:
                cpu = measure_cpu(key, paths, work, env, f"cpu-{key}-{round_}")
                runs[key].append(cpu["ms_per_instance"])
        for key in keys:
            print(
                f"{key}: CPU {statistics.median(runs[key]):.3f} ms/instance (median of"
                f" {' / '.join(f'{run:.3f}' for run in runs[key])}; idle rate subtracted)"
            )
        if args.beside_floor:
            ratios = [ours / floor for ours, floor in zip(*runs.values(), strict=True)]
            print(f"{args.receiver} / floor, CPU per instance: {statistics.median(ratios):.2f}")
        cpu = {"ms_per_instance": statistics.median(runs[args.receiver])}
        if not args.no_strace:
            calls = measure_syscalls(args.receiver, paths, work, env)
            total = sum(calls.values())
            print(f"syscalls {total / n:.1f}/instance:")
            for name, count in sorted(calls.items(), key=lambda item: -item[1]):
                if count >= n / 20:
                    print(f"  {name:<16} {count / n:6.2f}")
        if args.profile:
            groups = measure_profile(args.receiver, paths, env, work, Path(args.profile).resolve())
            groups.pop("idle", None)  # threads waiting: not CPU, whatever the clock said
            total = sum(groups.values()) or 1
            print("CPU by group (cProfile's shares, scaled to the CPU above):")
            for name, seconds in groups.most_common():
                share = seconds / total
                print(f"  {name:<18} {share:6.1%}  {share * cpu['ms_per_instance']:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
