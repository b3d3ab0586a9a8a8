"""Which of our files one C-STORE runs through, from `accept()` to its committed row.

    python -m benchmarks.path_files

Starts a real `imaging-scp serve` (SQLite index, one worker) whose threads are
profiled, sends it one small CT instance over one association with dcmtk's
storescu, stops it, and prints the files of `scp/` and `storage/` whose code
ran in the association's thread (the thread the listener starts for the
accepted connection, which serves it to the end), with their lengths:

- **to the response**: from the accepted connection to the C-STORE-RSP going
  out (the second send of the association, after the A-ASSOCIATE-AC): the
  negotiation the C-STORE rides on, its command, its dataset, the file, the
  committed row, and the response that says so. Issue 30's "at most 8 files"
  is this count.
- **whole association**: the same, through the release and the association's
  end (the series' marks, the end's log).
- **call chain**: the files on the thread's stack at the three moments a
  reader follows one C-STORE through: the fsync of its file, the COMMIT of its
  row, and the send of its C-STORE-RSP; the helpers they call on the way
  (a UID check, a date parser, the element walk's byte work) are left out.

Code that runs at import or at startup is not counted, nor other threads'
(the accept loop's watchdog, the index's deadline ticks).
"""

import atexit
import json
import runpy
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_OURS = tuple(str(ROOT / package) + "/" for package in ("scp", "storage"))
_TRACE_FLAG = "--traced-server"


@dataclass(frozen=True)
class PathFiles:
    to_response: list[str]  # relative to the repository, in the order first run
    whole_association: list[str]
    call_chain: list[str]

    @staticmethod
    def lines(files: list[str]) -> int:
        return sum(len((ROOT / name).read_text().splitlines()) for name in files)


def measure(work_dir: Path) -> PathFiles:
    """One C-STORE into a traced `imaging-scp serve` with its data under `work_dir`."""
    from pydicom.data import get_testdata_file

    from tests.conftest import STORESCU, start_server

    trace = work_dir / "trace.json"
    server = start_server(
        work_dir / "data",
        "--workers",
        "1",
        launcher=(sys.executable, __file__, _TRACE_FLAG, str(trace)),
        index_url="",
    )
    try:
        subprocess.run(
            [STORESCU, "-aec", "IMAGING_SCP", "127.0.0.1", str(server.port)]
            + [get_testdata_file("CT_small.dcm")],
            check=True,
            capture_output=True,
            timeout=60,
        )
        server.wait_for_event("association.end")
    finally:
        server.stop()
    threads = json.loads(trace.read_text())
    # The association's thread is the one that sent on a connection.
    (association,) = [thread for thread in threads if thread["sends"]]
    to_response = [name for name, sends_before in association["files"] if sends_before < 2]
    return PathFiles(to_response, [name for name, _ in association["files"]], association["chain"])


def _run_traced(trace: Path, argv: list[str]) -> None:
    """Run the command `argv` (a console script) in this process, recording in
    each thread it starts which of our files run, in order, and how many
    sends the thread had made when each first ran; written to `trace` at exit."""
    threads: dict[int, dict] = {}

    def record_of() -> dict:
        return threads.setdefault(threading.get_ident(), {"files": {}, "sends": 0, "chain": {}})

    def on_stack(frame) -> None:
        """Note the files of ours on the stack (before the response is sent)."""
        record = record_of()
        if record["sends"] >= 2:
            return
        while frame is not None:
            filename = frame.f_code.co_filename
            if filename.startswith(_OURS):
                record["chain"].setdefault(str(Path(filename).relative_to(ROOT)), None)
            frame = frame.f_back

    def profile(frame, event, arg):
        if event == "call":
            filename = frame.f_code.co_filename
            if filename.startswith(_OURS):
                record = record_of()
                record["files"].setdefault(str(Path(filename).relative_to(ROOT)), record["sends"])
                if frame.f_locals.get("sql") == "COMMIT":
                    on_stack(frame)
        elif event == "c_call":
            name = getattr(arg, "__name__", "")
            if name == "sendall":
                if record_of()["sends"] == 1:  # the C-STORE-RSP, after the A-ASSOCIATE-AC
                    on_stack(frame)
                record_of()["sends"] += 1
            elif name in ("fsync", "commit"):  # sqlite3's COMMIT, called by the writer
                on_stack(frame)

    def write_trace():
        threading.setprofile(None)
        records = [
            {
                "files": list(record["files"].items()),
                "sends": record["sends"],
                "chain": list(record["chain"]),
            }
            for record in list(threads.values())
        ]
        trace.write_text(json.dumps(records))

    atexit.register(write_trace)
    threading.setprofile(profile)
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == _TRACE_FLAG:
        _run_traced(Path(sys.argv[2]), sys.argv[3:])
        return
    with tempfile.TemporaryDirectory() as work_dir:
        found = measure(Path(work_dir))
    for title, files in (
        ("to the response", found.to_response),
        ("whole association", found.whole_association),
        ("call chain", found.call_chain),
    ):
        scp_side = [name for name in files if name.startswith("scp/")]
        print(
            f"{title}: {len(files)} files, {PathFiles.lines(files)} lines"
            f" (scp/: {len(scp_side)} files, {PathFiles.lines(scp_side)} lines)"
        )
        for name in sorted(files):
            print(f"  {name} ({PathFiles.lines([name])})")


if __name__ == "__main__":
    main()
