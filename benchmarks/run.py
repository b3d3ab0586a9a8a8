"""Benchmark imaging-scp against dcmtk storescp, Orthanc, pynetdicom's storescp and the floor.

    .venv/bin/python -m benchmarks.run [--quick] [--corpus small,ct,big]
        [--receivers imaging-scp,storescp,orthanc,pynetdicom,floor]
        [--modes default,nodelay,parallel4] [--repeats N]
        [--imaging-scp-flags "--workers 2"]
    .venv/bin/python -m benchmarks.run --retrieve [--quick] [--corpus small,ct] [--repeats N]
    .venv/bin/python -m benchmarks.run --web [--quick] [--repeats N]

Every cell (corpus x sender mode x receiver) starts the receiver fresh on loopback,
sends the corpus with dcmtk's /usr/bin/storescu, checks that every instance arrived,
and stops the receiver. With --retrieve, C-MOVE and C-GET of the corpus from
imaging-scp, Orthanc and dcmqrscp instead (benchmarks/retrieve.py); with --web,
`imaging-scp web` beside Orthanc's DICOMweb plugin (benchmarks/web.py). See
benchmarks/README.md.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import procs, retrieve, web
from benchmarks.corpus import FULL_SPECS, QUICK_SPECS, Corpus, ensure_corpus
from benchmarks.receivers import DCMTK_STORESCU as STORESCU
from benchmarks.receivers import RECEIVERS, ImagingScp, Receiver

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RESULTS = HERE / "results"
MB = 1_000_000  # figures are in decimal megabytes (10^6 bytes)
REFERENCE = "orthanc"
PROGRESS_EVERY = 10.0


@dataclass(frozen=True)
class Mode:
    key: str
    senders: int
    nodelay: bool
    description: str


MODES = {
    m.key: m
    for m in (
        Mode("default", 1, False, "one storescu, one association, Nagle on (as modalities)"),
        Mode("nodelay", 1, True, "one storescu, TCP_NODELAY=1 for sender and receiver"),
        Mode(
            "parallel4",
            4,
            True,
            "4 storescu processes at once, a quarter of the corpus each, TCP_NODELAY=1",
        ),
        Mode(
            "parallel4-default",
            4,
            False,
            "4 storescu processes at once, a quarter of the corpus each, Nagle on",
        ),
    )
}
DEFAULT_MODES = ["default", "nodelay", "parallel4"]
DEFAULT_RECEIVERS = ["imaging-scp", "storescp", "orthanc", "pynetdicom", "floor"]
RECEIVER_ALIASES = {
    "dcmtk": "storescp",
    "imaging_scp": "imaging-scp",
    "pynetdicom-storescp": "pynetdicom",
}


def say(*parts) -> None:
    print(*parts, flush=True)


def _list(value: str, allowed, aliases=None) -> list[str]:
    items = []
    for raw in value.split(","):
        item = raw.strip().lower()
        if not item:
            continue
        item = (aliases or {}).get(item, item)
        if item not in allowed:
            raise argparse.ArgumentTypeError(f"unknown '{raw}'; choose from {', '.join(allowed)}")
        if item not in items:
            items.append(item)
    return items


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="DICOM ingest benchmark: imaging-scp vs dcmtk storescp, Orthanc, pynetdicom.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny corpora, 1 repeat (smoke test)")
    parser.add_argument(
        "--retrieve",
        action="store_true",
        help="measure C-MOVE and C-GET of the small and ct corpora from imaging-scp, Orthanc"
        " and dcmqrscp, beside storescu's push (benchmarks/retrieve.py)",
    )
    parser.add_argument(
        "--web",
        action="store_true",
        help="measure `imaging-scp web` beside Orthanc's DICOMweb plugin: WADO-RS, QIDO-RS and"
        " FHIR search on the 1,000,000-instance index, STOW-RS, ingest beside WADO-RS"
        " (benchmarks/web.py)",
    )
    parser.add_argument(
        "--corpus",
        type=lambda v: _list(v, list(FULL_SPECS)),
        default=list(FULL_SPECS),
        help="comma list of small, ct, big [default: all]",
    )
    parser.add_argument(
        "--receivers",
        type=lambda v: _list(v, list(RECEIVERS), RECEIVER_ALIASES),
        default=DEFAULT_RECEIVERS,
        help=f"comma list of {', '.join(RECEIVERS)} [default: all of them]",
    )
    parser.add_argument(
        "--modes",
        type=lambda v: _list(v, list(MODES)),
        default=DEFAULT_MODES,
        help=f"comma list of {', '.join(MODES)} [default: {','.join(DEFAULT_MODES)}]",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per cell; the median is reported [3]"
    )
    parser.add_argument(
        "--slow-run-limit",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="do not repeat a cell whose first run took longer than this (0: always repeat)",
    )
    parser.add_argument(
        "--run-timeout",
        type=float,
        default=1200.0,
        metavar="SECONDS",
        help="a send that takes longer fails its cell [1200]",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="where the JSON goes [benchmarks/results; benchmarks/work/results with --quick]",
    )
    parser.add_argument(
        "--keep-data", action="store_true", help="keep each receiver's output directory"
    )
    parser.add_argument(
        "--live-code",
        action="store_true",
        help="run imaging-scp from the working tree as it is at each run, instead of a "
        "snapshot taken at the start (the tree may change during a long run)",
    )
    parser.add_argument(
        "--imaging-scp-flags",
        default=os.environ.get("IMAGING_SCP_ARGS", ""),
        metavar="FLAGS",
        help='extra arguments of `imaging-scp serve`, one string, e.g. "--workers 2" '
        "[$IMAGING_SCP_ARGS, else none]",
    )
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine)")
    args = parser.parse_args(argv)
    try:
        args.imaging_scp_flags = shlex.split(args.imaging_scp_flags)
    except ValueError as exc:
        parser.error(f"--imaging-scp-flags: {exc}")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.results_dir is None:
        args.results_dir = WORK / "results" if args.quick else RESULTS
    return args


# --- one measurement -----------------------------------------------------------------------


def environment(nodelay: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def send_dirs(corpus: Corpus, mode: Mode) -> list[Path]:
    if mode.senders == 1:
        return [corpus.root]
    return corpus.parts


def run_once(
    corpus: Corpus, mode: Mode, receiver: Receiver, rep: int, log_dir: Path, timeout: float
) -> dict:
    """Start the receiver, send the corpus, verify, stop. Returns the run's record."""
    tag = f"{corpus.spec.name}-{mode.key}-{receiver.key}-r{rep}"
    out_dir = WORK / "runs" / tag
    env = environment(mode.nodelay)
    record = {
        "rep": rep,
        "ok": False,
        "problems": [],
        "loadavg_before": round(os.getloadavg()[0], 2),
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    code = receiver.code_fingerprint()
    if code:
        record["receiver_code"] = code
    senders: list[subprocess.Popen] = []
    sender_logs = []
    try:
        receiver.start(out_dir, env, log_dir / f"{tag}.receiver.log")
        sampler = procs.RssSampler(receiver.process.pid).start()
        record["idle_rss_mb"] = round(sampler.current_kib() * 1024 / MB, 1)
        dirs = send_dirs(corpus, mode)
        cpu_before = sampler.cpu.sample()
        steal_before = procs.steal_seconds()
        started = time.perf_counter()
        for i, directory in enumerate(dirs):
            log = (log_dir / f"{tag}.sender{i}.log").open("wb")
            sender_logs.append(log)
            senders.append(
                subprocess.Popen(
                    [
                        STORESCU,
                        "+sd",
                        "+r",
                        "-aec",
                        receiver.aet,
                        "127.0.0.1",
                        str(receiver.port),
                        str(directory),
                    ],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        next_report = started + PROGRESS_EVERY
        while any(s.poll() is None for s in senders):
            now = time.perf_counter()
            if now - started > timeout:
                record["problems"].append(f"send not finished after {timeout:.0f} s")
                break
            if receiver.process.poll() is not None:
                record["problems"].append(
                    f"receiver exited with status {receiver.process.returncode} during the send"
                )
                break
            if now >= next_report:
                next_report = now + PROGRESS_EVERY
                try:
                    count = receiver.received()
                except OSError as exc:
                    count = f"? ({exc})"
                elapsed = now - started
                rate = f", {count / elapsed:.1f}/s" if isinstance(count, int) else ""
                say(
                    f"      ... {count}/{corpus.instances} received after {elapsed:.0f} s{rate}, "
                    f"receiver RSS {sampler.current_kib() * 1024 / MB:.0f} MB"
                )
            time.sleep(0.01)
        seconds = time.perf_counter() - started
        cpu_seconds = sampler.cpu.sample() - cpu_before
        record["steal_ms"] = round((procs.steal_seconds() - steal_before) * 1000)
        for i, sender in enumerate(senders):
            if sender.poll() is None:
                procs.stop_group(sender, timeout=5)
                record["problems"].append(f"storescu #{i} killed")
            elif sender.returncode != 0:
                record["problems"].append(f"storescu #{i} exited with status {sender.returncode}")
        record["seconds"] = seconds
        record["instances"] = corpus.instances
        record["instances_per_s"] = corpus.instances / seconds
        record["mb_per_s"] = corpus.bytes / MB / seconds
        record["cpu_seconds"] = round(cpu_seconds, 3)
        record["cpu_ms_per_instance"] = cpu_seconds * 1000 / corpus.instances
        record["cpu_processes"] = sampler.cpu.processes
        if receiver.process.poll() is None:
            try:
                record["problems"] += receiver.verify(corpus.instances)
            except Exception as exc:  # a check that cannot run is a failed check
                record["problems"].append(f"verification failed: {type(exc).__name__}: {exc}")
            rss = sampler.finish()
            record["rss"] = rss
            record["peak_rss_mb"] = round(rss["peak_kib"] * 1024 / MB, 1)
        else:
            sampler.finish()
    except Exception as exc:
        record["problems"].append(f"{type(exc).__name__}: {exc}")
    finally:
        for sender in senders:
            if sender.poll() is None:
                procs.stop_group(sender, timeout=5)
        for log in sender_logs:
            log.close()
        status = receiver.stop()
        record["receiver_exit_status"] = status
        if receiver.key == "imaging-scp" and status not in (0, None):
            record["problems"].append(f"imaging-scp exited with status {status} on SIGTERM")
        record["receiver_log"] = receiver.log_summary()
        record["receiver_log_path"] = str(receiver.log_path)
        record["sender_warnings"] = _sender_warnings(log_dir, tag, len(senders))
        if out_dir.exists() and not KEEP_DATA:
            OUTPUT_TO_DELETE.append(out_dir)
    record["ok"] = not record["problems"]
    return record


KEEP_DATA = False
# Every run's output is deleted at the end, not between runs, and the next run
# waits for ext4's window on recently deleted inodes (procs.wait_out_deletions).
OUTPUT_TO_DELETE: list[Path] = []


def clear_old_output() -> None:
    """Remove a previous benchmark's output, and wait out ext4's window."""
    runs = WORK / "runs"
    if runs.exists() and any(runs.iterdir()):
        say("removing the output of an earlier run")
        procs.delete_directories([runs])
    procs.wait_out_deletions()


def delete_output() -> None:
    procs.delete_directories(OUTPUT_TO_DELETE)
    OUTPUT_TO_DELETE.clear()


def _sender_warnings(log_dir: Path, tag: str, count: int) -> list[str]:
    lines = []
    for i in range(count):
        path = log_dir / f"{tag}.sender{i}.log"
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith(("E:", "W:", "F:")) and len(lines) < 10:
                    lines.append(f"#{i} {line[:200]}")
    return lines


# --- aggregation ---------------------------------------------------------------------------


def median_of(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get("ok") and r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(cells: list[dict]) -> None:
    for cell in cells:
        cell["median"] = {
            "instances_per_s": median_of(cell["runs"], "instances_per_s"),
            "mb_per_s": median_of(cell["runs"], "mb_per_s"),
            "peak_rss_mb": median_of(cell["runs"], "peak_rss_mb"),
            "seconds": median_of(cell["runs"], "seconds"),
            "cpu_ms_per_instance": median_of(cell["runs"], "cpu_ms_per_instance"),
        }
        cell["ok_runs"] = sum(1 for r in cell["runs"] if r["ok"])
        cell["status"] = "ok" if cell["ok_runs"] == len(cell["runs"]) else "FAILED"
        if cell["receiver"] == "imaging-scp":
            cell["time_budget"] = time_budget(cell)
    for cell in cells:
        ref = find(cells, cell["corpus"], cell["mode"], REFERENCE)
        ratios = {}
        for key in ("instances_per_s", "mb_per_s", "peak_rss_mb"):
            mine = cell["median"][key]
            theirs = ref["median"][key] if ref else None
            ratios[key] = mine / theirs if mine is not None and theirs else None
        cell["ratio_to_orthanc"] = ratios


def find(cells, corpus, mode, receiver):
    for cell in cells:
        if (cell["corpus"], cell["mode"], cell["receiver"]) == (corpus, mode, receiver):
            return cell
    return None


def _median(cells, corpus, mode, receiver, key):
    cell = find(cells, corpus, mode, receiver)
    return cell["median"][key] if cell else None


def _rate(cells, corpus, mode, receiver):
    return _median(cells, corpus, mode, receiver, "instances_per_s")


def time_budget(cell: dict) -> dict | None:
    """Where one instance's time goes in imaging-scp: per stage of the `timings` of its
    `instance.stored` events, the median over the cell's successful runs of each run's
    median and p90; their sum; the store path's `ms`; and the wall time per instance."""
    runs = [r for r in cell["runs"] if r.get("ok")]
    if not runs:
        return None
    logs = [r.get("receiver_log") or {} for r in runs]
    wall = statistics.median(r["seconds"] * 1000 / r["instances"] for r in runs)
    store = [g["handler_ms_median"] for g in logs if g.get("handler_ms_median") is not None]
    store90 = [g["handler_ms_p90"] for g in logs if g.get("handler_ms_p90") is not None]
    budget = {
        "statistic": "median over successful runs of each run's per-instance median / p90",
        "stages": None,
        "sum_of_medians_ms": None,
        "store_ms_median": statistics.median(store) if store else None,
        "store_ms_p90": statistics.median(store90) if store90 else None,
        "wall_ms_per_instance": wall,
        "timed_events": sum(g.get("timed_events", 0) for g in logs),
    }
    per_run = [g.get("stages") or {} for g in logs]
    order: list[str] = []
    for stages in per_run:
        order += [name for name in stages if name not in order]
    if not order:
        return budget
    budget["stages"] = {
        name: {
            "median_ms": statistics.median(s[name]["median"] for s in per_run if name in s),
            "p90_ms": statistics.median(s[name]["p90"] for s in per_run if name in s),
        }
        for name in order
    }
    budget["sum_of_medians_ms"] = sum(v["median_ms"] for v in budget["stages"].values())
    return budget


def targets(cells: list[dict]) -> list[dict]:
    """The issue's targets for imaging-scp; pass None when a needed cell was not measured."""
    out = []

    def add(name, value, threshold, unit, detail, higher_is_better=True):
        if value is None:
            passed = None
        else:
            passed = value >= threshold if higher_is_better else value <= threshold
        out.append(
            {
                "target": name,
                "value": value,
                "threshold": threshold,
                "unit": unit,
                "pass": passed,
                "detail": detail,
            }
        )

    me = "imaging-scp"
    for corpus, mode, threshold, what in (
        ("small", "nodelay", 1.3, "one association, TCP_NODELAY"),
        ("ct", "nodelay", 1.3, "one association, TCP_NODELAY"),
        ("small", "parallel4", 1.15, "4 parallel senders vs Orthanc's 4"),
        ("small", "default", 50.0, "one association, Nagle on"),
    ):
        mine, ref = _rate(cells, corpus, mode, me), _rate(cells, corpus, mode, REFERENCE)
        value = mine / ref if mine and ref else None
        detail = f"{mine:.1f}/s vs Orthanc {ref:.1f}/s" if mine and ref else "cell(s) not measured"
        add(
            f"{corpus}+{mode} ({what}) >= {threshold:g}x Orthanc (inst/s)",
            value,
            threshold,
            "x",
            detail,
        )

    cpu = _median(cells, "small", "nodelay", me, "cpu_ms_per_instance")
    ref_cpu = _median(cells, "small", "nodelay", REFERENCE, "cpu_ms_per_instance")
    detail = "cell not measured" if cpu is None else "receiver and its descendants"
    if ref_cpu is not None:
        detail += f"; Orthanc {ref_cpu:.2f} ms"
    add("small+nodelay: server CPU <= 0.7 ms per instance", cpu, 0.7, "ms", detail, False)

    big_cells = [c for c in cells if c["corpus"] == "big" and c["receiver"] == me]
    if not big_cells:
        add("1 GiB instance: peak RSS <= 100 MB", None, 100.0, "MB", "cell not measured", False)
        add("1 GiB instance: >= 300 MB/s", None, 300.0, "MB/s", "cell not measured")
    for cell in big_cells:
        rss, rate = cell["median"]["peak_rss_mb"], cell["median"]["mb_per_s"]
        ref = find(cells, "big", cell["mode"], REFERENCE)
        ref_rss = ref["median"]["peak_rss_mb"] if ref else None
        ref_rate = ref["median"]["mb_per_s"] if ref else None
        add(
            f"1 GiB instance ({cell['mode']}): peak RSS <= 100 MB",
            rss,
            100.0,
            "MB",
            "no successful run"
            if rss is None
            else f"{rss:.0f} MB" + (f"; Orthanc {ref_rss:,.0f} MB" if ref_rss else ""),
            higher_is_better=False,
        )
        add(
            f"1 GiB instance ({cell['mode']}): >= 300 MB/s",
            rate,
            300.0,
            "MB/s",
            "no successful run"
            if rate is None
            else f"{rate:.0f} MB/s" + (f"; Orthanc {ref_rate:.0f} MB/s" if ref_rate else ""),
        )
    return out


# --- output --------------------------------------------------------------------------------


def _fmt(value, digits=1, suffix=""):
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}{suffix}"
    if abs(value) < 1 and not suffix:
        return f"{value:.3g}"
    return f"{value:.{digits}f}{suffix}"


def _fmt_ms(value):
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def table(cells: list[dict]) -> str:
    header = [
        "corpus",
        "sender mode",
        "receiver",
        "n",
        "inst/s",
        "MB/s",
        "peak RSS MB",
        "CPU ms/inst",
        "inst/s xOrth",
        "MB/s xOrth",
        "RSS xOrth",
        "status",
    ]
    rows = [header]
    for cell in cells:
        m, r = cell["median"], cell["ratio_to_orthanc"]
        rows.append(
            [
                cell["corpus"],
                cell["mode"],
                cell["receiver"],
                f"{cell['ok_runs']}/{len(cell['runs'])}",
                _fmt(m["instances_per_s"]),
                _fmt(m["mb_per_s"]),
                _fmt(m["peak_rss_mb"], 0),
                _fmt_ms(m["cpu_ms_per_instance"]),
                _fmt(r["instances_per_s"], 2, "x"),
                _fmt(r["mb_per_s"], 2, "x"),
                _fmt(r["peak_rss_mb"], 2, "x"),
                cell["status"],
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    numeric = set(range(3, len(header) - 1))
    lines = []
    for n, row in enumerate(rows):
        cols = [
            row[i].rjust(widths[i]) if i in numeric else row[i].ljust(widths[i])
            for i in range(len(row))
        ]
        lines.append("  ".join(cols).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def targets_text(results: list[dict]) -> str:
    lines = []
    for t in results:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
        if t["value"] is None:
            value = "-"
        elif t["unit"] == "x":
            value = f"{t['value']:.2f}x"
        elif t["unit"] == "ms":
            value = f"{t['value']:.2f} ms"
        else:
            value = f"{t['value']:.0f} {t['unit']}"
        lines.append(f"  {mark}  {t['target']}: {value}  ({t['detail']})")
    return "\n".join(lines)


def budget_text(cells: list[dict], flags: str) -> str:
    lines = []
    for cell in cells:
        if cell["receiver"] != "imaging-scp" or "time_budget" not in cell:
            continue
        budget = cell["time_budget"]
        lines.append(f"\n  {cell['corpus']}/{cell['mode']}, imaging-scp {flags}:")
        if budget is None:
            lines.append("    no successful run")
            continue
        rows = [("stage", "median ms", "p90 ms")]
        if budget["stages"] is None:
            lines.append("    no stage timings in the log")
        else:
            rows += [
                (name, f"{v['median_ms']:.3f}", f"{v['p90_ms']:.3f}")
                for name, v in budget["stages"].items()
            ]
            rows.append(("sum of medians", f"{budget['sum_of_medians_ms']:.3f}", ""))
        if budget["store_ms_median"] is not None:
            rows.append(
                (
                    "store path ('ms')",
                    f"{budget['store_ms_median']:.3f}",
                    f"{budget['store_ms_p90']:.3f}",
                )
            )
        rows.append(("wall / instance", f"{budget['wall_ms_per_instance']:.3f}", ""))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        for row in rows:
            text = (
                f"{row[0].ljust(widths[0])}  {row[1].rjust(widths[1])}  {row[2].rjust(widths[2])}"
            )
            lines.append("    " + text.rstrip())
    return "\n".join(lines)


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_mib": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "network": "loopback (127.0.0.1)",
        "free_page_reporting": procs.free_page_reporting(),
    }


# --- main ----------------------------------------------------------------------------------


def main(argv=None) -> int:
    global KEEP_DATA
    args = parse_args(argv)
    KEEP_DATA = args.keep_data
    if not Path(STORESCU).exists():
        say(f"the sender {STORESCU} (dcmtk) is missing; install it with: apt-get install -y dcmtk")
        return 2
    if args.retrieve:
        return retrieve.run(args, WORK, say)
    if args.web:
        return web.run(args, WORK, say)
    started_at = datetime.datetime.now(datetime.UTC)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    log_dir = WORK / "logs" / stamp
    log_dir.mkdir(parents=True, exist_ok=True)

    receivers: list[Receiver] = []
    skipped = {}
    for key in args.receivers:
        receiver = RECEIVERS[key]()
        reason = receiver.unavailable()
        if reason:
            say(f"SKIP receiver {key}: {reason}")
            skipped[key] = reason
        else:
            receivers.append(receiver)
    if not receivers:
        say("no receiver can run")
        return 2
    versions = {r.key: r.version() for r in receivers}
    pinned = None
    flags_text = shlex.join(args.imaging_scp_flags) or "(default settings)"
    for receiver in receivers:
        if isinstance(receiver, ImagingScp):
            receiver.flags = list(args.imaging_scp_flags)
            say(f"imaging-scp serve flags: {flags_text}")
        if isinstance(receiver, ImagingScp) and not args.live_code:
            receiver.pin(WORK / "snapshots" / stamp)
            pinned = {"snapshot": str(receiver.snapshot), "code": receiver.code_fingerprint()}
            say(f"imaging-scp code pinned for this run: {receiver.snapshot} ({pinned['code']})")
    if REFERENCE not in [r.key for r in receivers]:
        say("note: Orthanc is not measured, so there are no ratios to it")
    machine = machine_info()
    if machine["free_page_reporting"]:
        say(
            "note: this VM gives freed memory back to its host (free page reporting); "
            "a cell that writes much (big, ct) pays the host's page faults as the output "
            "grows, whatever the receiver"
        )

    specs = QUICK_SPECS if args.quick else FULL_SPECS
    corpora = {key: ensure_corpus(key, specs[key], WORK, say) for key in args.corpus}
    clear_old_output()

    plan = []
    for key, corpus in corpora.items():
        for mode_key in args.modes:
            mode = MODES[mode_key]
            if mode.senders > len(corpus.parts):
                say(
                    f"skip {key}/{mode_key}: the corpus has {corpus.instances} instance(s), "
                    f"it cannot be split between {mode.senders} senders"
                )
                continue
            plan.append((corpus, mode))

    runs_total = len(plan) * len(receivers) * args.repeats
    say(
        f"\n{len(plan)} corpus/mode groups x {len(receivers)} receivers x {args.repeats} "
        f"repeat(s) = up to {runs_total} runs; the median of the repeats is reported"
        f"{' (quick mode: tiny corpora, figures are not meaningful)' if args.quick else ''}"
    )
    say(f"logs: {log_dir}")

    cells = []
    done = 0
    for corpus, mode in plan:
        group = []
        for receiver in receivers:
            cell = {
                "corpus": corpus.key,
                "corpus_name": corpus.spec.name,
                "mode": mode.key,
                "receiver": receiver.key,
                "runs": [],
            }
            cells.append(cell)
            group.append((receiver, cell))
        say(f"\n== {corpus.spec.name} ({corpus.spec.describe()}), sender mode {mode.key}")
        for rep in range(1, args.repeats + 1):
            for receiver, cell in group:
                first = cell["runs"][0] if cell["runs"] else None
                if (
                    rep > 1
                    and args.slow_run_limit
                    and first
                    and first.get("seconds", 0) > args.slow_run_limit
                ):
                    if rep == 2:
                        say(
                            f"   {receiver.key}: first run took {first['seconds']:.0f} s "
                            f"> --slow-run-limit {args.slow_run_limit:g} s: not repeated"
                        )
                        cell["repeat_skipped"] = True
                    done += 1
                    continue
                done += 1
                say(
                    f"[{done}/{runs_total}] {corpus.spec.name} {mode.key} {receiver.key} "
                    f"rep {rep}/{args.repeats}"
                )
                record = run_once(corpus, mode, receiver, rep, log_dir, args.run_timeout)
                cell["runs"].append(record)
                report_run(receiver, record)

    summarise(cells)
    results = targets(cells)
    say("\n" + "=" * 100)
    say(
        f"Median of {args.repeats} run(s) per cell (n = successful runs/runs); "
        f"MB = 10^6 bytes; 'xOrth' = ratio to Orthanc in the same corpus and sender mode."
    )
    if any(c.get("repeat_skipped") for c in cells):
        say(f"Cells slower than --slow-run-limit {args.slow_run_limit:g} s ran once (n = 1/1).")
    say(f"imaging-scp serve flags: {flags_text}")
    say(table(cells))
    say("\nTargets (imaging-scp):")
    say(targets_text(results))
    budgets = budget_text(cells, flags_text)
    if budgets:
        say(
            "\nimaging-scp per-instance time budget (ms; per stage, the median over runs of "
            "each run's median/p90;\n'store path' is the log's 'ms', 'wall / instance' the "
            "send's seconds / instances, which\nwith parallel senders is less than one "
            "instance's latency):"
        )
        say(budgets)
    failed = [c for c in cells if c["status"] != "ok"]
    if failed:
        say("\nFAILED cells:")
        for c in failed:
            for r in c["runs"]:
                if not r["ok"]:
                    cell_name = f"{c['corpus']}/{c['mode']}/{c['receiver']}"
                    say(f"  {cell_name} rep {r['rep']}: {'; '.join(r['problems'])}")
    code_changes = mixed_code(cells)
    if code_changes:
        say("\n" + "!" * 100)
        say(
            "!!! WARNING: the imaging-scp source tree changed during this run (it is installed "
            "editable);\n!!! its cells mix code versions and are not comparable with each other:"
        )
        for code, tags in code_changes.items():
            say(f"!!!   {code}: {len(tags)} run(s), first {tags[0]}, last {tags[-1]}")
        say("!" * 100)
    notes = imaging_scp_notes(cells)
    if notes:
        say("\nimaging-scp log:")
        say("\n".join(notes))
    if skipped:
        say("\nSkipped receivers:")
        for key, reason in skipped.items():
            say(f"  {key}: {reason}")

    document = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "note": args.note,
        "repeats": args.repeats,
        "slow_run_limit": args.slow_run_limit,
        "statistic": "median of successful runs",
        "units": {"mb": "10^6 bytes", "rate": "instances per second of wall time of the send"},
        "machine": machine,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "sender": {"binary": STORESCU, "version": _sender_version()},
        "modes": {k: MODES[k].description for k in args.modes},
        "receivers": versions,
        "imaging_scp_code": pinned or "live working tree (--live-code)",
        "imaging_scp_flags": args.imaging_scp_flags,
        "code_changes": code_changes,
        "skipped_receivers": skipped,
        "corpora": {k: c.to_json() for k, c in corpora.items()},
        "cells": cells,
        "targets": results,
        "table": f"imaging-scp serve flags: {flags_text}\n" + table(cells),
        "time_budgets": budget_text(cells, flags_text),
        "log_dir": str(log_dir),
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{stamp}.json"
    text = json.dumps(document, indent=2) + "\n"
    path.write_text(text)
    (args.results_dir / "latest.json").write_text(text)
    say(f"\nresults: {path} (and latest.json)")
    delete_output()
    return 1 if failed else 0


def _sender_version() -> str:
    try:
        out = subprocess.run([STORESCU, "--version"], capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0].strip("$ ")
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def report_run(receiver: Receiver, record: dict) -> None:
    if "seconds" in record:
        line = (
            f"    {'' if record['ok'] else '(FAILED) '}{record['seconds']:.2f} s: "
            f"{record['instances_per_s']:.1f} inst/s, "
            f"{record['mb_per_s']:.1f} MB/s, CPU {record['cpu_ms_per_instance']:.2f} ms/inst "
            f"({record['cpu_processes']} process(es)), "
            f"peak RSS {record.get('peak_rss_mb', '?')} MB "
            f"(idle {record.get('idle_rss_mb', '?')} MB), load {record['loadavg_before']}, "
            f"steal {record.get('steal_ms', '?')} ms"
        )
        say(line)
    log = record.get("receiver_log") or {}
    if receiver.key == "imaging-scp" and log:
        extra = ""
        if log.get("handler_ms_max") is not None:
            extra = (
                f", handler ms median {log['handler_ms_median']} p99 {log['handler_ms_p99']} "
                f"max {log['handler_ms_max']}"
            )
        say(
            f"    imaging-scp log: {log['stored']} stored, {log['refused']} refused, "
            f"{log['failed']} failed, {log['warnings']} warnings, {log['errors']} errors{extra}"
        )
    elif log.get("errors") or log.get("warnings"):
        say(f"    {receiver.key} log: {log['errors']} errors, {log['warnings']} warnings")
    for line in record.get("sender_warnings", [])[:3]:
        say(f"    storescu: {line}")
    if not record["ok"]:
        say("    " + "!" * 60)
        say(f"    !!! RUN FAILED: {'; '.join(record['problems'])}")
        say(f"    !!! receiver log: {record.get('receiver_log_path')}")
        say("    " + "!" * 60)


def mixed_code(cells: list[dict]) -> dict:
    """{fingerprint: [run tags]} when runs of one receiver executed different code, else {}."""
    runs = sorted(
        (
            run["started_at"],
            cell["receiver"],
            run["receiver_code"],
            f"{cell['corpus']}/{cell['mode']} rep {run['rep']}",
        )
        for cell in cells
        for run in cell["runs"]
        if run.get("receiver_code")
    )
    by_receiver: dict[str, dict[str, list[str]]] = {}
    for started_at, receiver, code, tag in runs:
        by_receiver.setdefault(receiver, {}).setdefault(code, []).append(f"{tag} ({started_at})")
    return {
        code: tags for seen in by_receiver.values() if len(seen) > 1 for code, tags in seen.items()
    }


def imaging_scp_notes(cells: list[dict]) -> list[str]:
    notes = []
    for cell in cells:
        if cell["receiver"] != "imaging-scp":
            continue
        for run in cell["runs"]:
            log = run.get("receiver_log") or {}
            if log.get("warnings") or log.get("errors") or log.get("refused") or log.get("failed"):
                notes.append(
                    f"  {cell['corpus']}/{cell['mode']} rep {run['rep']}: "
                    f"{log.get('refused')} refused, {log.get('failed')} failed, "
                    f"{log.get('warnings')} warnings, {log.get('errors')} errors; "
                    f"e.g. {log.get('examples', [])[:2]}"
                )
        handler_max = [
            r["receiver_log"]["handler_ms_max"]
            for r in cell["runs"]
            if (r.get("receiver_log") or {}).get("handler_ms_max") is not None
        ]
        if handler_max:
            notes.append(
                f"  {cell['corpus']}/{cell['mode']}: slowest C-STORE handler "
                f"{max(handler_max):.0f} ms"
            )
    return notes


if __name__ == "__main__":
    sys.exit(main())
