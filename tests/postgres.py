"""A private PostgreSQL cluster for the tests: initdb in a temp dir, pg_ctl on a
free loopback port, removed at the end. PostgreSQL refuses to run as root, so
under root it runs as an unprivileged user (postgres, else nobody)."""

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port

USER = "imaging"


def find_binaries() -> Path | None:
    """The directory of initdb/pg_ctl: Debian keeps them out of PATH."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    if shutil.which("pg_ctl"):
        candidates.insert(0, Path(shutil.which("pg_ctl")).resolve().parent)
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


def _run_as() -> list[str]:
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return ["runuser", "-u", name, "--"]
    raise RuntimeError("running as root and no unprivileged user to run PostgreSQL as")


@dataclass
class Cluster:
    binaries: Path
    root: Path
    port: int
    run_as: list[str]
    _numbers = itertools.count(1)

    @classmethod
    def start(cls, binaries: Path) -> "Cluster":
        root = Path(tempfile.mkdtemp(prefix="imaging-scp-pg-"))
        run_as = _run_as()
        if run_as:
            shutil.chown(root, user=run_as[2])
        cluster = cls(binaries, root, free_port(), run_as)
        data = root / "data"
        subprocess.run(
            [*run_as, str(binaries / "initdb"), "-D", str(data), "-U", USER,
             "--auth=trust", "--no-locale", "--encoding=UTF8"],
            check=True, capture_output=True,
        )  # fmt: skip
        cluster.start_server()
        return cluster

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.run_as, str(self.binaries / "pg_ctl"), "-D", str(self.root / "data"),
             "-l", str(self.root / "log"), "-w", *args],
            check=True, capture_output=True,
        )  # fmt: skip

    def start_server(self) -> None:
        self._pg_ctl(
            "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
            " -c max_connections=400", "start",
        )  # fmt: skip

    def stop_server(self) -> None:
        """As an admin stops it for maintenance: sessions ended, nothing lost."""
        self._pg_ctl("-m", "fast", "stop")

    def restart(self) -> None:
        """`pg_ctl restart`: every session ended, the server back at once."""
        self._pg_ctl("-m", "fast", "restart")

    def server_pids(self) -> list[int]:
        """The postmaster, then its children (backends, background workers)."""
        postmaster = int((self.root / "data" / "postmaster.pid").read_text().split()[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            if int(fields[1]) == postmaster:
                children.append(int(stat.parent.name))
        return [postmaster, *children]

    def freeze(self) -> None:
        """SIGSTOP to every process of the server: a hung host, as the network sees it."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, number: int) -> None:
        for pid in self.server_pids():
            with contextlib.suppress(ProcessLookupError):  # a backend that ended since
                os.kill(pid, number)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def socket_url(self, database: str) -> str:
        """The same database over the cluster's Unix socket."""
        return f"postgresql://{USER}@/{database}?host={self.root}&port={self.port}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        name = f"index_{os.getpid()}_{next(self._numbers)}"
        self.admin(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(
            [*self.run_as, str(self.binaries / "pg_ctl"), "-D", str(self.root / "data"),
             "-m", "immediate", "stop"],
            capture_output=True,
        )  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)
