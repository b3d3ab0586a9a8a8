"""Retrieve benchmark (`make bench ARGS="--retrieve"`): C-MOVE and C-GET of a corpus
from imaging-scp, Orthanc and dcmtk's dcmqrscp, beside the limit.

A retrieve is bounded by its destination, so the limit is dcmtk's storescu pushing
the same files to the same destination (a dcmtk storescp) in the same run. Each
source is started fresh and loaded with the corpus by storescu (not measured),
all of them before the first measurement; then the rounds are interleaved, each
round measuring every source in turn and then the push:

- move: dcmtk movescu asks the source to C-MOVE every study of the corpus (one
  request, STUDY level, the list of their UIDs) to a fresh storescp;
- get: dcmtk getscu asks for the same studies with C-GET and writes what
  arrives on its own association;
- push (the limit, once per round): storescu sends the corpus's files to a
  fresh storescp.

Every DICOM process of the run has TCP_NODELAY=1 (dcmtk reads it from the
environment; imaging-scp sets it on its sockets). Each cell records the rate,
the source's CPU per instance and its peak RSS during the retrieve (its
process tree, sampled), and the ratios to Orthanc and to the push.
"""

import contextlib
import datetime
import json
import os
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from benchmarks import procs
from benchmarks.corpus import FULL_SPECS, QUICK_SPECS, Corpus, ensure_corpus, files_by_study
from benchmarks.receivers import (
    DCMTK_STORESCU,
    DcmtkStorescp,
    ImagingScp,
    Orthanc,
    Receiver,
    first_line,
)

MOVESCU = "/usr/bin/movescu"
GETSCU = "/usr/bin/getscu"
DCMQRSCP = "/usr/bin/dcmqrscp"
CORPORA = ("small", "ct")
DESTINATION = "STORESCP"  # the move destination's AE title, in each source's configuration
CALLER = "RETRIEVER"
PUSH = "storescu push"  # the limit: storescu sending the corpus to the same destination
MB = 1_000_000


class ImagingScpSource(ImagingScp):
    """imaging-scp with the destination in its peers."""

    def __init__(self, destination_port: int):
        super().__init__()
        self.destination_port = destination_port

    def command(self):
        return [*super().command(), "--peer", f"{DESTINATION}=127.0.0.1:{self.destination_port}"]

    def holds(self) -> int:
        return self.indexed()


class OrthancSource(Orthanc):
    """Orthanc (files on disk, SQLite index) as C-MOVE and C-GET SCP."""

    def __init__(self, destination_port: int):
        super().__init__()
        self.destination_port = destination_port

    def prepare(self):
        super().prepare()
        path = self.out_dir / "orthanc.json"
        config = json.loads(path.read_text())
        config["DicomModalities"] = {
            DESTINATION: [DESTINATION, "127.0.0.1", self.destination_port],
            CALLER: [CALLER, "127.0.0.1", 104],  # never called: C-GET answers on its association
        }
        config["DicomAlwaysAllowMove"] = True
        config["DicomAlwaysAllowGet"] = True
        path.write_text(json.dumps(config, indent=2))

    def holds(self) -> int:
        return self.received()


class Dcmqrscp(Receiver):
    """dcmtk's dcmqrscp with its own storage area, loaded over C-STORE."""

    key = "dcmqrscp"
    aet = "DCMQRSCP"
    install_hint = "apt-get install -y dcmtk"

    def __init__(self, destination_port: int):
        super().__init__()
        self.destination_port = destination_port

    def unavailable(self):
        if not Path(DCMQRSCP).exists():
            return f"dcmtk's dcmqrscp is not installed; install it with: {self.install_hint}"
        return None

    def version(self):
        return first_line([DCMQRSCP, "--version"]).strip("$ ")

    def prepare(self):
        (self.out_dir / "db").mkdir()
        (self.out_dir / "dcmqrscp.cfg").write_text(
            f"NetworkTCPPort = {self.port}\n"
            "MaxPDUSize = 65536\n"
            "MaxAssociations = 16\n"
            "HostTable BEGIN\n"
            f"destination = ({DESTINATION}, 127.0.0.1, {self.destination_port})\n"
            "HostTable END\n"
            "VendorTable BEGIN\n"
            "VendorTable END\n"
            "AETable BEGIN\n"
            f"{self.aet} {self.out_dir / 'db'} RW (10000, 4096mb) ANY\n"
            "AETable END\n"
        )

    def command(self):
        return [DCMQRSCP, "-c", str(self.out_dir / "dcmqrscp.cfg"), str(self.port)]

    def holds(self) -> int:
        return sum(1 for p in (self.out_dir / "db").iterdir() if p.name != "index.dat")

    def received(self) -> int:
        return self.holds()


SOURCES = {"imaging-scp": ImagingScpSource, "orthanc": OrthancSource, "dcmqrscp": Dcmqrscp}


# -- one measurement -------------------------------------------------------------------


def study_query(corpus: Corpus, path: Path) -> int:
    """Write the C-MOVE/C-GET identifier of every study of the corpus (STUDY level,
    the list of their UIDs: one request, as getscu 3.6.7 crashes after a second
    query file); the number of studies."""
    studies = sorted(files_by_study(corpus))
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = studies
    path.parent.mkdir(parents=True, exist_ok=True)
    query.save_as(path, implicit_vr=False, little_endian=True)
    return len(studies)


def run_tool(command: list[str], env: dict, log: Path, timeout: float) -> tuple[float, int]:
    """Run a tool (dcmtk's, curl) to its end: its wall seconds and exit status;
    subprocess.TimeoutExpired after `timeout` seconds (the tool killed).

    The wait blocks in waitpid(): `subprocess.run(timeout=…)` polls instead,
    sleeping up to 50 ms between looks, which made a 0.33 s run measure 0.365 s
    and put WADO-RS rates of 0.3–0.4 s runs in 50 ms steps (±15 %)."""
    started = time.perf_counter()
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
        killer = threading.Timer(timeout, process.kill)
        killer.start()
        try:
            status = process.wait()
        finally:
            killer.cancel()
    seconds = time.perf_counter() - started
    if seconds >= timeout and status < 0:
        raise subprocess.TimeoutExpired(command, timeout)
    return seconds, status


def load(source, directory: Path, expected: int, env: dict, log: Path, timeout: float) -> None:
    """Store the files under `directory` into a source (a Receiver with `holds()`)
    with storescu; RuntimeError unless it then holds `expected` instances."""
    command = [
        DCMTK_STORESCU, "+sd", "+r", "-aec", source.aet, "127.0.0.1", str(source.port),
        str(directory),
    ]  # fmt: skip
    _, status = run_tool(command, env, log, timeout)
    deadline = time.monotonic() + 30
    while source.holds() < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    if status != 0 or source.holds() != expected:
        raise RuntimeError(
            f"loading {source.key}: storescu status {status}, it holds {source.holds()}"
            f" of {expected} (see {log})"
        )


def count_files(directory: Path) -> int:
    return sum(1 for p in directory.rglob("*") if p.is_file())


@dataclass
class Bench:
    """What every measurement of one corpus shares: the destination (a storescp
    started fresh on `port` for each move and push), the environment, the limit."""

    corpus: Corpus
    query: Path  # the identifier naming every study
    destination: DcmtkStorescp
    port: int
    env: dict
    timeout: float

    def measure(self, operation: str, source: Receiver | None, run_dir: Path) -> dict:
        """One retrieve (move, get) from `source`, or the push (source None)."""
        run_dir.mkdir(parents=True)
        if operation == "get":
            out = run_dir / "get"
            out.mkdir()
            return self._run(operation, source, run_dir, out)
        self.destination.start(
            run_dir / "destination", self.env, run_dir / "destination.log", port=self.port
        )
        try:
            return self._run(operation, source, run_dir, self.destination.out_dir / "out")
        finally:
            self.destination.stop()

    def _run(self, operation: str, source: Receiver | None, run_dir: Path, out: Path) -> dict:
        record: dict = {"operation": operation, "problems": []}
        instances = self.corpus.instances
        sampler = procs.RssSampler(source.process.pid).start() if source else None
        cpu_before = sampler.cpu.sample() if sampler else 0.0
        try:
            seconds, status = run_tool(
                self._command(operation, source, out), self.env, run_dir / f"{operation}.log",
                self.timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            record["problems"].append(f"{operation} not finished after {self.timeout:.0f} s")
            seconds, status = self.timeout, None
        if sampler is not None:
            cpu_seconds = sampler.cpu.sample() - cpu_before
            record["cpu_ms_per_instance"] = cpu_seconds * 1000 / instances
            # Sampled during the retrieve: the kernel's high-water mark includes the load.
            peak = sampler.finish()["peak_sampled_tree_kib"]
            record["peak_rss_mb"] = round(peak * 1024 / MB, 1)
        if status not in (0, None):
            record["problems"].append(f"{operation} exited with status {status}")
        arrived = count_files(out)
        if arrived != instances:
            record["problems"].append(f"{arrived} instances arrived, expected {instances}")
        record["seconds"] = seconds
        record["instances_per_s"] = instances / seconds
        record["ok"] = not record["problems"]
        return record

    def _command(self, operation: str, source: Receiver | None, out: Path) -> list[str]:
        if operation == "push":
            return [
                DCMTK_STORESCU, "+sd", "+r", "-aec", DESTINATION, "127.0.0.1", str(self.port),
                str(self.corpus.root),
            ]  # fmt: skip
        if operation == "move":
            return [
                MOVESCU, "-S", "-aet", CALLER, "-aec", source.aet, "-aem", DESTINATION,
                "127.0.0.1", str(source.port), str(self.query),
            ]  # fmt: skip
        return [
            GETSCU, "-S", "-aet", CALLER, "-aec", source.aet, "+B", "-od", str(out),
            "127.0.0.1", str(source.port), str(self.query),
        ]  # fmt: skip


# -- the run -----------------------------------------------------------------------------


def run(args, work: Path, say) -> int:
    """The retrieve mode of benchmarks.run: its --quick, --corpus, --repeats,
    --run-timeout, --results-dir, --imaging-scp-flags, --live-code and --note."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    root = work / "retrieve" / stamp
    env = dict(os.environ, TCP_NODELAY="1")
    specs = QUICK_SPECS if args.quick else FULL_SPECS
    corpora = [ensure_corpus(k, specs[k], work, say) for k in args.corpus if k in CORPORA]
    if not corpora:
        say(f"the retrieve mode measures the corpora {', '.join(CORPORA)}")
        return 2
    destination = DcmtkStorescp()
    cells: dict[tuple[str, str, str], list[dict]] = {}
    versions = {"destination": destination.version()}
    skipped = {}
    for corpus in corpora:
        query = root / corpus.key / "query.dcm"
        studies = study_query(corpus, query)
        say(f"\n== {corpus.spec.name} ({corpus.spec.describe()}): {studies} studies")
        bench = Bench(corpus, query, destination, procs.free_port(), env, args.run_timeout)
        # Every source holds the corpus at once and the rounds are interleaved (each
        # source's move and get, then the push, round after round): a slower minute
        # of this machine falls on every source alike.
        with contextlib.ExitStack() as running:
            sources = {}
            for key, kind in SOURCES.items():
                source = kind(bench.port)
                reason = source.unavailable()
                if reason:
                    skipped[key] = reason
                    say(f"SKIP {key}: {reason}")
                    continue
                versions[key] = source.version()
                if isinstance(source, ImagingScp):
                    source.flags = list(args.imaging_scp_flags)
                    if not args.live_code:
                        source.pin(root / "snapshot")
                source_dir = root / corpus.key / key
                source.start(source_dir / "source", env, source_dir / "source.log")
                running.callback(source.stop)
                load(
                    source, corpus.root, corpus.instances, env, source_dir / "load.log",
                    args.run_timeout,
                )  # fmt: skip
                sources[key] = (source, source_dir)
            for rep in range(1, args.repeats + 1):
                for key, (source, source_dir) in sources.items():
                    for operation in ("move", "get"):
                        record = bench.measure(
                            operation, source, source_dir / f"{operation}-r{rep}"
                        )
                        cells.setdefault((corpus.key, operation, key), []).append(record)
                        _report(f"{key} {operation} r{rep}", record, say)
                record = bench.measure("push", None, root / corpus.key / f"push-r{rep}")
                for operation in ("move", "get"):  # the limit of both
                    cells.setdefault((corpus.key, operation, PUSH), []).append(record)
                _report(f"{PUSH} r{rep}", record, say)
    summary = _summarise(cells)
    say("\n" + _table(summary))
    document = {
        "started_at": stamp,
        "quick": args.quick,
        "note": args.note,
        "repeats": args.repeats,
        "statistic": "median of successful runs",
        "versions": versions,
        "skipped": skipped,
        "imaging_scp_flags": args.imaging_scp_flags,
        "corpora": {c.key: c.to_json() for c in corpora},
        "cells": summary,
        "table": _table(summary),
    }
    write_results(args, f"retrieve-{stamp}.json", document, root, say)
    return 0 if all(cell["ok_runs"] == cell["runs"] for cell in summary) else 1


def write_results(args, name: str, document: dict, root: Path, say) -> None:
    """Write a mode's JSON into --results-dir; remove its work directory unless --keep-data."""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / name
    path.write_text(json.dumps(document, indent=2) + "\n")
    say(f"\nresults: {path}")
    if not args.keep_data:
        procs.delete_directories([root])


def _summarise(cells: dict) -> list[dict]:
    rows = []
    for (corpus, operation, who), runs in cells.items():
        ok = [r for r in runs if r["ok"]]

        def median(key, ok=ok):
            values = [r[key] for r in ok if r.get(key) is not None]
            return statistics.median(values) if values else None

        rows.append(
            {
                "corpus": corpus, "operation": operation, "source": who, "runs": len(runs),
                "ok_runs": len(ok), "instances_per_s": median("instances_per_s"),
                "cpu_ms_per_instance": median("cpu_ms_per_instance"),
                "peak_rss_mb": median("peak_rss_mb"),
                "problems": sorted({p for r in runs for p in r["problems"]}),
            }
        )  # fmt: skip
    for row in rows:
        for reference, name in (("orthanc", "x_orthanc"), (PUSH, "x_push")):
            other = next(
                (
                    r for r in rows
                    if (r["corpus"], r["operation"], r["source"])
                    == (row["corpus"], row["operation"], reference)
                ),
                None,
            )  # fmt: skip
            rate, theirs = row["instances_per_s"], other and other["instances_per_s"]
            row[name] = rate / theirs if rate and theirs else None
    return rows


def _table(rows: list[dict]) -> str:
    header = ("corpus", "op", "source", "n", "inst/s", "CPU ms/inst", "peak RSS MB", "xOrth",
              "xPush")  # fmt: skip
    lines = [header]
    for row in rows:
        lines.append(
            (
                row["corpus"], row["operation"], row["source"], f"{row['ok_runs']}/{row['runs']}",
                _figure(row["instances_per_s"], "{:.1f}"),
                _figure(row["cpu_ms_per_instance"], "{:.3f}"),
                _figure(row["peak_rss_mb"], "{:.1f}"), _figure(row["x_orthanc"], "{:.2f}"),
                _figure(row["x_push"], "{:.2f}"),
            )
        )  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)  # fmt: skip


def _figure(value, shape: str) -> str:
    return "-" if value is None else shape.format(value)


def _report(what: str, record: dict, say) -> None:
    cpu = record.get("cpu_ms_per_instance")
    say(
        f"   {what}: {record['seconds']:.2f} s, {record['instances_per_s']:.1f} inst/s"
        + (
            f", source CPU {cpu:.3f} ms/inst, peak RSS {record['peak_rss_mb']} MB"
            if cpu is not None
            else ""
        )
        + ("" if record["ok"] else f"  FAILED: {'; '.join(record['problems'])}")
    )
