"""The listener: accept connections, give each its own thread, stop cleanly on a signal.

Each accepted connection is served start to end by one thread (`Associations.serve`):
the TLS handshake when the listener is a TLS one, then the association, with
blocking reads. The accept loop only accepts; it wakes twice a second to feed
the systemd watchdog, which so proves that it lives.
"""

import contextlib
import ctypes
import errno
import os
import select
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable

import structlog

from scp import dimse, metrics, notify, tls
from scp.access import CallerPolicy
from scp.association import Associations
from scp.commitment_service import CommitmentService
from scp.config import Config, ConfigError
from scp.echo_service import EchoService
from scp.find_service import FindService
from scp.logs import error_line
from scp.reports import Reporter
from scp.retrieve_service import RetrieveService
from scp.store_service import StoreService
from scp.tls import server_context
from storage.catalog import Catalog
from storage.catalog.engines import (
    IndexCorrupt,
    IndexFailed,
    IndexUnreachable,
    SchemaTooNew,
    engine_failures,
)
from storage.changes import finish_deletions
from storage.maintenance import IndexBehindFiles, check_not_behind_files, recover_incoming
from storage.store import InstanceStore

log = structlog.get_logger("imaging_scp")

_ACCEPT_WAKEUP = 0.5  # seconds between two watchdog checks of the accept loop
_LISTEN_BACKLOG = 128


class ListenError(Exception):
    """A listening socket that could not be bound: which address, and why."""

    def __init__(self, host: str, port: int, error: OSError):
        super().__init__(f"{host}:{port}: {error.strerror or error}")
        self.host, self.port, self.error = host, port, error


class Listener:
    """One listening socket (plain DICOM or DICOM over TLS)."""

    def __init__(self, config: Config, associations: Associations, port: int, tls_context=None):
        self.config = config
        self.associations = associations
        self.tls_context: ssl.SSLContext | None = tls_context  # replaced on SIGHUP
        self.stopping = False
        self.watchdog = notify.Watchdog()
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if config.workers > 1:  # several worker processes listen on one port
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self.socket.bind((config.host, port))
        except OSError as exc:
            self.socket.close()
            raise ListenError(config.host, port, exc) from exc
        self.socket.listen(_LISTEN_BACKLOG)
        self.port = self.socket.getsockname()[1]
        self._thread = threading.Thread(
            target=self._accept_loop,
            name="imaging-scp-accept" + ("-tls" if tls_context else ""),
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def _accept_loop(self) -> None:
        # poll(), not select(): select() fails on descriptors above 1023.
        poller = select.poll()
        poller.register(self.socket, select.POLLIN)
        while not self.stopping:
            self.watchdog.ping_if_due()
            if not poller.poll(_ACCEPT_WAKEUP * 1000) or self.stopping:
                continue
            try:
                client, address = self.socket.accept()
            except OSError as exc:  # EMFILE, a connection reset before accept...
                log.warning("accept.failed", reason=exc.strerror or str(exc))
                time.sleep(0.05)  # let descriptors free up rather than spin
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.settimeout(self.config.network_timeout)
            threading.Thread(
                target=self._serve_connection, args=(client, address), daemon=True
            ).start()
        self.socket.close()

    def _serve_connection(self, client: socket.socket, address) -> None:
        host, port = address[:2]
        context = self.tls_context
        if context is not None:
            client = self._tls_handshake(context, client, f"{host}:{port}")
            if client is None:
                return
        self.associations.serve(client, host, port)

    def _tls_handshake(self, context, client, peer: str) -> ssl.SSLSocket | None:
        """The connection's socket after a completed TLS handshake, or None when
        the peer failed it (closed, logged, and no association created)."""
        try:
            secured = tls.handshake(context, client, self.config.tls_handshake_timeout)
        except (OSError, ssl.SSLError) as exc:  # HandshakeTimeout is an OSError
            client.close()
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            log.warning("tls.handshake_failed", peer=peer, reason=reason)
            return None
        if self.stopping:  # the handshake outlasted a stop: nothing may start now
            secured.close()
            return None
        log.info("tls.established", peer=peer, **tls.describe(secured))
        return secured

    def stop_accepting(self) -> None:
        self.stopping = True
        self._thread.join(_ACCEPT_WAKEUP * 4)


class Listeners:
    """The listening sockets of one process (plain DICOM, DICOM over TLS), the
    associations they serve and the services those share."""

    def __init__(self, config: Config, store: InstanceStore, callers: CallerPolicy):
        self.config = config
        self.store_service = StoreService(store)
        self.commitment = CommitmentService(
            store.index, config.aet, config.peers, config.network_timeout
        )
        find = FindService(
            config.index_location,
            config.aet,
            config.find_limit,
            store.index.health,
            config.index_timeout,
        )
        retrieve = RetrieveService(config, store.index.health)
        services = {  # Command Field -> the service its messages go to
            dimse.C_ECHO_RQ: EchoService(store.index.health),
            dimse.C_STORE_RQ: self.store_service,
            dimse.C_FIND_RQ: find,
            dimse.C_MOVE_RQ: retrieve,
            dimse.C_GET_RQ: retrieve,
            dimse.C_STORE_RSP: retrieve,  # the answers to a C-GET's sub-operations
            dimse.N_ACTION_RQ: self.commitment,
            dimse.N_EVENT_REPORT_RSP: self.commitment,  # the answers to its reports
        }
        self.associations = Associations(config, store, services, callers)
        self.plain: Listener | None = None  # plain DICOM; None with port = 0
        self.tls: Listener | None = None  # DICOM over TLS, on tls_port

    def start(self, tls_context=None) -> None:
        """Bind and listen; returns once connections are being accepted."""
        if self.config.port:
            self.plain = Listener(self.config, self.associations, self.config.port)
        if self.config.tls_port:
            self.tls = Listener(
                self.config,
                self.associations,
                self.config.tls_port,
                tls_context or server_context(self.config),
            )
        for listener in (self.plain, self.tls):
            if listener is not None:
                listener.start()

    @property
    def port(self) -> int | None:
        return self.plain.port if self.plain else None

    @property
    def tls_port(self) -> int | None:
        return self.tls.port if self.tls else None

    def stop(self, drain_timeout: float) -> int:
        """Stop accepting, let established associations finish for up to
        `drain_timeout` seconds, then abort the rest. Returns how many were aborted."""
        for listener in (self.plain, self.tls):
            if listener is not None:
                listener.stop_accepting()
        for association in self.associations.active():
            # A connection that has not associated (a port probe) has nothing in
            # flight: it must not hold up a stop.
            if not association.established:
                association.stop()
        deadline = time.monotonic() + drain_timeout
        while self._established() and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = self.associations.active()
        for association in remaining:
            association.stop()
        deadline = time.monotonic() + 5
        while self.associations.active() and time.monotonic() < deadline:
            time.sleep(0.02)
        return sum(1 for association in remaining if association.established)

    def _established(self) -> list:
        return [a for a in self.associations.active() if a.established]


def recover(config: Config) -> None:
    """Prepare the data directory and finish what a crash left (before any worker starts)."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    # Never store into a damaged index: each Success would be a row in it.
    config.index_location.check_intact(quick=True)
    index = Catalog.open(config.index_location)
    try:
        recovery = recover_incoming(index, config.node)
        deletions = finish_deletions(index, config.data_dir)
        check_not_behind_files(index)
    finally:
        index.close()
    if recovery.removed or recovery.indexed or deletions:
        log.warning(
            "startup.recovered",
            removed_temp_files=recovery.removed,
            indexed_files=recovery.indexed,
            finished_deletions=deletions,
        )


def open_store(config: Config) -> InstanceStore:
    """This process's index connection and store: each write bounded by
    index_timeout, the index's outages and returns logged."""
    index = Catalog.open(config.index_location, timeout=config.index_timeout)
    index.health.subscribe(_log_index_health)
    index.start_monitor()
    return InstanceStore(
        config.data_dir,
        index,
        config.duplicates,
        (config.min_free_space.bytes, config.min_free_space.percent),
        node=config.node,
    )


def _log_index_health(reason: str | None, since: float, damaged: bool) -> None:
    if damaged:
        log.error(
            "index.unavailable",
            reason=reason,
            advice="new associations are rejected (transient) until the index is rebuilt:"
            " stop imaging-scp serve, run imaging-scp rebuild, start it again",
        )
    elif reason is not None:
        log.error(
            "index.unavailable",
            reason=reason,
            advice="new associations are rejected (transient) until the index answers again",
        )
    else:
        log.warning("index.available", unavailable_seconds=round(time.time() - since, 1))


class StartGate:
    """Workers begin to listen only once the main process listens, its metrics
    endpoint included: a port that accepts means the whole service is up (a
    scrape right after it finds the endpoint). Made before the fork; one byte
    per worker lets them go, and a gate shut without them (the main process
    could not start) sends them away."""

    def __init__(self, workers: int):
        self.workers = workers
        self._read, self._write = os.pipe()

    def keep_side(self, in_worker: bool) -> None:
        """After the fork: each process keeps its own end of the pipe."""
        os.close(self._write if in_worker else self._read)

    def wait(self) -> bool:
        """In a worker: True once the main process listens, False if it gave up."""
        try:
            return os.read(self._read, 1) == b"!"
        finally:
            os.close(self._read)

    def open(self) -> None:
        os.write(self._write, b"!" * self.workers)
        os.close(self._write)

    def shut(self) -> None:
        os.close(self._write)


def fork_workers(count: int) -> list[int] | None:
    """Start `count` more listener processes; returns their pids in the parent,
    None in a worker. Called before any thread exists, so fork is safe."""
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            # systemd listens to the main process only (NotifyAccess=main).
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
            _stop_when_parent_dies()
            return None
        pids.append(pid)
    return pids


def _map_large_blocks_apart() -> None:
    """Give every malloc block of 128 KiB or more its own mapping, returned to
    the system when freed (glibc; elsewhere nothing changes).

    glibc's default threshold moves: once such a block is freed it serves later
    ones from the heap, where small allocations fragment what they leave. The
    soak measured the heap keeping 1.8 MB more every ~19,000 instances (+15 %
    RSS at 217,000); with the threshold fixed it stayed flat.
    """
    m_mmap_threshold = -3
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(m_mmap_threshold, 128 * 1024)


def _stop_when_parent_dies() -> None:
    """A worker gets SIGTERM if the main process dies, even by SIGKILL (Linux)."""
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _signal_workers(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _a_worker_died(pids: list[int], endpoint: metrics.Endpoint | None = None) -> int | None:
    for pid in pids:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            pids.remove(pid)
            if endpoint is not None:
                endpoint.worker_ended(pid)
            return os.waitstatus_to_exitcode(status)
    return None


def _wait_for_workers(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        _a_worker_died(pids)
        time.sleep(0.05)
    _signal_workers(pids, signal.SIGKILL)
    for pid in pids:
        os.waitpid(pid, 0)


def serve(config: Config, reload_config: Callable[[], Config] | None = None) -> int:
    """Run the service until SIGINT or SIGTERM; return the exit code.

    SIGHUP calls `reload_config` and applies its allowed callers (and TLS
    certificate, key and client CAs) to new associations; associations in flight
    are not touched.
    """
    _map_large_blocks_apart()
    try:  # before anything starts: a bad certificate is a usage error (exit 2)
        tls_context = server_context(config) if config.tls_port else None
        callers = allowed_callers(config)
    except ConfigError as exc:
        print(error_line(str(exc)), file=sys.stderr)
        return 2
    # The handler only records the signal. It runs between two bytecodes of the
    # main thread, which may be holding the very lock that Event.set() or a log
    # call would take: a SIGTERM at that moment hung the process for good.
    stop_requested: list[int] = []

    def request_stop(signum, _frame):
        stop_requested.append(signum)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    reload_requested: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, _frame: reload_requested.append(signum))

    try:
        with engine_failures():
            recover(config)
    except IndexCorrupt as exc:
        return _index_damaged(exc)
    except IndexBehindFiles as exc:
        return _cannot_start(str(exc))
    except SchemaTooNew as exc:
        return _cannot_start(str(exc))
    except IndexUnreachable as exc:
        return _cannot_start(
            f"{exc}: check index_url, that PostgreSQL runs there and lets this user in"
        )
    except OSError as exc:
        return _cannot_start(_data_dir_problem(config.data_dir, exc))
    except IndexFailed as exc:
        damage = config.index_location.corruption(exc)
        if (
            damage is not None
        ):  # e.g. an index out of step with its table: quick_check does not compare them
            return _index_damaged(damage)
        if not config.index_location.shared_by_nodes:
            return _cannot_start(_data_dir_problem(config.data_dir, exc))
        return _cannot_start(
            f"cannot use the index at {config.index_location.describe()} ({exc}): the user of"
            " index_url must be allowed to create tables in that database"
        )
    if config.metrics_port:
        metrics.start(config)  # before the fork: each worker counts into the same place
    gate = StartGate(config.workers - 1) if config.workers > 1 else None
    workers = fork_workers(config.workers - 1)
    if gate is not None:
        gate.keep_side(in_worker=workers is None)
    store = open_store(config)
    listeners = Listeners(config, store, callers)
    endpoint = None
    try:
        if workers is None and not gate.wait():  # the main process could not start: it says why
            store.index.close()
            return 2
        if config.metrics_port and workers is not None:  # one endpoint: the main process's
            endpoint = expose_metrics(config, store)
        listeners.start(tls_context)
    except ListenError as exc:
        if workers and gate is not None:
            gate.shut()
        _signal_workers(workers or [], signal.SIGTERM)
        _wait_for_workers(workers or [], 5)
        if endpoint is not None:  # its multiprocess directory goes with it
            endpoint.stop()
        return _cannot_start(_address_problem(exc))
    if workers and gate is not None:
        gate.open()
    # One process delivers reports on new associations: the main one.
    reporter = Reporter(config, listeners.commitment) if workers is not None else None
    if reporter is not None:
        reporter.start()
    for port, over_tls in ((listeners.port, False), (listeners.tls_port, True)):
        if port is None:
            continue
        log.info(
            "listening",
            aet=config.aet,
            host=config.host,
            port=port,
            tls=over_tls,
            **({"client_certificates": bool(config.tls_client_ca)} if over_tls else {}),
            data_dir=str(config.data_dir.resolve()),
            index=config.index_location.describe(),
            node=config.node,
            duplicates=str(config.duplicates),
            max_pdu=config.max_pdu,
        )
    # The port accepts connections since listeners.start(): tell systemd.
    status = notify.ServiceStatus(config.host, listeners.port or listeners.tls_port)
    status.ready(0, listeners.store_service.stored)
    index_health = store.index.health
    exit_code = 0
    while not stop_requested:
        time.sleep(0.25)
        if reload_requested:
            reload_requested.clear()
            _reload_callers(listeners, reload_config)
            _signal_workers(workers or [], signal.SIGHUP)
        if workers and (died := _a_worker_died(workers, endpoint)) is not None:
            # One worker gone means a degraded service: stop, and let systemd
            # (Restart=on-failure) start all of it again.
            log.error("worker.died", exit_code=died)
            exit_code = 1
            break
        # The watchdog goes on being fed while the index is out (restarting this
        # service brings no database back): STATUS= says it instead.
        problem = None if index_health.available else index_health.describe()
        status.update(len(listeners.associations.active()), listeners.store_service.stored, problem)
    if stop_requested:
        log.info("shutdown.requested", signal=signal.Signals(stop_requested[0]).name)
    _signal_workers(workers or [], signal.SIGTERM)
    in_flight = len(listeners.associations.active())
    notify.stopping(f"stopping: draining {in_flight} association(s)")
    aborted = listeners.stop(config.drain_timeout)
    if reporter is not None:
        reporter.stop()
    store.index.close()
    _wait_for_workers(workers or [], config.drain_timeout + 5)
    if endpoint is not None:
        endpoint.stop()
    log.info("stopped", aborted_associations=aborted)
    return exit_code


def expose_metrics(config: Config, store: InstanceStore) -> metrics.Endpoint:
    """The metrics endpoint, listening (ListenError when its port cannot be bound)."""
    try:
        endpoint = metrics.Endpoint(config, store)
    except OSError as exc:
        raise ListenError(config.metrics_host, config.metrics_port, exc) from exc
    log.info("metrics.listening", host=config.metrics_host, port=endpoint.port)
    return endpoint


def allowed_callers(config: Config) -> CallerPolicy:
    """The callers policy, host names resolved now (ConfigError when one is not)."""
    try:
        return CallerPolicy(config.allowed_callers)
    except ValueError as exc:
        raise ConfigError(f"key 'allowed_callers': {exc}") from exc


def _cannot_start(message: str) -> int:
    """A start-up that cannot go on: one line for people, one event for the log."""
    log.error("startup.failed", reason=message)
    print(error_line(message), file=sys.stderr)
    return 2


def _index_damaged(damage: IndexCorrupt) -> int:
    log.error("index.corrupt", path=str(damage.path), reason=damage.detail)
    return _cannot_start(str(damage))


def _data_dir_problem(data_dir, exc: Exception) -> str:
    path = data_dir.resolve()
    detail = getattr(exc, "strerror", None) or str(exc)
    return (
        f"cannot use the data directory {path} ({detail}): give the user running"
        f" imaging-scp (uid {os.geteuid()}) write access to it and to its index.sqlite,"
        " or choose another with --data-dir"
    )


def _address_problem(exc: ListenError) -> str:
    code = exc.error.errno
    if code == errno.EADDRINUSE:
        advice = "another program listens there (see `ss -ltnp`): stop it, or choose another port"
    elif code == errno.EACCES:
        advice = "ports below 1024 need privileges: use 11112, or grant CAP_NET_BIND_SERVICE"
    elif code == errno.EADDRNOTAVAIL:
        advice = "no interface of this machine has that address: check --host"
    else:
        advice = "check --host and --port"
    return f"cannot listen on {exc.host}:{exc.port} ({exc.error.strerror or exc.error}): {advice}"


def _reload_callers(listeners: Listeners, reload_config: Callable[[], Config] | None) -> None:
    if reload_config is None:
        log.warning("reload.skipped", reason="no --config file to reload")
        return
    try:
        new = reload_config()
        if listeners.tls is not None and new.tls_port:  # renewed certificate, CAs
            listeners.tls.tls_context = server_context(new)
        listeners.associations.callers = allowed_callers(new)
    except (ConfigError, ValueError) as exc:
        log.error("reload.failed", reason=str(exc))
        return
    log.info("reload.done", allowed_callers=sorted(new.allowed_callers))
