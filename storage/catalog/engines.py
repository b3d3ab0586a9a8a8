"""Where the index lives: SQLite in the data directory (embedded, the default) or
PostgreSQL (one index for several listener nodes), behind one small interface.

Code above this module writes SQL once, with `?` placeholders, and runs it through
`Database.execute`; the few places where the two engines differ (wildcard
matching, a JSON list as rows, schema definitions, which errors may be retried)
are methods here. Rows read back are indexable by position and by column name on
both (sqlite3.Row, `Row`).
"""

import contextlib
import errno
import fcntl
import hashlib
import itertools
import math
import os
import random
import re
import secrets
import select
import socket
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

SQLITE_FILENAME = "index.sqlite"
# Beside a SQLite file, named after it (as SQLite's -wal and -shm): what the
# processes writing it take turns on (SQLiteDatabase.writers_turn).
WRITER_LOCK_SUFFIX = "-writer"
# flock() refused by the filesystem; EBADF where it is emulated with byte-range
# locks (NFS), which want a descriptor open for writing.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF}
_CHECK_MESSAGES = 5  # the first problems SQLite's check reports: enough to name it
MAX_PARAMETERS = 900
_EXCLUDE_WRITERS_FOR = (
    60  # seconds of trying for a moment without writers  # in one statement: below SQLite's limit
)
POSTGRESQL_SCHEMES = ("postgresql", "postgres")


def utc_now() -> str:
    """Now, as the index stores moments: a sortable UTC timestamp with
    milliseconds (2026-12-01T20:41:24.123Z). Formatted by hand, the seconds
    once a second: it is taken for every instance."""
    milliseconds = time.time_ns() // 1_000_000
    seconds, fraction = divmod(milliseconds, 1000)
    global _formatted_second
    cached = _formatted_second  # one tuple, read and replaced whole: safe across threads
    if cached[0] != seconds:
        cached = _formatted_second = (
            seconds,
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)),
        )
    return f"{cached[1]}.{fraction:03d}Z"


_formatted_second: tuple[int | None, str] = (None, "")


def stored_moment(moment: datetime) -> str:
    """A moment as the index stores moments (`utc_now`'s form)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def moment_of(stored: str) -> datetime:
    """The moment a stored one (`stored_moment`'s form) says, in UTC."""
    return datetime.fromisoformat(stored)


class IndexUnreachable(Exception):
    """The index cannot be opened: no SQLite file yet, or PostgreSQL refuses."""


class SchemaTooNew(Exception):
    """The index was written by a newer imaging-scp."""


class IndexBusy(Exception):
    """Other writers left no moment to take the index's tables."""


class IndexCorrupt(Exception):
    """SQLite found the index file damaged (pages overwritten, truncated): what
    `imaging-scp rebuild` repairs from the files."""

    def __init__(self, path: Path, detail: str):
        super().__init__(
            f"the index {path} is damaged ({detail}): run `imaging-scp rebuild` with"
            " imaging-scp serve stopped; it recreates the index from the stored files and"
            " keeps the damaged file aside"
        )
        self.path = path
        self.detail = detail


# SQLite's primary result codes for a damaged file; an extended code keeps its
# primary one in the low byte.
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def is_corrupt(exc: BaseException) -> bool:
    """Whether SQLite failed because the database file is damaged ("database
    disk image is malformed", "file is not a database")."""
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.DatabaseError)
        and code is not None
        and code & 0xFF
        in (
            _SQLITE_CORRUPT,
            _SQLITE_NOTADB,
        )
    )


class IndexFailed(Exception):
    """The engine failed what was asked of the index (a full disk, an I/O
    error, a damaged file, a permission the server refused): its message, and
    what it means for whoever tells the user (`engine_failures`)."""

    def __init__(self, exc: BaseException):
        super().__init__(str(exc))
        self.kind = type(exc).__name__  # the engine's name for it, as users were shown
        self.out_of_space = is_out_of_space(exc)
        self.corrupt = is_corrupt(exc)


@contextlib.contextmanager
def engine_failures() -> Iterator[None]:
    """Around what uses the index: an error of its engine raised as IndexFailed."""
    try:
        yield
    except database_errors() as exc:
        raise IndexFailed(exc) from exc


class IndexTimedOut(Exception):
    """The index did not answer, or its write lock was not free, within the
    bound (index_timeout) of `bound` seconds; `why` says what held it."""

    def __init__(self, bound: float, why: str):
        self.comment = f"index did not answer within {bound:g} s"  # for a sender's ErrorComment
        super().__init__(f"{self.comment} ({why})")


@dataclass(frozen=True)
class IndexLocation:
    """The files of one archive and where its index is: `url` empty = the SQLite
    file in `data_dir`; ``postgresql://…`` (a libpq URL) = that database."""

    data_dir: Path
    url: str = ""

    @property
    def shared_by_nodes(self) -> bool:
        """On a PostgreSQL server that several listener nodes may share, as they
        share the data directory; else the SQLite file of this machine's data
        directory."""
        return bool(self.url)

    @property
    def sqlite_path(self) -> Path:
        return Path(self.data_dir) / SQLITE_FILENAME

    def describe(self) -> str:
        """For messages: the SQLite path, or the URL without its password."""
        return redact(self.url) if self.url else str(self.sqlite_path)

    def open(self, *, create: bool = False, timeout: float | None = None) -> "Database":
        """A connection of its own. Without `create`, a missing SQLite index is
        IndexUnreachable (the admin commands never create one). `timeout`: the
        seconds connecting, and waiting for SQLite's write lock, may take."""
        if self.url:
            return PostgresDatabase.connect(self.url, timeout=timeout)
        if not create and not self.sqlite_path.is_file():
            raise IndexUnreachable(f"no index at {self.sqlite_path}")
        return SQLiteDatabase(self.sqlite_path, timeout=timeout or 30)

    def corruption(self, exc: BaseException) -> IndexCorrupt | None:
        """`exc` (IndexFailed, or the engine's own error where a reader meets
        it) as IndexCorrupt when it says that the SQLite index is damaged."""
        corrupt = exc.corrupt if isinstance(exc, IndexFailed) else is_corrupt(exc)
        if self.url or not corrupt:
            return None
        return IndexCorrupt(self.sqlite_path, str(exc))

    def check_intact(self, *, quick: bool) -> None:
        """IndexCorrupt when SQLite's own check finds the index file damaged
        (PostgreSQL, and a SQLite index not created yet, pass). `quick`: PRAGMA
        quick_check (every page's structure and every row's format, read once)
        rather than integrity_check (also each table's indexes against its rows:
        a sort of every index, several times as long)."""
        if self.url or not self.sqlite_path.is_file():
            return
        pragma = "quick_check" if quick else "integrity_check"
        try:
            with SQLiteDatabase(self.sqlite_path) as db:
                found = [row[0] for row in db.execute(f"PRAGMA {pragma}({_CHECK_MESSAGES})")]
        except sqlite3.DatabaseError as exc:
            if is_corrupt(exc):
                raise IndexCorrupt(self.sqlite_path, str(exc)) from exc
            raise
        if found != ["ok"]:
            raise IndexCorrupt(self.sqlite_path, "; ".join(found))

    def open_reader(self, timeout: float = 30) -> "Database":
        """A read connection: for PostgreSQL, one lent by this process's pool
        (closing it gives it back) within `timeout` seconds, else IndexUnreachable."""
        if self.url:
            return PostgresDatabase.from_pool(self.url, timeout)
        return self.open()


def check_index_url(url: str) -> str | None:
    """Why `url` cannot be an index_url, or None."""
    if not url:
        return None
    scheme = urlsplit(url).scheme
    if scheme not in POSTGRESQL_SCHEMES:
        return (
            f"{redact(url)!r} is not a PostgreSQL URL: write postgresql://user@host:5432/dbname,"
            " or leave index_url empty for the SQLite index in the data directory"
        )
    return None


def redact(url: str) -> str:
    """`url` without its password (in the user part or as ?password=)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def database_errors() -> tuple[type[BaseException], ...]:
    """The exceptions an index operation may raise, for `except`: psycopg's only
    when it is loaded (the SQLite-only commands never import it)."""
    if "psycopg" in sys.modules:
        return (sqlite3.Error, sys.modules["psycopg"].Error)
    return (sqlite3.Error,)


def is_locked(exc: BaseException) -> bool:
    """SQLite's busy timeout ran out: another process holds the write lock."""
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


def is_out_of_space(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        return "full" in str(exc)
    return getattr(exc, "sqlstate", None) == "53100"  # disk_full


# serialization_failure, deadlock_detected, unique_violation (two nodes inserted
# the same new row at once: the retry sees the other's row and takes its path)
_RETRYABLE_SQLSTATES = {"40001", "40P01", "23505"}


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed transaction may simply be run again (PostgreSQL's
    concurrency outcomes; SQLite's writers are serialised by its own lock)."""
    return getattr(exc, "sqlstate", None) in _RETRYABLE_SQLSTATES


class Database:
    """One connection, in autocommit mode: transactions are explicit (BEGIN …
    COMMIT) so that both engines behave alike."""

    remote: bool  # a server process: each statement costs a round trip
    # LIKE that ignores the case of ASCII letters (SQLite's LIKE does; PostgreSQL's
    # ILIKE ignores every letter's).
    like_ignoring_case: str

    def execute(self, sql: str, params=()):
        raise NotImplementedError

    def executemany(self, sql: str, rows) -> None:
        raise NotImplementedError

    def rows_in(self, sql: str, values: list) -> Iterator:
        """The rows of `sql`, whose one `IN (?)` takes all of `values`: a batch of
        them per statement, below SQLite's limit on the parameters of one."""
        for start in range(0, len(values), MAX_PARAMETERS):
            chunk = values[start : start + MAX_PARAMETERS]
            yield from self.execute(
                sql.replace("IN (?)", f"IN ({','.join('?' * len(chunk))})"), chunk
            )

    def stream(self, sql: str, params=()) -> Iterator:
        """The rows of a query as they come, for results of any size (an export,
        a universal C-FIND): memory bounded, the first row without waiting for
        the last. Other statements may run on the connection meanwhile."""
        yield from self.execute(sql, params)  # SQLite steps its cursor row by row

    @property
    def in_transaction(self) -> bool:
        raise NotImplementedError

    def prepare_writer(self) -> None:
        """Settings of the connection that writes the index: a committed
        transaction survives a power cut, which is what a Success status promises."""
        raise NotImplementedError

    def begin(self) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        """End the transaction `begin` opened, durably (`prepare_writer`)."""
        self.execute("COMMIT")

    def take_turn(self, timeout: float | None = None) -> None:
        """Before one write transaction (`prepare_writer` first): wait while
        another process writes to this database, IndexTimedOut after `timeout`
        seconds; `end_turn` after it. PostgreSQL needs nothing here: its
        transactions wait for each other's locks on the server."""

    def end_turn(self) -> None:
        pass

    @contextlib.contextmanager
    def writers_turn(self, timeout: float | None = None) -> Iterator[None]:
        """`take_turn` … `end_turn` around one write transaction."""
        self.take_turn(timeout)
        try:
            yield
        finally:
            self.end_turn()

    @property
    def broken(self) -> bool:
        """The connection is lost (the server went away, or `interrupt` cut it):
        `reopen` before using it again."""
        return False

    def closed_by_server(self) -> bool:
        """Between transactions: whether the server has ended the session (a
        restart) — known without a round trip, before anything is sent."""
        return False

    def interrupt(self) -> bool:
        """From another thread: make what this connection waits for fail now.
        False when there was nothing to cut."""
        return False

    def reopen(self, timeout: float) -> None:
        """A new connection in place of a lost one, as this object: whoever holds
        it uses the new one. The lost one's transaction has ended on the server
        when this returns (committed or not: read back what it wrote)."""

    def lock_keys(self, keys: list[str]) -> None:
        """Inside a transaction: hold a lock per key until it ends, taken in one
        order by every writer so that no two wait for each other."""

    def corruption(self, exc: BaseException) -> IndexCorrupt | None:
        """`exc` as IndexCorrupt when it says that this (SQLite) database's file
        is damaged."""
        return None

    def exclude_writers(self, tables: list[str]) -> None:
        """Inside a transaction: no other connection writes `tables` until it
        ends (readers go on). SQLite's write transaction excludes every other
        writer already."""

    def lock_schema(self) -> None:
        """Inside a transaction: one node at a time creates or upgrades the schema."""
        self.lock_keys(["imaging-scp schema"])

    def first_rows(self, statements: list[tuple[str, tuple]]) -> list:
        """Run statements in order; the first row of each (None: no row). On
        PostgreSQL they go to the server together (pipeline mode: one round trip)."""
        return [self.execute(sql, params).fetchone() for sql, params in statements]

    def another(self) -> "Database":
        """A new connection to the same database."""
        raise NotImplementedError

    def insert_rows(self, table: str, columns: list[str], rows) -> int:
        """Insert many rows (tuples in `columns` order); returns how many."""
        count = 0
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        batch = []
        for row in rows:
            batch.append(tuple(row))
            if len(batch) == 1000:
                self.executemany(sql, batch)
                count, batch = count + len(batch), []
        if batch:
            self.executemany(sql, batch)
        return count + len(batch)

    def reset_identity(self, table: str, column: str) -> None:
        """After rows were copied in with their own ids: new rows get higher ones."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def wildcard(self, column: str, pattern: str) -> tuple[str, str]:
        """(condition, parameter) matching `column` against a DICOM wildcard
        pattern, case-sensitive: `*` any run of characters, `?` one character.
        (Case-insensitive names are matched folded: storage.names.)"""
        escaped = re.sub(r"([%_\\])", r"\\\1", pattern).replace("*", "%").replace("?", "_")
        return f"{column} LIKE ? ESCAPE '\\'", escaped

    def json_array_of_distinct(self, column: str) -> str:
        """An aggregate: the distinct non-NULL values of `column` as a JSON array
        of strings (in no particular order), '[]' when there is none."""
        raise NotImplementedError

    def json_elements(self, column: str) -> str:
        """A FROM item: the elements of a JSON array of strings in `column`, as
        rows with one column `value`."""
        raise NotImplementedError

    # --- schema ---------------------------------------------------------------

    def ensure_table(self, name: str, columns: dict[str, type], pk) -> None:
        """Create the table if missing; add the columns an older schema lacks."""
        raise NotImplementedError

    def ensure_index(self, table: str, columns: list[str]) -> None:
        name = f"idx_{table}_{'_'.join(columns)}"
        self.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({', '.join(columns)})")

    def schema_version(self) -> int:
        raise NotImplementedError

    def set_schema_version(self, version: int) -> None:
        raise NotImplementedError


class SQLiteDatabase(Database):
    remote = False
    like_ignoring_case = "LIKE"

    def __init__(self, path: Path, timeout: float = 30, *, read_only: bool = False):
        self.path = Path(path)
        self.timeout = timeout  # SQLite's busy timeout: waiting for its write lock
        target = f"{self.path.absolute().as_uri()}?mode=ro" if read_only else self.path
        self.conn = sqlite3.connect(
            target, check_same_thread=False, isolation_level=None, timeout=timeout, uri=read_only
        )
        self.conn.row_factory = sqlite3.Row
        # The driver's own COMMIT, called by the writer for every transaction:
        # no cursor made for it, nothing of ours between.
        self.commit = self.conn.commit
        self._writer_lock: int | None = None  # a descriptor of its WRITER_LOCK_SUFFIX file
        # Waits for another process's turn (only then: a free lock is taken at
        # once), in a thread of its own so that the wait can be given up.
        self._turn_waiter: ThreadPoolExecutor | None = None
        self._given_up: Future | None = None  # a wait given up, still in the kernel
        self._turns = threading.Lock()

    def execute(self, sql: str, params=()):
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows) -> None:
        self.conn.executemany(sql, rows)

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def prepare_writer(self) -> None:
        self.execute("PRAGMA journal_mode=WAL")
        self.execute("PRAGMA synchronous=FULL")
        # Read-only is enough for flock(): an admin who may write the index may
        # take its turn even where the service created this file. Opened per
        # connection, after the workers' fork (a descriptor inherited across
        # fork() would share its lock with the parent's).
        lock = os.open(f"{self.path}{WRITER_LOCK_SUFFIX}", os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(lock, fcntl.LOCK_UN)
        except BlockingIOError:  # another process's turn: flock() works here
            pass
        except OSError as exc:
            os.close(lock)
            if exc.errno not in _NO_FLOCK:
                raise
            return  # a filesystem without flock(): SQLite's busy handler alone
        self._writer_lock = lock

    def take_turn(self, timeout: float | None = None) -> None:
        # SQLite alone makes a second process's BEGIN IMMEDIATE fail with
        # SQLITE_BUSY and its busy handler sleep 1, 2, 5, 10 … ms before trying
        # again: with `workers` > 1, most of an instance's wait for the index.
        # The kernel wakes a writer waiting in flock() the moment the lock is
        # free, so a process meets SQLite's write lock only when it is free.
        # The wait ends after `timeout` (index_timeout): a process that holds
        # the lock for longer (an admin's long transaction, a `sqlite3` shell)
        # must not hold senders for ever.
        if self._writer_lock is None:
            return
        if timeout is None:  # an admin command: its turn comes, as before
            fcntl.flock(self._writer_lock, fcntl.LOCK_EX)
        else:
            self._take_turn(timeout)

    def end_turn(self) -> None:
        if self._writer_lock is not None:
            fcntl.flock(self._writer_lock, fcntl.LOCK_UN)

    def _take_turn(self, timeout: float) -> None:
        lock = self._writer_lock
        with self._turns:
            # While a given-up wait is still in the kernel, a non-blocking flock
            # would find this descriptor's own lock, taken by that wait and about
            # to be let go: wait behind it instead.
            if self._given_up is None or self._given_up.done():
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    pass
            if self._turn_waiter is None:
                self._turn_waiter = ThreadPoolExecutor(1, "imaging-scp-writers-turn")
            turn = _Turn()
            waited = self._turn_waiter.submit(_wait_for_turn, lock, turn)
        try:
            waited.result(timeout)
        except FutureTimeout:
            with turn.lock:
                if not turn.taken:
                    turn.given_up = True
                    self._given_up = waited
                    raise IndexTimedOut(
                        self.timeout,
                        f"another process holds the write lock of {self.path}: `fuser"
                        f" {self.path}{WRITER_LOCK_SUFFIX}` names it",
                    ) from None

    def begin(self) -> None:
        # IMMEDIATE: take the write lock now, not at the first write, so that
        # two processes never both read and then both try to write.
        self.conn.execute("BEGIN IMMEDIATE")

    def corruption(self, exc: BaseException) -> IndexCorrupt | None:
        return IndexCorrupt(self.path, str(exc)) if is_corrupt(exc) else None

    def another(self) -> "SQLiteDatabase":
        return SQLiteDatabase(self.path, self.timeout)

    def close(self) -> None:
        self.conn.close()
        if self._turn_waiter is not None:
            self._turn_waiter.shutdown(wait=False, cancel_futures=True)
        if self._writer_lock is not None:
            os.close(self._writer_lock)
            self._writer_lock = None

    # SQLite's LIKE ignores case: its GLOB is the case-sensitive match (and,
    # on a column of the default collation, a prefix is looked up in an index).
    def wildcard(self, column: str, pattern: str) -> tuple[str, str]:
        return f"{column} GLOB ?", pattern.replace("[", "[[]")

    def json_array_of_distinct(self, column: str) -> str:
        return f"json_group_array(DISTINCT {column}) FILTER (WHERE {column} IS NOT NULL)"

    def json_elements(self, column: str) -> str:
        return f"json_each({column})"

    def ensure_table(self, name: str, columns: dict[str, type], pk) -> None:
        # Imported here: the read-only admin commands never create tables, and
        # sqlite-utils costs them 0.1 s of start-up.
        import sqlite_utils

        table = sqlite_utils.Database(self.conn)[name]
        table.create(columns, pk=pk, if_not_exists=True)
        present = table.columns_dict
        for column, kind in columns.items():
            if column not in present:
                table.add_column(column, kind)

    def schema_version(self) -> int:
        return self.execute("PRAGMA user_version").fetchone()[0]

    def set_schema_version(self, version: int) -> None:
        self.execute(f"PRAGMA user_version={int(version)}")


# In the -shm file of a database in WAL mode, the byte every connection holds a
# shared lock on while it is open (SQLite's "DMS" lock: sqlite.org/walformat.html).
_WAL_INDEX_DMS_LOCK = 128


def open_in_another_process(path: Path) -> bool:
    """Whether another process has the SQLite database at `path` open (in WAL
    mode, as every imaging-scp connection): a write lock on the -shm file's DMS
    byte would conflict with its shared one."""
    try:
        shm = os.open(f"{path}-shm", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        probe = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, _WAL_INDEX_DMS_LOCK, 1, 0)
        holder = fcntl.fcntl(shm, fcntl.F_GETLK, probe)
        return struct.unpack("hhqqi", holder)[0] != fcntl.F_UNLCK
    finally:
        os.close(shm)


@dataclass
class _Turn:
    """One wait for the writer lock, as `SQLiteDatabase._take_turn` hands it over."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    taken: bool = False
    given_up: bool = False


def _wait_for_turn(lock: int, turn: _Turn) -> None:
    fcntl.flock(lock, fcntl.LOCK_EX)
    with turn.lock:
        if turn.given_up:  # its writer answered its senders already
            fcntl.flock(lock, fcntl.LOCK_UN)
        else:
            turn.taken = True


class Row:
    """A PostgreSQL row as sqlite3.Row gives one: by position or by name."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: dict[str, int], values):
        self._names = names
        self._values = values

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._values[self._names[key]]
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._names)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._names, self._values, strict=True))!r})"


def _row_factory(cursor):
    # From the result's own field names: cursor.description builds an object per
    # column, per statement, which cost ingest 0.2 ms an instance.
    result = cursor.pgresult
    fields = [result.fname(i) for i in range(result.nfields)] if result is not None else []
    names = {(name or b"").decode(): i for i, name in enumerate(fields)}
    return lambda values: Row(names, values)


def _has_rows(cursor) -> bool:
    """Whether a statement returned rows (a SELECT, a RETURNING), not a status."""
    result = cursor.pgresult
    return result is not None and result.nfields > 0


@lru_cache(maxsize=1024)
def _pyformat(sql: str) -> str:
    """`?` placeholders as psycopg's `%s` (and a literal % doubled), outside
    quoted literals."""
    return re.sub(
        r"'(?:[^']|'')*'|\?|%",
        lambda m: {"?": "%s", "%": "%%"}.get(m.group(0), m.group(0)),
        sql,
    )


_POSTGRES_TYPES = {str: 'TEXT COLLATE "C"', int: "BIGINT", float: "DOUBLE PRECISION"}
_pools: dict[tuple[int, str], object] = {}
_cursor_numbers = itertools.count(1)
_pools_lock = threading.Lock()


class PostgresDatabase(Database):
    remote = True
    like_ignoring_case = "ILIKE"

    def __init__(self, url: str, conn, pool=None, name: str = "", timeout: float | None = None):
        self.url = url
        self.conn = conn
        self._pool = pool
        self._deferred: list[tuple[str, tuple]] = []
        # The session's application_name, unique: what `reopen` finds it by on
        # the server (a backend's pid alone may be another's after a restart).
        self.name = name
        self.pid = conn.info.backend_pid
        self.timeout = timeout
        self._writer = False
        # (pid, application_name) of sessions replaced by `reopen`, until ended.
        self._lost_sessions: set[tuple[int, str]] = set()
        self._idle_poll: select.poll | None = None  # the writer's: see closed_by_server

    @classmethod
    def connect(cls, url: str, timeout: float | None = None) -> "PostgresDatabase":
        import psycopg

        name = f"imaging-scp {secrets.token_hex(6)}"
        options = {"application_name": name}
        if timeout is not None:  # libpq: whole seconds, 2 at least
            options["connect_timeout"] = max(2, math.ceil(timeout))
        try:
            conn = psycopg.connect(url, autocommit=True, row_factory=_row_factory, **options)
        except psycopg.Error as exc:
            detail = " ".join(str(exc).split())  # libpq's message spans lines
            raise IndexUnreachable(
                f"cannot connect to the index at {redact(url)}: {detail}"
            ) from exc
        return cls(url, conn, name=name, timeout=timeout)

    @property
    def broken(self) -> bool:
        return self.conn.closed

    def closed_by_server(self) -> bool:
        # An idle session is sent nothing, but its end: a restart's "terminating
        # connection" and EOF. One poll() of the socket, no round trip.
        return self._idle_poll is not None and bool(self._idle_poll.poll(0))

    def interrupt(self) -> bool:
        # A frozen server still has its kernel acknowledge what we send, so no
        # socket timeout fires, and a cancel request would wait for it too: cut
        # the connection under the waiting thread (a shutdown, which is safe
        # from another thread; the waiter's libpq then fails and closes it).
        try:
            fd = self.conn.pgconn.socket
        except Exception:  # closed already
            return False
        with socket.socket(fileno=os.dup(fd)) as connection, contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_RDWR)
        return True

    def reopen(self, timeout: float) -> None:
        fresh = PostgresDatabase.connect(self.url, timeout=timeout)
        with contextlib.suppress(Exception):
            self.conn.close()
        self._lost_sessions.add((self.pid, self.name))
        self.conn, self.name, self.pid, self._deferred = fresh.conn, fresh.name, fresh.pid, []
        # A lost session may live on in the server (a COMMIT of ours still in
        # its socket while the server was frozen): end it, and wait until it
        # has, so that what is read back next is what stays.
        deadline = time.monotonic() + timeout
        for pid, name in list(self._lost_sessions):
            session = "FROM pg_stat_activity WHERE pid = %s AND application_name = %s"
            self.conn.execute(f"SELECT pg_terminate_backend(pid) {session}", (pid, name))
            while self.conn.execute(f"SELECT 1 {session}", (pid, name)).fetchone():
                if time.monotonic() > deadline:  # still there: the caller tries again
                    raise IndexUnreachable(
                        f"the lost session {pid} to the index at {redact(self.url)} did not end"
                    )
                time.sleep(0.02)
            self._lost_sessions.discard((pid, name))
        if self._writer:
            self.prepare_writer()

    @classmethod
    def from_pool(cls, url: str, timeout: float = 30) -> "PostgresDatabase":
        """A connection lent by this process's pool (created at first use, per
        process: a forked worker never shares its parent's sockets)."""
        import os

        from psycopg_pool import ConnectionPool, PoolTimeout

        key = (os.getpid(), url)
        with _pools_lock:
            pool = _pools.get(key)
            if pool is None:
                pool = ConnectionPool(
                    url,
                    min_size=1,
                    max_size=8,
                    kwargs={"autocommit": True, "row_factory": _row_factory},
                    # Idle connections die with a server restart, unseen: each
                    # one lent is checked first (an empty query, one round
                    # trip), and a dead one replaced, rather than failing a
                    # C-FIND or a commitment's check once.
                    check=ConnectionPool.check_connection,
                    open=True,
                    name="index-readers",
                )
                _pools[key] = pool
        try:
            return cls(url, pool.getconn(timeout=timeout), pool)
        except PoolTimeout as exc:
            raise IndexUnreachable(f"cannot connect to the index at {redact(url)}: {exc}") from exc

    # BEGIN and the study locks wait, and go to the server with the transaction's
    # first statement: one round trip fewer per transaction.

    def execute(self, sql: str, params=()):
        if self._deferred:
            return self._send([(sql, params)])[-1]
        return self.conn.execute(_pyformat(sql), params)

    def _send(self, statements: list[tuple[str, tuple]]) -> list:
        """The deferred statements, then `statements`, in one round trip; the
        cursors of `statements`."""
        deferred, self._deferred = self._deferred, []
        with self.conn.pipeline():
            cursors = [self.conn.execute(_pyformat(sql), p) for sql, p in deferred + statements]
        return cursors[len(deferred) :]

    def executemany(self, sql: str, rows) -> None:
        self._send([])
        with self.conn.cursor() as cursor:
            cursor.executemany(_pyformat(sql), rows)

    def stream(self, sql: str, params=()) -> Iterator:
        # psycopg's ordinary cursor holds the whole result before the first row:
        # a server-side cursor fetches a batch at a time, inside a transaction
        # (of its own, read-only, unless one is open).
        self._send([])
        own = not self.in_transaction
        if own:
            self.conn.execute("BEGIN")
        try:
            with self.conn.cursor(name=f"stream_{next(_cursor_numbers)}") as cursor:
                cursor.itersize = 500
                cursor.execute(_pyformat(sql), params)
                yield from cursor
        finally:
            if own and self.in_transaction:
                self.conn.execute("COMMIT")

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        if self.conn.closed:  # a lost connection's transaction ended with it
            return False
        return bool(self._deferred) or self.conn.info.transaction_status != TransactionStatus.IDLE

    def prepare_writer(self) -> None:
        # Whatever the server's default: COMMIT returns once the WAL is flushed.
        self.execute("SET synchronous_commit = on")
        self._writer = True
        self._idle_poll = select.poll()
        self._idle_poll.register(self.conn.pgconn.socket, select.POLLIN)

    def begin(self) -> None:
        self._deferred.append(("BEGIN", ()))

    def first_rows(self, statements: list[tuple[str, tuple]]) -> list:
        cursors = self._send(statements)
        return [cursor.fetchone() if _has_rows(cursor) else None for cursor in cursors]

    def lock_keys(self, keys: list[str]) -> None:
        # Transaction-level advisory locks, one per key (a study UID), in one
        # order: the instances of one study are indexed one transaction at a
        # time across every node, and two nodes never wait for each other.
        numbers = sorted({lock_number(key) for key in keys})
        if numbers:
            self._deferred.append(
                ("SELECT count(pg_advisory_xact_lock(n)) FROM unnest(?::bigint[]) AS n", (numbers,))
            )

    def exclude_writers(self, tables: list[str]) -> None:
        # EXCLUSIVE conflicts with the ROW EXCLUSIVE lock every INSERT, UPDATE
        # and DELETE takes on its table, and with nothing a SELECT takes. Never
        # waiting for one table while holding another: ingest takes them in
        # more than one order, and a writer holding one and waiting for another
        # would deadlock with us. So all at once, between writers' transactions.
        deadline = time.monotonic() + _EXCLUDE_WRITERS_FOR
        while True:
            self.execute("SAVEPOINT exclude_writers")
            try:
                self.execute(f"LOCK TABLE {', '.join(tables)} IN EXCLUSIVE MODE NOWAIT")
                return
            except Exception as exc:
                if getattr(exc, "sqlstate", None) != "55P03":  # lock_not_available
                    raise
                self.execute("ROLLBACK TO SAVEPOINT exclude_writers")
                if time.monotonic() > deadline:
                    raise IndexBusy(
                        f"{', '.join(tables)} of {redact(self.url)} were written without a"
                        f" pause for {_EXCLUDE_WRITERS_FOR} s: run it again when ingest is"
                        " quieter"
                    ) from exc
            time.sleep(random.uniform(0.001, 0.01))

    def another(self) -> "PostgresDatabase":
        return PostgresDatabase.connect(self.url, timeout=self.timeout)

    def insert_rows(self, table: str, columns: list[str], rows) -> int:
        self._send([])
        count = 0
        sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
        with self.conn.cursor() as cursor, cursor.copy(sql) as copy:
            for row in rows:
                copy.write_row(tuple(row))
                count += 1
        return count

    def reset_identity(self, table: str, column: str) -> None:
        self.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'),"
            f" coalesce(max({column}), 0) + 1, false) FROM {table}"
        )

    def close(self) -> None:
        self._deferred = []
        if self._pool is not None:
            if self.in_transaction:
                self.conn.rollback()
            self._pool.putconn(self.conn)
            self._pool = None
        else:
            self.conn.close()

    def json_elements(self, column: str) -> str:
        return f"json_array_elements_text({column}::json) AS elements(value)"

    def json_array_of_distinct(self, column: str) -> str:
        values = f"json_agg(DISTINCT {column}) FILTER (WHERE {column} IS NOT NULL)"
        return f"coalesce(({values})::text, '[]')"

    def ensure_table(self, name: str, columns: dict[str, type], pk) -> None:
        keys = (pk,) if isinstance(pk, str) else tuple(pk)
        definitions = []
        for column, kind in columns.items():
            if keys == (column,) and kind is int:  # SQLite's INTEGER PRIMARY KEY
                definitions.append(f"{column} BIGINT GENERATED BY DEFAULT AS IDENTITY")
            else:
                definitions.append(f"{column} {_POSTGRES_TYPES[kind]}")
        definitions.append(f"PRIMARY KEY ({', '.join(keys)})")
        # Only what is missing: even when it changes nothing, ALTER TABLE takes
        # the table's ACCESS EXCLUSIVE lock, and an admin command opening the
        # index beside a live ingest (which holds its tables in another order)
        # would deadlock with it or wait behind it.
        present = {
            row[0]
            for row in self.execute(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = ?",
                (name,),
            )
        }
        if not present:
            self.execute(f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(definitions)})")
            return
        for column, kind in columns.items():
            if column not in present:
                self.execute(
                    f"ALTER TABLE {name} ADD COLUMN IF NOT EXISTS {column} {_POSTGRES_TYPES[kind]}"
                )

    def ensure_index(self, table: str, columns: list[str]) -> None:
        # CREATE INDEX IF NOT EXISTS takes the table's SHARE lock before it
        # looks for the index: only when there is none.
        name = f"idx_{table}_{'_'.join(columns)}"
        if self.execute("SELECT to_regclass(?)", (name,)).fetchone()[0] is None:
            super().ensure_index(table, columns)

    def schema_version(self) -> int:
        self.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        row = self.execute("SELECT max(version) FROM schema_version").fetchone()
        return row[0] or 0

    def set_schema_version(self, version: int) -> None:
        self.execute("DELETE FROM schema_version")
        self.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))


# The lock of one key, as `lock_keys` takes it, inside a statement: a condition
# that PostgreSQL evaluates once, before the statement updates or locks any row.
# The parameter is `lock_number(key)`.
POSTGRES_KEY_LOCK = "(SELECT count(pg_advisory_xact_lock(?::bigint))) = 1"


def lock_number(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)
