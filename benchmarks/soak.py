"""Soak: send many small instances to `imaging-scp serve` and watch its memory.

    python -m benchmarks.soak [--instances 100000] [--per-association 1000]
        [--results benchmarks/results/soak.json]

Each instance is generated with new UIDs (no resend shortcuts), 64x64 16-bit,
sent over loopback by a hand-spoken client in associations of `--per-association`
instances. The server's RSS is sampled before the first instance and after
every association; the report compares the RSS after the first 10 % (warm:
imports done, caches filled) with the RSS at the end (target: no more than
10 % growth) and writes benchmarks/results/soak.json (or --results).

Every C-STORE must be answered with Success. One that gets no answer (DIMSE
timeout, aborted association) is counted as unanswered, one answered with another
status as failed; after either the soak goes on with a new association, and it
stops after --max-failures of them. At the end it compares the rows of the
server's index with the instances stored. The exit status is 0 only when nothing
was unanswered or failed, the index holds every instance and growth is in target.

A C-STORE left unanswered for `--stall-after` seconds is a stall: the soak
records it and leaves py-spy dumps of both ends (server and this sender) in its
work directory, which it then keeps.
"""

import argparse
import contextlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import encode

from benchmarks import procs

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RESULTS = Path(__file__).parent / "results" / "soak.json"
PY_SPY = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def memory_mb(pid: int) -> dict[str, float]:
    """The process's resident memory (VmRSS) and its parts: anonymous (the heaps),
    file-backed (code, mapped files), shared (SQLite's WAL index)."""
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
    memory = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            memory[fields[name]] = round(int(value.split()[0]) / 1024, 1)
    return memory


def instance(study: str, series: str, number: int, pixels: bytes) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.PatientID, ds.PatientName = "CT", f"SOAK-{number // 10000}", "Soak^Test"
    ds.StudyDate, ds.InstanceNumber = "20261122", number
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixels
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


class StallWatch:
    """Watches the C-STORE in flight; dumps both ends' stacks once per stall."""

    def __init__(self, server_pid: int, work: Path, stall_after: float):
        self.server_pid, self.work, self.stall_after = server_pid, work, stall_after
        self.in_flight_since: float | None = None
        self.stalls: list[dict] = []
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        dumped_for = None
        while not self._stop.wait(1):
            since = self.in_flight_since
            if since is None or since == dumped_for or time.monotonic() - since < self.stall_after:
                continue
            dumped_for = since
            number = len(self.stalls) + 1
            dumps = {}
            for end, pid in (("server", self.server_pid), ("sender", os.getpid())):
                if PY_SPY is None:
                    break
                path = self.work / f"stall-{number}-{end}.txt"
                with path.open("w") as out:
                    subprocess.run([PY_SPY, "dump", "--pid", str(pid)], stdout=out,
                                   stderr=subprocess.STDOUT, check=False)  # fmt: skip
                dumps[end] = str(path)
            self.stalls.append({"at": round(since, 1), "dumps": dumps})
            print(
                f"stall: a C-STORE unanswered for {self.stall_after} s; dumps {dumps}", flush=True
            )

    def stop(self) -> None:
        self._stop.set()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--per-association", type=int, default=1000)
    parser.add_argument("--stall-after", type=float, default=10.0)
    parser.add_argument(
        "--max-failures",
        type=int,
        default=10,
        help="stop after this many unanswered or failed C-STOREs [10]",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="where the JSON report goes [benchmarks/results/soak.json]",
    )
    args = parser.parse_args()
    if PY_SPY is None:
        print("py-spy is not installed: stalls will be recorded without stack dumps")

    procs.wait_out_deletions()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = Path(sys.executable).parent / "imaging-scp"
    server = subprocess.Popen(
        [str(script), "serve", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(work / "data"), "--log-level", "warning"],
        stdout=(work / "serve.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    keep = False  # the work directory, to look into a failure
    try:
        procs.wait_until(lambda: procs.is_listening(port), 60, server, "imaging-scp serve")
        time.sleep(0.5)  # let start-up settle before the idle figure
        idle_rss = memory_mb(server.pid)["rss"]
        watch = StallWatch(server.pid, work, args.stall_after)
        # Spoken by hand, not by pynetdicom's requestor: its reactor thread now and
        # then takes a C-STORE-RSP for a request of the peer's and drops it
        # (pynetdicom#435); the soak saw it as an unanswered C-STORE of the server's.
        from tests.test_hostile import EXPLICIT_LE, AssociationRefused, RawAssociation

        pixels = os.urandom(64 * 64 * 2)
        samples, sent, started = [], 0, time.monotonic()
        stored, unanswered, failed, problems = 0, 0, 0, []
        study = generate_uid()
        while sent < args.instances and unanswered + failed < args.max_failures:
            if sent % 10_000 == 0:
                study = generate_uid()
            series = generate_uid()
            try:
                assoc = RawAssociation(port, [(1, CT_IMAGE_STORAGE, [EXPLICIT_LE])], calling="SOAK")
            except (AssociationRefused, OSError) as exc:
                problems.append(f"after {sent} instances: association not established: {exc}")
                print(problems[-1], flush=True)
                failed += 1
                continue
            established = True
            for _ in range(min(args.per_association, args.instances - sent)):
                dataset = instance(study, series, sent, pixels)
                data = encode(dataset, False, True)
                watch.in_flight_since = time.monotonic()
                try:
                    status = assoc.store(1, CT_IMAGE_STORAGE, dataset.SOPInstanceUID, data).status
                except (
                    AssociationRefused,
                    OSError,
                ) as exc:  # no answer, or the association is gone
                    status, error = None, f"{type(exc).__name__}: {exc}"
                    established = False
                else:
                    error = None
                watch.in_flight_since = None
                sent += 1
                if status == 0:
                    stored += 1
                    continue
                if status is None:
                    unanswered += 1
                    what = f"unanswered ({error or 'no response: timeout or abort'})"
                else:
                    failed += 1
                    what = f"status 0x{status:04X}"
                problems.append(f"instance {sent - 1}: {what}")
                print(f"{problems[-1]}; see {work}/serve.log", flush=True)
                keep = True
                if not established or unanswered + failed >= args.max_failures:
                    break
            if established:
                assoc.release()
            else:
                assoc.close()
            memory = memory_mb(server.pid)
            samples.append((sent, memory["rss"], memory["anon"], memory["file"], memory["shmem"]))
            print(f"{sent:>7} sent, server memory (MB) {memory}", flush=True)
        elapsed = time.monotonic() - started
        watch.stop()
        keep = keep or bool(watch.stalls)
        indexed = index_rows(work / "data" / "index.sqlite")
        early = next((rss for count, rss, *_ in samples if count >= args.instances // 10), None)
        end = samples[-1][1] if samples else None
        growth = round(end / early - 1, 4) if early and end else None
        report = {
            "instances": sent,
            "stored": stored,
            "unanswered": unanswered,
            "failed": failed,
            "problems": problems[:50],
            "indexed": indexed,
            "seconds": round(elapsed, 1),
            "rate": round(sent / elapsed, 1),
            "rss_idle_mb": idle_rss,
            "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
            "rss_after_10_percent_mb": early,
            "rss_end_mb": end,
            "growth": growth,
            "target_growth_max": 0.10,
            "stalls": watch.stalls,
            "samples_columns": ["instances", "rss_mb", "anon_mb", "file_mb", "shmem_mb"],
            "samples": samples,
        }
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(report, indent=2) + "\n")
        grew = growth is not None and growth <= 0.10
        complete = unanswered == 0 and failed == 0 and sent == args.instances
        verdict = "PASS" if grew and complete and indexed == stored else "FAIL"
        growth_text = f"{growth:+.1%}" if growth is not None else "?"
        print(
            f"{verdict}: {sent} instances sent, {stored} stored, {unanswered} unanswered and "
            f"{failed} failed C-STOREs (target: 0 and 0), {indexed} rows in the index\n"
            f"  RSS {early} MB after 10 % -> {end} MB at the end: {growth_text} "
            f"(target <= +10 %); idle RSS {idle_rss} MB\n"
            f"  {report['rate']} instances/s, {len(watch.stalls)} stalls; report {args.results}"
            + (f"; work directory kept: {work}" if keep else "")
        )
        return 0 if verdict == "PASS" else 1
    finally:
        server.terminate()
        server.wait(60)
        if not keep:
            procs.delete_directories([work])


def index_rows(path: Path) -> int | None:
    """Rows of the server's `instances` table (None if unreadable)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
    except sqlite3.Error:
        return None


if __name__ == "__main__":
    sys.exit(main())
