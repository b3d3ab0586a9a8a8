"""Soak: send many small instances to `imaging-scp serve` and watch its memory.

    python -m benchmarks.soak [--instances 100000] [--per-association 1000]

Each instance is generated with new UIDs (no resend shortcuts), 64x64 16-bit,
sent by pynetdicom over loopback in associations of `--per-association`
instances. The server's RSS is sampled after every association; the report
compares the RSS after the first 10 % with the RSS at the end (target: no more
than 10 % growth) and writes benchmarks/results/soak.json.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RESULTS = Path(__file__).parent / "results" / "soak.json"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--per-association", type=int, default=1000)
    args = parser.parse_args()

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
                response = assoc.send_c_store(instance(study, series, sent, pixels))
                if response.get("Status") != 0:
                    failure = f"instance {sent}: response {response!r}, see {work}/serve.log"
                    print(failure, flush=True)
                    keep = True
                    return 1
                sent += 1
            assoc.release()
            samples.append((sent, round(rss_mb(server.pid), 1)))
            print(f"{sent:>7} sent, server RSS {samples[-1][1]} MB", flush=True)
        elapsed = time.monotonic() - started
        early = next(rss for count, rss in samples if count >= args.instances // 10)
        end = samples[-1][1]
        report = {
            "instances": sent,
            "seconds": round(elapsed, 1),
            "rate": round(sent / elapsed, 1),
            "rss_after_10_percent_mb": early,
            "rss_end_mb": end,
            "growth": round(end / early - 1, 4),
            "target_growth_max": 0.10,
            "samples": samples,
        }
        RESULTS.write_text(json.dumps(report, indent=2) + "\n")
        verdict = "PASS" if report["growth"] <= 0.10 else "FAIL"
        growth = f"{report['growth']:+.1%}"
        print(f"RSS {early} MB after 10 % -> {end} MB at the end: {growth} ({verdict},")
        print(f"target <= +10 %); {report['rate']} instances/s")
        return 0 if verdict == "PASS" else 1
    finally:
        server.terminate()
        server.wait(60)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
