"""Web benchmark (`make bench ARGS="--web"`): `imaging-scp web` beside Orthanc with its
DICOMweb plugin, on issue 32's targets.

- WADO-RS: one curl process fetches every study of the ct corpus (600 instances of
  512², one request per study, `transfer-syntax=*`: the files as stored) from each
  server holding the corpus (loaded with storescu, not measured). MB/s of the fetch and
  the server's CPU ms per MB (imaging-scp: the `web` process; its listener idles). A
  first fetch, to files, checks the parts (and warms both page caches alike); the timed
  fetches go to /dev/null. Target: >= 1.0x Orthanc's MB/s.
- QIDO-RS `studies?PatientID=` and FHIR `ImagingStudy?patient:identifier=` on the index
  of benchmarks.index_queries (1,000,000 instances, filled or reused): the latency of
  single requests on one kept-alive connection, over a set of patients in turn, each
  answer's count checked against the index. Target: p50 <= 20 ms.
- STOW-RS: curl posts the small corpus, one multipart body per study (the same bodies to
  both, built before), in one process, to each server started fresh. Target: >= 1.0x
  Orthanc's instances/s.
- Ingest beside WADO-RS: storescu sends the small corpus to `imaging-scp serve` while curl
  fetches a study from `imaging-scp web` on the same data directory, over and over,
  against the same with the web service idle; each run on a fresh data directory holding
  a quarter of the ct corpus (what the loop fetches). Target: >= 0.9x the rate alone.

`imaging-scp web` runs at its unit's niceness (WEB_NICE, the unit's Nice=) throughout; the
unit's CPUWeight= has no equivalent outside systemd.

Every process has TCP_NODELAY=1 (dcmtk and Orthanc read it from the environment).
"""

import datetime
import http.client
import json
import os
import sqlite3
import statistics
import subprocess
import threading
import time
from pathlib import Path

from benchmarks import index_queries, procs
from benchmarks.corpus import FULL_SPECS, QUICK_SPECS, Corpus, ensure_corpus, files_by_study
from benchmarks.receivers import DCMTK_STORESCU, ImagingScp, Orthanc, first_line
from benchmarks.retrieve import load, run_tool, write_results

CURL = "/usr/bin/curl"
ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
BOUNDARY = b"imaging-scp-web-benchmark-7d1f0c"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY.decode()}'
MB = 1_000_000
# The niceness systemd/imaging-scp-web.service gives the web (Nice=): started as deployed.
WEB_NICE = 10
INDEX_SIZE = {False: (1_000_000, 10_000), True: (20_000, 200)}  # instances, studies (--quick)
PATIENTS = 50  # queried in turn
ROUNDS = {False: 4, True: 1}  # timed rounds over the patients (--quick)
TARGETS = {
    "wado": 1.0,  # x Orthanc's MB/s
    "qido_p50_ms": 20.0,
    "fhir_p50_ms": 20.0,
    "stow": 1.0,  # x Orthanc's instances/s
    "ingest": 0.9,  # x ingest alone
}


# -- the servers -------------------------------------------------------------------------


class ImagingScpWeb(ImagingScp):
    """`imaging-scp web` on a data directory (a listener's, or an index alone), at the
    unit's niceness."""

    key = "imaging-scp web"

    def __init__(self, data_dir: Path, snapshot: Path | None):
        super().__init__()
        self._data_dir = data_dir
        self.snapshot = snapshot

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    def command(self):
        return [
            "nice", "-n", str(WEB_NICE), str(self.script), "web", "--web-port", str(self.port),
            "--data-dir", str(self.data_dir),
        ]  # fmt: skip


class ImagingScpWithWeb:
    """imaging-scp as deployed for the web: the listener (`serve`, which makes the data
    directory) and `imaging-scp web` beside it on the same data directory."""

    key = "imaging-scp"

    def __init__(self, flags: list[str], snapshot: Path | None):
        self.listener = ImagingScp()
        self.listener.flags = flags
        self.listener.snapshot = snapshot
        self.web: ImagingScpWeb | None = None  # on the listener's data directory, once made
        self.snapshot = snapshot

    aet = ImagingScp.aet

    @property
    def port(self) -> int:
        return self.listener.port

    def unavailable(self):
        return self.listener.unavailable()

    def version(self):
        return self.listener.version()

    def launch(self, directory: Path, env: dict) -> None:
        self.listener.start(directory / "listener", env, directory / "listener.log")
        self.web = ImagingScpWeb(self.listener.data_dir, self.snapshot)
        self.web.start(directory / "web", env, directory / "web.log")

    def shutdown(self) -> None:
        if self.web is not None:
            self.web.stop()
        self.listener.stop()

    @property
    def http_pid(self) -> int:
        return self.web.process.pid

    @property
    def studies_url(self) -> str:
        return f"http://127.0.0.1:{self.web.port}/dicomweb/studies"

    def holds(self) -> int:
        return self.listener.indexed()

    def verify(self, expected: int) -> list[str]:
        return self.listener.verify(expected)


class OrthancDicomWeb(Orthanc):
    """Orthanc (files on disk, SQLite index) with its DICOMweb plugin."""

    install_hint = "apt-get install -y orthanc orthanc-dicomweb"

    def unavailable(self):
        if not ORTHANC_DICOMWEB.exists():
            return f"Orthanc's DICOMweb plugin is not installed: {self.install_hint}"
        return super().unavailable()

    def version(self):
        return f"{super().version()}, {ORTHANC_DICOMWEB.name}"

    def prepare(self):
        super().prepare()
        path = self.out_dir / "orthanc.json"
        config = json.loads(path.read_text())
        config["Plugins"] = [str(ORTHANC_DICOMWEB)]
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        path.write_text(json.dumps(config, indent=2))

    def launch(self, directory: Path, env: dict) -> None:
        self.start(directory / "orthanc", env, directory / "orthanc.log")

    def shutdown(self) -> None:
        self.stop()

    @property
    def http_pid(self) -> int:
        return self.process.pid

    @property
    def studies_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web/studies"

    def holds(self) -> int:
        return self.received()


# -- clients -------------------------------------------------------------------------


def count_parts(path: Path) -> int:
    """The parts of a multipart body saved to a file: the delimiter lines after the
    first (the last one closes the body), read in chunks."""
    with path.open("rb") as body:
        first = body.readline()
        while first in (b"\r\n", b"\n"):  # a preamble's empty lines
            first = body.readline()
        needle = b"\r\n" + first.rstrip(b"\r\n")
        count, tail = 0, b""
        while chunk := body.read(1 << 24):
            data = tail + chunk
            count += data.count(needle)
            tail = data[-(len(needle) - 1) :]
    return count


def fetch_command(urls: list[str], outputs: list[Path]) -> list[str]:
    """One curl process fetching each URL as stored, kept-alive; it writes each transfer's
    byte count on a line."""
    command = [CURL, "-sS", "--fail", "-H", f"Accept: {AS_STORED}", "-w", "%{size_download}\n"]
    for url, output in zip(urls, outputs, strict=True):
        command += ["-o", str(output), url]
    return command


def downloaded(log: Path) -> list[int]:
    return [int(word) for word in log.read_text(errors="replace").split() if word.isdigit()]


def write_stow_bodies(corpus: Corpus, directory: Path) -> list[Path]:
    """One multipart/related body per study of the corpus."""
    directory.mkdir(parents=True, exist_ok=True)
    bodies = []
    for number, files in enumerate(files_by_study(corpus).values()):
        path = directory / f"study{number}.multipart"
        with path.open("wb") as body:
            for file in files:
                body.write(b"--" + BOUNDARY + b"\r\nContent-Type: application/dicom\r\n\r\n")
                body.write(file.read_bytes())
                body.write(b"\r\n")
            body.write(b"--" + BOUNDARY + b"--\r\n")
        bodies.append(path)
    return bodies


def post_command(url: str, bodies: list[Path]) -> list[str]:
    """One curl process posting each body in turn; it writes each HTTP status on a line."""
    command = [CURL]
    for number, body in enumerate(bodies):
        if number:
            command.append("--next")
        command += ["-sS", "-o", "/dev/null", "-w", "%{http_code}\n", "-H",
                    f"Content-Type: {STOW_TYPE}", "--data-binary", f"@{body}", url]  # fmt: skip
    return command


class WadoLoop(threading.Thread):
    """curl fetching one study over and over until stopped."""

    def __init__(self, url: str, env: dict):
        super().__init__(name="wado-loop", daemon=True)
        self.command = [CURL, "-sS", "--fail", "-o", "/dev/null", "-H", f"Accept: {AS_STORED}",
                        "-w", "%{size_download}", url]  # fmt: skip
        self.env = env
        self.stopping = threading.Event()
        self.fetches = self.failures = self.bytes = 0

    def run(self):
        while not self.stopping.is_set():
            done = subprocess.run(self.command, env=self.env, capture_output=True, text=True)
            if done.returncode == 0:
                self.fetches += 1
                self.bytes += int(done.stdout)
            else:
                self.failures += 1

    def finish(self) -> dict:
        self.stopping.set()
        self.join()
        return {"fetches": self.fetches, "failures": self.failures, "mb": self.bytes / MB}


# -- the measurements ------------------------------------------------------------------


def measure_wado(server, corpus: Corpus, root: Path, env: dict, args, say) -> list[dict]:
    """Load the corpus into a fresh server, check one fetch, then time `repeats` fetches."""
    records = []
    server.launch(root / "server", env)
    try:
        urls = [f"{server.studies_url}/{study}" for study in sorted(files_by_study(corpus))]
        load(server, corpus.root, corpus.instances, env, root / "load.log", args.run_timeout)
        outputs = [root / f"check-{n}.multipart" for n in range(len(urls))]
        seconds, status = run_tool(
            fetch_command(urls, outputs), env, root / "check.log", args.run_timeout
        )
        parts = sum(count_parts(path) for path in outputs)
        size = sum(downloaded(root / "check.log"))
        for path in outputs:
            path.unlink()
        if status != 0 or parts != corpus.instances or size < corpus.bytes:
            raise RuntimeError(
                f"WADO-RS from {server.key}: curl status {status}, {parts} parts of "
                f"{corpus.instances}, {size} bytes for {corpus.bytes} stored (see {root})"
            )
        for rep in range(1, args.repeats + 1):
            log = root / f"fetch-r{rep}.log"
            sampler = procs.RssSampler(server.http_pid).start()
            cpu_before = sampler.cpu.sample()
            seconds, status = run_tool(
                fetch_command(urls, [Path(os.devnull)] * len(urls)), env, log, args.run_timeout
            )
            cpu = sampler.cpu.sample() - cpu_before
            peak = sampler.finish()["peak_sampled_tree_kib"]
            got = sum(downloaded(log))
            problems = [] if status == 0 and got == size else [f"curl status {status}, {got} B"]
            records.append(
                {
                    "rep": rep, "seconds": seconds, "bytes": got, "mb_per_s": got / MB / seconds,
                    "cpu_ms_per_mb": cpu * 1000 / (got / MB), "peak_rss_mb": peak * 1024 / MB,
                    "problems": problems, "ok": not problems,
                }
            )  # fmt: skip
            _say_record(say, f"{server.key} WADO-RS r{rep}", records[-1])
    finally:
        server.shutdown()
    return records


def measure_queries(quick: bool, root: Path, env: dict, snapshot, say) -> dict:
    """p50/p90 of QIDO-RS and FHIR searches by patient on the index_queries index."""
    instances, studies = INDEX_SIZE[quick]
    data_dir = index_queries.data_dir_for(instances, studies)
    if index_queries.kept_fill(data_dir, instances, studies) is None:
        say(f"filling {data_dir} with {instances:,} instances (benchmarks.index_queries)")
        index_queries.fill(data_dir, instances, studies)
    with sqlite3.connect(f"file:{data_dir / 'index.sqlite'}?mode=ro", uri=True) as db:
        counts = db.execute(
            "SELECT patient_id, count(*) FROM studies GROUP BY patient_id ORDER BY patient_id"
        ).fetchall()
    patients = counts[:: max(1, len(counts) // PATIENTS)][:PATIENTS]
    web = ImagingScpWeb(data_dir, snapshot)
    web.start(root / "web", env, root / "web.log")
    result = {"index": {"instances": instances, "studies": studies, "data_dir": str(data_dir)}}
    try:
        connection = http.client.HTTPConnection("127.0.0.1", web.port, timeout=60)
        for name, path, found in (
            ("qido", "/dicomweb/studies?PatientID={}", len),
            ("fhir", "/fhir/r4/ImagingStudy?patient:identifier={}", lambda b: b["total"]),
        ):
            timings, problems = [], []
            for round_ in range(ROUNDS[quick] + 1):  # the first warms up, untimed
                for patient, expected in patients:
                    started = time.perf_counter()
                    connection.request("GET", path.format(patient))
                    answer = connection.getresponse()
                    body = answer.read()
                    elapsed = time.perf_counter() - started
                    if round_:
                        timings.append(elapsed * 1000)
                    elif answer.status != 200 or found(json.loads(body)) != expected:
                        problems.append(f"{path.format(patient)}: {answer.status} {body[:200]!r}")
            timings.sort()
            result[name] = {
                "requests": len(timings), "patients": len(patients),
                "p50_ms": statistics.median(timings),
                "p90_ms": timings[int(0.9 * len(timings))], "max_ms": timings[-1],
                "problems": problems, "ok": not problems,
            }  # fmt: skip
            say(
                f"   {name}: p50 {result[name]['p50_ms']:.2f} ms, p90 {result[name]['p90_ms']:.2f}"
                f" ms over {len(timings)} requests{'' if not problems else ' FAILED: '}"
                + "; ".join(problems[:3])
            )
        connection.close()
    finally:
        web.stop()
    return result


def measure_stow(server, bodies: list[Path], corpus: Corpus, root: Path, env, args) -> dict:
    """Post the bodies to a fresh server: instances/s, the server's CPU per instance."""
    record: dict = {"problems": []}
    server.launch(root, env)
    try:
        sampler = procs.RssSampler(server.http_pid).start()
        cpu_before = sampler.cpu.sample()
        seconds, status = run_tool(
            post_command(server.studies_url, bodies), env, root / "stow.log", args.run_timeout
        )
        cpu = sampler.cpu.sample() - cpu_before
        sampler.finish()
        answers = (root / "stow.log").read_text(errors="replace").split()
        if status != 0 or answers != ["200"] * len(bodies):
            record["problems"].append(f"curl status {status}, answers {answers[:5]}")
        record["problems"] += server.verify(corpus.instances)
    finally:
        server.shutdown()
    record.update(
        seconds=seconds, instances_per_s=corpus.instances / seconds,
        cpu_ms_per_instance=cpu * 1000 / corpus.instances, ok=not record["problems"],
    )  # fmt: skip
    return record


def measure_ingest(
    flags, snapshot, small: Corpus, ct: Corpus, loop: bool, root: Path, env, args
) -> dict:
    """storescu sends the small corpus to a listener holding a quarter of the ct corpus,
    with (loop) or without curl fetching that quarter's study from the web meanwhile."""
    record: dict = {"problems": []}
    server = ImagingScpWithWeb(flags, snapshot)
    server.launch(root, env)
    preload = ct.parts[0]
    preloaded = sum(1 for _ in preload.rglob("*.dcm"))
    try:
        load(server, preload, preloaded, env, root / "preload.log", args.run_timeout)
        (study,) = {
            s for s, files in files_by_study(ct).items() if files[0].is_relative_to(preload)
        }
        wado = WadoLoop(f"{server.studies_url}/{study}", env) if loop else None
        if wado:
            wado.start()
        command = [DCMTK_STORESCU, "+sd", "+r", "-aec", server.aet, "127.0.0.1",
                   str(server.port), str(small.root)]  # fmt: skip
        seconds, status = run_tool(command, env, root / "ingest.log", args.run_timeout)
        if wado:
            record["wado_loop"] = wado.finish()
            if not record["wado_loop"]["fetches"] or record["wado_loop"]["failures"]:
                record["problems"].append(f"WADO-RS loop: {record['wado_loop']}")
        if status != 0:
            record["problems"].append(f"storescu exited with status {status}")
        record["problems"] += server.verify(preloaded + small.instances)
    finally:
        server.shutdown()
    record.update(
        seconds=seconds, instances_per_s=small.instances / seconds, ok=not record["problems"]
    )
    return record


# -- the run ---------------------------------------------------------------------------------


def run(args, work: Path, say) -> int:
    """The web mode of benchmarks.run: its --quick, --repeats, --run-timeout,
    --results-dir, --imaging-scp-flags (of the listener), --live-code, --keep-data
    and --note. The corpora are always small and ct."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    root = work / "web" / stamp
    env = dict(os.environ, TCP_NODELAY="1")
    specs = QUICK_SPECS if args.quick else FULL_SPECS
    small = ensure_corpus("small", specs["small"], work, say)
    ct = ensure_corpus("ct", specs["ct"], work, say)
    flags = list(args.imaging_scp_flags)
    snapshot = None
    if not args.live_code:
        pinned = ImagingScp()
        pinned.pin(root / "snapshot")
        snapshot = pinned.snapshot
    ours, theirs = ImagingScpWithWeb(flags, snapshot), OrthancDicomWeb()
    for server in (ours, theirs):
        reason = server.unavailable() or (None if Path(CURL).exists() else "curl is missing")
        if reason:
            say(f"cannot run the web benchmark: {reason}")
            return 2
    document: dict = {
        "started_at": stamp, "quick": args.quick, "note": args.note, "repeats": args.repeats,
        "statistic": "median of successful runs", "imaging_scp_flags": flags,
        "versions": {"imaging-scp": ours.version(), "orthanc": theirs.version(),
                     "curl": first_line([CURL, "--version"])},
        "corpora": {"small": small.to_json(), "ct": ct.to_json()},
    }  # fmt: skip

    say(f"\n== WADO-RS: every study of {ct.spec.name} ({ct.spec.describe()})")
    wado = {
        server.key: measure_wado(server, ct, root / "wado" / server.key, env, args, say)
        for server in (ours, theirs)
    }
    say(f"\n== QIDO-RS and FHIR search by patient, index of {INDEX_SIZE[args.quick][0]:,}")
    queries = measure_queries(args.quick, root / "queries", env, snapshot, say)

    say(f"\n== STOW-RS: {small.spec.name} ({small.spec.describe()}), one body per study")
    bodies = write_stow_bodies(small, root / "stow-bodies")
    stow: dict[str, list[dict]] = {}
    for rep in range(1, args.repeats + 1):
        for server in (ImagingScpWithWeb(flags, snapshot), OrthancDicomWeb()):
            record = measure_stow(server, bodies, small, root / "stow" / f"{server.key}-r{rep}",
                                  env, args)  # fmt: skip
            stow.setdefault(server.key, []).append(record)
            _say_record(say, f"{server.key} STOW-RS r{rep}", record)

    say(f"\n== DICOM ingest of {small.spec.name}, alone and beside a WADO-RS loop")
    ingest: dict[str, list[dict]] = {}
    for rep in range(1, args.repeats + 1):
        for name, loop in (("alone", False), ("beside WADO-RS", True)):
            where = root / "ingest" / f"{'loop' if loop else 'alone'}-r{rep}"
            record = measure_ingest(flags, snapshot, small, ct, loop, where, env, args)
            ingest.setdefault(name, []).append(record)
            _say_record(say, f"ingest {name} r{rep}", record)

    figures = {
        "wado": {key: _medians(runs, "mb_per_s", "cpu_ms_per_mb", "peak_rss_mb")
                 for key, runs in wado.items()},
        "queries": queries,
        "stow": {key: _medians(runs, "instances_per_s", "cpu_ms_per_instance")
                 for key, runs in stow.items()},
        "ingest": {key: _medians(runs, "instances_per_s") for key, runs in ingest.items()},
    }  # fmt: skip
    targets = _targets(figures)
    text = _targets_text(targets, figures)
    say("\n" + text)
    document.update(
        runs={"wado": wado, "stow": stow, "ingest": ingest}, figures=figures, targets=targets,
        table=text,
    )  # fmt: skip
    write_results(args, f"web-{stamp}.json", document, root, say)
    every = [r for runs in (*wado.values(), *stow.values(), *ingest.values()) for r in runs]
    ok = all(r["ok"] for r in every) and queries["qido"]["ok"] and queries["fhir"]["ok"]
    return 0 if ok else 1


def _medians(runs: list[dict], *keys: str) -> dict:
    ok = [r for r in runs if r["ok"]]
    figures = {key: statistics.median(r[key] for r in ok) if ok else None for key in keys}
    return {**figures, "ok_runs": len(ok), "runs": len(runs)}


def _ratio(mine, theirs):
    return mine / theirs if mine and theirs else None


def _targets(figures: dict) -> list[dict]:
    wado, stow, ingest = figures["wado"], figures["stow"], figures["ingest"]
    rows = [
        ("WADO-RS MB/s, x Orthanc", ">=", TARGETS["wado"],
         _ratio(wado["imaging-scp"]["mb_per_s"], wado["orthanc"]["mb_per_s"])),
        ("QIDO-RS studies?PatientID p50 ms", "<=", TARGETS["qido_p50_ms"],
         figures["queries"]["qido"]["p50_ms"]),
        ("FHIR ImagingStudy?patient:identifier p50 ms", "<=", TARGETS["fhir_p50_ms"],
         figures["queries"]["fhir"]["p50_ms"]),
        ("STOW-RS instances/s, x Orthanc", ">=", TARGETS["stow"],
         _ratio(stow["imaging-scp"]["instances_per_s"], stow["orthanc"]["instances_per_s"])),
        ("ingest beside WADO-RS, x alone", ">=", TARGETS["ingest"],
         _ratio(ingest["beside WADO-RS"]["instances_per_s"], ingest["alone"]["instances_per_s"])),
    ]  # fmt: skip
    return [
        {
            "target": name, "bound": f"{sign} {bound}", "value": value,
            "pass": None if value is None else (value >= bound if sign == ">=" else value <= bound),
        }
        for name, sign, bound, value in rows
    ]  # fmt: skip


def _targets_text(targets: list[dict], figures: dict) -> str:
    wado, stow, ingest = figures["wado"], figures["stow"], figures["ingest"]
    lines = ["Figures (median of the successful runs):"]
    for key, cell in wado.items():
        lines.append(
            f"  WADO-RS {key}: {_shown(cell['mb_per_s'], '{:.1f}')} MB/s, server CPU "
            f"{_shown(cell['cpu_ms_per_mb'], '{:.2f}')} ms/MB, peak RSS "
            f"{_shown(cell['peak_rss_mb'], '{:.1f}')} MB (n {cell['ok_runs']}/{cell['runs']})"
        )
    for key, cell in stow.items():
        lines.append(
            f"  STOW-RS {key}: {_shown(cell['instances_per_s'], '{:.1f}')} inst/s, server CPU "
            f"{_shown(cell['cpu_ms_per_instance'], '{:.3f}')} ms/inst (n {cell['ok_runs']}/"
            f"{cell['runs']})"
        )
    for key, cell in ingest.items():
        lines.append(
            f"  DICOM ingest {key}: {_shown(cell['instances_per_s'], '{:.1f}')} inst/s "
            f"(n {cell['ok_runs']}/{cell['runs']})"
        )
    lines.append("Targets (imaging-scp):")
    for row in targets:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[row["pass"]]
        lines.append(f"  {mark}  {row['target']}: {_shown(row['value'], '{:.2f}')}"
                     f" (target {row['bound']})")  # fmt: skip
    return "\n".join(lines)


def _shown(value, shape: str) -> str:
    return "-" if value is None else shape.format(value)


def _say_record(say, what: str, record: dict) -> None:
    figures = ", ".join(
        f"{key} {record[key]:.2f}"
        for key in ("seconds", "mb_per_s", "cpu_ms_per_mb", "instances_per_s",
                    "cpu_ms_per_instance")
        if key in record
    )  # fmt: skip
    say(f"   {what}: {figures}" + ("" if record["ok"] else f"  FAILED: {record['problems']}"))
