"""C-FIND at scale: the index of benchmarks.index_queries (1,000,000 instances,
10,000 studies) answered by a running `imaging-scp serve`.

    .venv/bin/python -m benchmarks.find_queries [--runs R]

1. dcmtk's findscu, PatientID at STUDY level, as a whole process (wall clock of
   subprocess.run; one warm-up, then the median of R runs). Target <= 100 ms.
2. The time from sending a C-FIND-RQ to the first Pending response, on an open
   association (a hand-spoken client: no SCU library's own latency in it);
   median of R. Target <= 20 ms.
3. A universal STUDY-level query streaming every study: responses per second
   (target >= 5,000/s), and the server's RSS sampled every 20 ms while it streams
   (flat: the matches come from the cursor, none are gathered).
4. C-STORE during a long C-FIND: storescu sends 300 small instances while a
   reader drains a universal query slowly (one response per 2 ms); their rate
   beside the rate with no query running. The instances are deleted afterwards,
   so the index stays the benchmark's.

The index is filled (or reused) by benchmarks.index_queries. Results: a table on
stdout and benchmarks/results/find_queries.json.
"""

import argparse
import contextlib
import datetime
import json
import platform
import shutil
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks import index_queries, procs

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
VENV_BIN = Path(sys.executable).parent
CLI = str(VENV_BIN / "imaging-scp")
FINDSCU = shutil.which("findscu") or "/usr/bin/findscu"
STORESCU = shutil.which("storescu") or "/usr/bin/storescu"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
INGEST_INSTANCES = 300
STUDY_KEYS = ["StudyInstanceUID", "PatientName", "StudyDate", "StudyDescription",
              "ModalitiesInStudy", "NumberOfStudyRelatedInstances"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(data_dir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = (index_queries.WORK / "find-serve.log").open("w")
    process = subprocess.Popen(
        [CLI, "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
         "--min-free-space", "0"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("the server did not start")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def identifier(level: str, keys: dict) -> bytes:
    from pydicom.dataset import Dataset
    from pynetdicom.dsutils import encode

    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return encode(ds, False, True)


def open_association(port: int):
    from tests.test_hostile import RawAssociation

    return RawAssociation(port, [(1, STUDY_ROOT_FIND, [EXPLICIT_LE])], calling="FINDBENCH")


def send_find(assoc, message_id: int, data: bytes) -> None:
    from tests.test_hostile import _uid, command_set, p_data

    command = command_set({
        0x0002: _uid(STUDY_ROOT_FIND),
        0x0100: struct.pack("<H", 0x0020),
        0x0110: struct.pack("<H", message_id),
        0x0700: struct.pack("<H", 0),
        0x0800: struct.pack("<H", 0x0000),
    })  # fmt: skip
    assoc.sock.sendall(p_data(1, command, command=True) + p_data(1, data, command=False))


def stream(assoc, message_id: int, data: bytes, pause: float = 0.0) -> tuple[int, float, int]:
    """(pending responses, seconds to the first, final status) of one query."""
    started = time.perf_counter()
    send_find(assoc, message_id, data)
    first = None
    pending = 0
    while True:
        status = assoc.next_response().status
        if first is None:
            first = time.perf_counter() - started
        if status not in (0xFF00, 0xFF01):
            return pending, first, status
        pending += 1
        if pause:
            time.sleep(pause)


def time_findscu(port: int, patient_id: str, runs: int) -> list[float]:
    args = [FINDSCU, "-S", "-aec", "IMAGING_SCP", "-k", "QueryRetrieveLevel=STUDY",
            "-k", f"PatientID={patient_id}"]  # fmt: skip
    for key in STUDY_KEYS:
        args += ["-k", key]
    args += ["127.0.0.1", str(port)]
    subprocess.run(args, check=True, capture_output=True)  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return times


def ingest(port: int, files: list[Path]) -> float:
    started = time.perf_counter()
    subprocess.run(
        [STORESCU, "-aet", "FINDBENCH", "-aec", "IMAGING_SCP", "127.0.0.1", str(port),
         *map(str, files)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - started


def ingest_files() -> tuple[list[Path], str]:
    sys.path.insert(0, str(REPO))
    from pydicom.uid import generate_uid

    from tests.conftest import make_instance

    directory = index_queries.WORK / "find-ingest"
    procs.delete_directories([directory])
    study_uid = generate_uid()
    series_uid = generate_uid()
    files = [
        make_instance(directory, study_uid=study_uid, series_uid=series_uid, pixels=64)
        for _ in range(INGEST_INSTANCES)
    ]
    return files, study_uid


def delete_study(data_dir: Path, study_uid: str) -> None:
    subprocess.run(
        [CLI, "delete", "--study", study_uid, "--yes", "--data-dir", str(data_dir)],
        check=True,
        capture_output=True,
    )
    procs.files_deleted()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    data_dir = index_queries.data_dir_for(1_000_000, 10_000)
    if index_queries.kept_fill(data_dir, 1_000_000, 10_000) is None:
        print(f"Filling {data_dir} (benchmarks.index_queries) ...", flush=True)
        index_queries.fill(data_dir, 1_000_000, 10_000)
    conn = sqlite3.connect(f"file:{data_dir / 'index.sqlite'}?mode=ro", uri=True)
    examples = index_queries.pick_examples(conn)
    conn.close()
    process, port = start_server(data_dir)
    results: dict = {
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "index": {"studies": examples["studies"], "instances": examples["instances"]},
        "patient_id": examples["patient_id"],
        "patient_studies": examples["patient_studies"],
    }
    try:
        findscu_times = time_findscu(port, examples["patient_id"], args.runs)
        results["findscu_patient_id_ms"] = round(statistics.median(findscu_times) * 1000, 1)

        assoc = open_association(port)
        query = identifier("STUDY", {"PatientID": examples["patient_id"],
                                     **{k: "" for k in STUDY_KEYS}})  # fmt: skip
        firsts, matches = [], 0
        for run in range(args.runs + 1):
            matches, first, status = stream(assoc, run + 1, query)
            assert status == 0x0000, f"status 0x{status:04X}"
            if run:  # the first is a warm-up
                firsts.append(first)
        results["first_pending_ms"] = round(statistics.median(firsts) * 1000, 2)
        results["patient_id_matches"] = matches

        universal = identifier("STUDY", {k: "" for k in STUDY_KEYS})
        samples: list[float] = []
        done = threading.Event()

        def sample():
            while not done.is_set():
                samples.append(rss_mb(process.pid))
                time.sleep(0.02)

        rates = []
        for run in range(3):
            sampler = threading.Thread(target=sample)
            samples.clear()
            done.clear()
            sampler.start()
            started = time.perf_counter()
            count, _, status = stream(assoc, 100 + run, universal)
            elapsed = time.perf_counter() - started
            done.set()
            sampler.join()
            assert status == 0x0000 and count == examples["studies"], (count, status)
            rates.append(count / elapsed)
        results["universal_study_responses_per_s"] = round(statistics.median(rates))
        results["rss_mb_while_streaming"] = {
            "first": round(samples[0], 1),
            "max": round(max(samples), 1),
            "last": round(samples[-1], 1),
            "samples": len(samples),
        }
        assoc.release()

        files, study_uid = ingest_files()
        alone = ingest(port, files)
        delete_study(data_dir, study_uid)
        slow = open_association(port)

        def drain_slowly():
            with contextlib.suppress(OSError):  # the socket is closed under it at the end
                stream(slow, 1, universal, 0.002)

        reader = threading.Thread(target=drain_slowly, daemon=True)
        reader.start()
        time.sleep(1.0)
        during = ingest(port, files)
        still_streaming = reader.is_alive()
        slow.close()
        reader.join(5)
        delete_study(data_dir, study_uid)
        results["ingest_during_find"] = {
            "instances": len(files),
            "alone_per_s": round(len(files) / alone, 1),
            "during_long_find_per_s": round(len(files) / during, 1),
            "find_still_streaming_at_the_end": still_streaming,
        }
    finally:
        process.terminate()
        process.wait(30)

    targets = [
        ("findscu PatientID at STUDY level, whole process <= 100 ms",
         results["findscu_patient_id_ms"] <= 100, f"{results['findscu_patient_id_ms']} ms"),
        ("first Pending after the request <= 20 ms",
         results["first_pending_ms"] <= 20, f"{results['first_pending_ms']} ms"),
        ("universal STUDY query >= 5,000 responses/s",
         results["universal_study_responses_per_s"] >= 5000,
         f"{results['universal_study_responses_per_s']:,}/s"),
        ("server RSS flat while streaming (max - first <= 5 MB)",
         results["rss_mb_while_streaming"]["max"] - results["rss_mb_while_streaming"]["first"]
         <= 5, json.dumps(results["rss_mb_while_streaming"])),
        ("C-STORE during a long C-FIND not blocked (>= 0.5x the rate alone)",
         results["ingest_during_find"]["during_long_find_per_s"]
         >= 0.5 * results["ingest_during_find"]["alone_per_s"],
         json.dumps(results["ingest_during_find"])),
    ]  # fmt: skip
    results["targets"] = [{"target": t, "pass": ok, "measured": m} for t, ok, m in targets]
    print(
        f"\nC-FIND on {examples['studies']:,} studies / {examples['instances']:,} instances"
        f" (patient {examples['patient_id']}: {examples['patient_studies']} studies)"
    )
    for target, ok, measured in targets:
        print(f"  {'PASS' if ok else 'FAIL'}  {target}: {measured}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "find_queries.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {RESULTS / 'find_queries.json'}")


if __name__ == "__main__":
    main()
