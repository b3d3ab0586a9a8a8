"""Soak: send many small instances to `imaging-scp serve` and watch its memory.

    python -m benchmarks.soak [--instances 100000] [--per-association 1000]

Each instance is generated with new UIDs (no resend shortcuts), 64x64 16-bit,
sent by pynetdicom over loopback in associations of `--per-association`
instances. The server's RSS is sampled before the first instance and after
every association; the report compares the RSS after the first 10 % (warm:
imports done, caches filled) with the RSS at the end (target: no more than
10 % growth) and writes benchmarks/results/soak.json.

A C-STORE left unanswered for `--stall-after` seconds is a stall: the soak
records it and leaves py-spy dumps of both ends (server and this sender) in its
work directory, which it then keeps.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

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
    args = parser.parse_args()
    if PY_SPY is None:
        print("py-spy is not installed: stalls will be recorded without stack dumps")

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
        time.sleep(2)
        idle_rss = memory_mb(server.pid)["rss"]
        watch = StallWatch(server.pid, work, args.stall_after)
        ae = AE("SOAK")
        ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
        pixels = os.urandom(64 * 64 * 2)
        samples, sent, started = [], 0, time.monotonic()
        study = generate_uid()
        while sent < args.instances:
            if sent % 10_000 == 0:
                study = generate_uid()
            series = generate_uid()
            assoc = ae.associate("127.0.0.1", port, ae_title="IMAGING_SCP")
            assert assoc.is_established
            for _ in range(min(args.per_association, args.instances - sent)):
                dataset = instance(study, series, sent, pixels)
                watch.in_flight_since = time.monotonic()
                response = assoc.send_c_store(dataset)
                watch.in_flight_since = None
                if response.get("Status") != 0:
                    failure = f"instance {sent}: response {response!r}, see {work}/serve.log"
                    print(failure, flush=True)
                    keep = True
                    return 1
                sent += 1
            assoc.release()
            memory = memory_mb(server.pid)
            samples.append((sent, memory["rss"], memory["anon"], memory["file"], memory["shmem"]))
            print(f"{sent:>7} sent, server memory (MB) {memory}", flush=True)
        elapsed = time.monotonic() - started
        watch.stop()
        keep = bool(watch.stalls)
        early = next(rss for count, rss, *_ in samples if count >= args.instances // 10)
        end = samples[-1][1]
        report = {
            "instances": sent,
            "seconds": round(elapsed, 1),
            "rate": round(sent / elapsed, 1),
            "rss_idle_mb": idle_rss,
            "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
            "rss_after_10_percent_mb": early,
            "rss_end_mb": end,
            "growth": round(end / early - 1, 4),
            "target_growth_max": 0.10,
            "stalls": watch.stalls,
            "samples_columns": ["instances", "rss_mb", "anon_mb", "file_mb", "shmem_mb"],
            "samples": samples,
        }
        RESULTS.write_text(json.dumps(report, indent=2) + "\n")
        verdict = "PASS" if report["growth"] <= 0.10 else "FAIL"
        growth = f"{report['growth']:+.1%}"
        print(f"RSS {early} MB after 10 % -> {end} MB at the end: {growth} ({verdict},")
        print(f"target <= +10 %); {report['rate']} instances/s; idle RSS {idle_rss} MB;")
        print(f"{len(watch.stalls)} stalls" + (f", dumps kept in {work}" if keep else ""))
        return 0 if verdict == "PASS" else 1
    finally:
        server.terminate()
        server.wait(60)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
