"""The receivers under test, each started fresh on loopback for every measurement.

Each receiver knows how to start itself in an empty output directory, when it is
ready, how many instances it holds (for progress and for the check after a cell),
how to stop, and how to summarise its log.
"""

import collections
import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path

from benchmarks import procs

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DCMTK_STORESCP = "/usr/bin/storescp"
DCMTK_STORESCU = "/usr/bin/storescu"  # not the venv's: pynetdicom installs its own `storescu`
ORTHANC_CANDIDATES = ["/usr/sbin/Orthanc", "/usr/bin/Orthanc"]

START_TIMEOUT = 60.0
PACKAGES = ("scp", "storage")  # imaging-scp's packages, as pyproject.toml lists them


def first_line(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (result.stdout or result.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def _count_files(root: Path, suffix: str | None = None, skip: tuple[str, ...] = ()) -> int:
    count = 0
    for _directory, subdirs, names in os.walk(root):
        if skip:
            subdirs[:] = [d for d in subdirs if d not in skip]
        count += sum(1 for n in names if suffix is None or n.endswith(suffix))
    return count


class Receiver:
    key = ""
    aet = ""
    install_hint = ""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.out_dir: Path | None = None
        self.log_path: Path | None = None
        self._log_handle = None

    # -- to override -------------------------------------------------------------------
    def unavailable(self) -> str | None:
        """None if the receiver can run here, else why not."""
        return None

    def version(self) -> str:
        return "unknown"

    def command(self) -> list[str]:
        raise NotImplementedError

    def code_fingerprint(self) -> str | None:
        """What code this run executes, when it can change between runs (imaging-scp)."""
        return None

    def prepare(self) -> None:
        """Write configuration into self.out_dir before start."""

    def ready(self) -> bool:
        return procs.is_listening(self.port)

    def received(self) -> int:
        raise NotImplementedError

    def verify(self, expected: int) -> list[str]:
        """Problems found after a cell (empty: the receiver holds every instance)."""
        count = self.received()
        if count != expected:
            return [f"{count} instances stored, expected {expected}"]
        return []

    def log_summary(self) -> dict:
        """Counts of warning/error lines in the receiver's output."""
        counts = collections.Counter()
        lines = []
        for line in self._log_lines():
            kind = self._classify(line)
            if kind:
                counts[kind] += 1
                if len(lines) < 5:
                    lines.append(line[:300])
        return {"warnings": counts["warning"], "errors": counts["error"], "examples": lines}

    def _classify(self, line: str) -> str | None:
        if line.startswith(("E:", "F:")) or " ERROR" in line:
            return "error"
        if line.startswith("W:") or " WARNING" in line:
            return "warning"
        return None

    # -- common ------------------------------------------------------------------------
    def start(self, out_dir: Path, env: dict, log_path: Path, port: int | None = None) -> None:
        """Start in `out_dir` (created), on `port` or a free one."""
        self.out_dir = out_dir
        self.log_path = log_path
        out_dir.mkdir(parents=True)
        self.port = port or procs.free_port()
        self.prepare()
        self._log_handle = log_path.open("wb")
        self.process = subprocess.Popen(
            self.command(),
            cwd=out_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole
        )
        procs.wait_until(self.ready, START_TIMEOUT, self.process, self.key)

    def stop(self) -> int | None:
        status = None
        if self.process is not None:
            status = procs.stop_group(self.process)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return status

    def _log_lines(self):
        if self.log_path is None or not self.log_path.exists():
            return
        with self.log_path.open(errors="replace") as handle:
            for line in handle:
                yield line.rstrip("\n")


class ImagingScp(Receiver):
    """imaging-scp as `serve` runs it: the console script, a fresh data directory."""

    key = "imaging-scp"
    aet = "IMAGING_SCP"
    install_hint = "make serve (or: python -m venv .venv && .venv/bin/pip install -e .)"

    def __init__(self):
        super().__init__()
        self.script = VENV_BIN / "imaging-scp"
        self.snapshot: Path | None = None
        self.flags: list[str] = []  # extra arguments of `imaging-scp serve`

    def pin(self, snapshot: Path) -> None:
        """Run every measurement on a copy of the code as it is now.

        The package is installed editable, so each fresh process would import the
        working tree as it is at that moment; people editing it during a long run
        would mix versions. The console script still runs (same entry point), but
        PYTHONPATH puts the snapshot's `scp` and `storage` before the editable finder.
        """
        if snapshot.exists():
            shutil.rmtree(snapshot)
        snapshot.mkdir(parents=True)
        for package in PACKAGES:
            shutil.copytree(
                REPO / package, snapshot / package, ignore=shutil.ignore_patterns("__pycache__")
            )
        # Check that a process started the way start() does imports the snapshot.
        env = dict(os.environ, PYTHONPATH=str(snapshot))
        probe = subprocess.run(
            [sys.executable, "-c", "import scp, storage; print(scp.__file__, storage.__file__)"],
            cwd=snapshot.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if probe.returncode or any(
            not Path(f).resolve().is_relative_to(snapshot.resolve()) for f in probe.stdout.split()
        ):
            raise RuntimeError(f"snapshot not importable as expected: {probe.stdout}{probe.stderr}")
        self.snapshot = snapshot

    def unavailable(self):
        if not self.script.exists():
            return f"{self.script} not found; install it with: {self.install_hint}"
        return None

    def version(self):
        from importlib.metadata import version

        commit = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return f"imaging-scp {version('imaging-scp')} ({commit}{', modified' if dirty else ''})"

    def code_fingerprint(self):
        """A hash of the code a run executes (the snapshot, or the live working tree)."""
        root = self.snapshot or REPO
        digest = hashlib.sha256()
        paths = sorted(p for package in PACKAGES for p in (root / package).rglob("*.py"))
        for path in paths:
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            with contextlib.suppress(OSError):
                digest.update(path.read_bytes())
        where = "snapshot" if self.snapshot else "live tree"
        return f"src:{digest.hexdigest()[:12]} ({where})"

    def start(self, out_dir, env, log_path, port=None):
        if self.snapshot is not None:
            env = dict(env)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(self.snapshot), *filter(None, [env.get("PYTHONPATH")])]
            )
        super().start(out_dir, env, log_path, port)

    @property
    def data_dir(self) -> Path:
        return self.out_dir / "data"

    def command(self):
        return [
            str(self.script),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            # --imaging-scp-flags "--workers 2" (run.py): benchmark a non-default setting.
            *self.flags,
        ]

    def received(self):
        if not self.data_dir.exists():
            return 0
        return _count_files(self.data_dir, ".dcm", skip=(".incoming", "conflicts"))

    def indexed(self) -> int:
        uri = f"file:{self.data_dir / 'index.sqlite'}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
            return db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]

    def verify(self, expected):
        problems = super().verify(expected)
        try:
            indexed = self.indexed()
        except sqlite3.Error as exc:
            problems.append(f"index unreadable: {exc}")
        else:
            if indexed != expected:
                problems.append(f"{indexed} rows in index table 'instances', expected {expected}")
        leftovers = _count_files(self.data_dir / ".incoming")
        if leftovers:
            problems.append(f"{leftovers} temp files left in .incoming")
        conflicts = _count_files(self.data_dir / "conflicts")
        if conflicts:
            problems.append(f"{conflicts} files kept aside under conflicts/")
        return problems

    def log_summary(self):
        """Counts of the JSON log's levels and events, the `ms` of `instance.stored`
        (time in the store path) and, when the events carry `timings` (stage name ->
        ms), each stage's median and p90 over the run's instances."""
        levels = collections.Counter()
        events = collections.Counter()
        outcomes = collections.Counter()
        stored_ms = []
        stage_ms: dict[str, list[float]] = {}  # in the order the stages first appear
        timed = 0
        examples = []
        unparsed = 0
        for line in self._log_lines():
            try:
                record = json.loads(line)
            except ValueError:
                unparsed += 1
                if len(examples) < 5:
                    examples.append(line[:300])
                continue
            if not isinstance(record, dict):
                unparsed += 1
                continue
            level = record.get("level", "?")
            levels[level] += 1
            event = record.get("event", "?")
            events[event] += 1
            if event == "instance.stored":
                outcomes[record.get("outcome", "?")] += 1
                if _is_number(record.get("ms")):
                    stored_ms.append(float(record["ms"]))
                stages = record.get("timings")
                if isinstance(stages, dict) and stages:
                    timed += 1
                    for name, value in stages.items():
                        if _is_number(value):
                            stage_ms.setdefault(str(name), []).append(float(value))
            if level in ("warning", "error", "critical") and len(examples) < 5:
                examples.append(line[:300])
        stored_ms.sort()

        return {
            "warnings": levels["warning"],
            "errors": levels["error"] + levels["critical"],
            "unparsed_lines": unparsed,
            "stored": events["instance.stored"],
            "refused": events["instance.refused"],
            "failed": events["instance.failed"],
            "outcomes": dict(outcomes),
            "handler_ms_median": _percentile(stored_ms, 0.5),
            "handler_ms_p90": _percentile(stored_ms, 0.9),
            "handler_ms_p99": _percentile(stored_ms, 0.99),
            "handler_ms_max": stored_ms[-1] if stored_ms else None,
            "timed_events": timed,
            "stages": {
                name: {
                    "median": round(statistics.median(values), 4),
                    "p90": round(_percentile(sorted(values), 0.9), 4),
                    "n": len(values),
                }
                for name, values in stage_ms.items()
            },
            "examples": examples,
        }


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _percentile(ordered: list[float], p: float) -> float | None:
    """Nearest-rank percentile of a sorted list; p = 0.5 gives `statistics.median`."""
    if not ordered:
        return None
    if p == 0.5:
        return statistics.median(ordered)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


class ImagingScpEveryCore(ImagingScp):
    """imaging-scp with one listener process per core (`--workers N`), beside the
    default one in the same run: what the `workers` default gives up or gains."""

    key = "imaging-scp-workers"

    def command(self):
        return [*super().command(), "--workers", str(os.cpu_count() or 1)]


class ImagingScpBefore(ImagingScp):
    """imaging-scp as it was at another commit ($IMAGING_SCP_BEFORE, by default
    the tree before issue 30's restructuring), beside the current one in the
    same run: an interleaved A/B of a change."""

    key = "imaging-scp-before"
    revision = os.environ.get("IMAGING_SCP_BEFORE", "c1a130d")

    def pin(self, snapshot: Path) -> None:
        """The snapshot is the revision's `scp` and `storage`, not the working tree's."""
        snapshot = snapshot.with_name(f"{snapshot.name}-before")
        if snapshot.exists():
            shutil.rmtree(snapshot)
        snapshot.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", self.revision, "scp", "storage"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(snapshot)], input=archive, check=True)
        self.snapshot = snapshot

    def version(self):
        return f"imaging-scp at {self.revision}"


class DcmtkStorescp(Receiver):
    """dcmtk's storescp: `storescp -od OUT -ss st PORT`, plus +xa (every transfer syntax)."""

    key = "storescp"
    aet = "STORESCP"
    install_hint = "apt-get install -y dcmtk"

    def unavailable(self):
        if not Path(DCMTK_STORESCP).exists():
            return (
                f"dcmtk is not installed ({DCMTK_STORESCP}); install it with: {self.install_hint}"
            )
        return None

    def version(self):
        return first_line([DCMTK_STORESCP, "--version"]).strip("$ ")

    def command(self):
        return [
            DCMTK_STORESCP,
            "+xa",
            "-od",
            str(self.out_dir / "out"),
            "-ss",
            "st",
            str(self.port),
        ]

    def prepare(self):
        (self.out_dir / "out").mkdir()

    def received(self):
        return _count_files(self.out_dir / "out")


class PynetdicomStorescp(Receiver):
    """pynetdicom's bundled app: `python -m pynetdicom storescp PORT -od OUT`."""

    key = "pynetdicom"
    aet = "STORESCP"
    install_hint = "pip install pynetdicom"

    def unavailable(self):
        try:
            import pynetdicom  # noqa: F401
        except ImportError:
            return f"pynetdicom is not importable; install it with: {self.install_hint}"
        return None

    def version(self):
        import pynetdicom

        return f"pynetdicom {pynetdicom.__version__} storescp app"

    def command(self):
        return [
            sys.executable,
            "-m",
            "pynetdicom",
            "storescp",
            str(self.port),
            "-od",
            str(self.out_dir / "out"),
        ]

    def prepare(self):
        (self.out_dir / "out").mkdir()

    def received(self):
        return _count_files(self.out_dir / "out")


class Orthanc(Receiver):
    """Orthanc with files on disk and its default SQLite index."""

    key = "orthanc"
    aet = "ORTHANC"
    install_hint = "apt-get install -y orthanc"

    def __init__(self):
        super().__init__()
        self.binary = next((p for p in ORTHANC_CANDIDATES if Path(p).exists()), None)
        self.binary = self.binary or shutil.which("Orthanc")
        self.http_port = 0

    def unavailable(self):
        if not self.binary:
            return f"Orthanc is not installed; install it with: {self.install_hint}"
        return None

    def version(self):
        return first_line([self.binary, "--version"])

    def prepare(self):
        self.http_port = procs.free_port()
        config = {
            "Name": "bench",
            "StorageDirectory": str(self.out_dir / "storage"),
            "IndexDirectory": str(self.out_dir / "index"),
            "DicomPort": self.port,
            "DicomAet": self.aet,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
        }
        (self.out_dir / "orthanc.json").write_text(json.dumps(config, indent=2))

    def command(self):
        return [self.binary, str(self.out_dir / "orthanc.json")]

    def _get(self, path: str):
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())

    def ready(self):
        if not procs.is_listening(self.port):
            return False
        try:
            self._get("/system")
        except OSError:
            return False
        return True

    def received(self):
        return int(self._get("/statistics")["CountInstances"])

    def _classify(self, line):
        # Orthanc logs its ordinary start-up narration at level W: count errors only.
        if line[:1] in "EF" and line[1:5].isdigit():
            return "error"
        return None


class Floor(Receiver):
    """benchmarks/floor.py: the least a Python receiver with our durability does."""

    key = "floor"
    aet = "FLOOR"

    def version(self):
        return "benchmarks/floor.py (python " + ".".join(map(str, sys.version_info[:3])) + ")"

    def command(self):
        return [sys.executable, str(REPO / "benchmarks" / "floor.py"), str(self.port), "out"]

    def received(self):
        return _count_files(self.out_dir / "out", ".dcm", skip=(".incoming",))


RECEIVERS = {
    cls.key: cls
    for cls in (
        ImagingScp,
        ImagingScpBefore,
        ImagingScpEveryCore,
        DcmtkStorescp,
        Orthanc,
        PynetdicomStorescp,
        Floor,
    )
}
