"""The listener: build the AE, serve associations, stop cleanly on a signal."""

import signal
import threading
import time

import structlog
from pynetdicom import AE, _config

from scp.config import Config
from scp.contexts import install_storage_negotiation, supported_contexts
from scp.handlers import ReceiverHandlers
from scp.transport import ReceiverServer
from storage.files import prepare_data_dir
from storage.index import Index
from storage.store import InstanceStore

log = structlog.get_logger("imaging_scp")


class Receiver:
    """One listening AE: its pynetdicom server and our handlers."""

    def __init__(self, config: Config, store: InstanceStore):
        self.config = config
        self.handlers = ReceiverHandlers(store)
        self.ae = _build_ae(config)
        self.server: ReceiverServer | None = None

    def start(self) -> None:
        """Bind and listen; returns once connections are being accepted."""
        self.server = self.ae.make_server(
            (self.config.host, self.config.port),
            ae_title=self.config.aet,
            evt_handlers=self.handlers.bindings(),
            server_class=ReceiverServer,
            connection_timeout=self.config.network_timeout,
            max_pdu=self.config.max_pdu,
        )
        # What AE.start_server(block=False) does, with our server class.
        self.ae._servers.append(self.server)
        threading.Thread(
            target=self.server.serve_forever, name="imaging-scp-accept", daemon=True
        ).start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def stop(self, drain_timeout: float) -> int:
        """Stop accepting, let in-flight associations finish for up to
        `drain_timeout` seconds, then abort the rest. Returns how many were aborted."""
        self.server.shutdown()
        deadline = time.monotonic() + drain_timeout
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = len(self.ae.active_associations)
        self.ae.shutdown()
        return remaining


def _build_ae(config: Config) -> AE:
    # pynetdicom's standard handlers log every PDU and DIMSE message; they cost
    # time on the receive path and our handlers log what matters.
    _config.LOG_HANDLER_LEVEL = "none"
    install_storage_negotiation()
    ae = AE(ae_title=config.aet)
    ae.maximum_pdu_size = config.max_pdu
    ae.maximum_associations = config.max_associations
    ae.network_timeout = config.network_timeout
    ae.require_called_aet = config.require_called_aet
    ae.supported_contexts = supported_contexts()
    return ae


def open_store(config: Config) -> InstanceStore:
    """Prepare the data directory and open its index (removing leftover temp files)."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    leftovers = prepare_data_dir(config.data_dir)
    if leftovers:
        log.warning("startup.removed_temp_files", count=len(leftovers))
    index = Index.in_data_dir(config.data_dir)
    return InstanceStore(config.data_dir, index, config.duplicates)


def serve(config: Config) -> int:
    """Run the service until SIGINT or SIGTERM; return the exit code."""
    stop_requested = threading.Event()

    def request_stop(signum, _frame):
        log.info("shutdown.requested", signal=signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    store = open_store(config)
    receiver = Receiver(config, store)
    receiver.start()
    log.info(
        "listening",
        aet=config.aet,
        host=config.host,
        port=receiver.port,
        data_dir=str(config.data_dir.resolve()),
        duplicates=str(config.duplicates),
        max_pdu=config.max_pdu,
    )
    while not stop_requested.wait(0.5):
        pass
    aborted = receiver.stop(config.drain_timeout)
    store.index.close()
    log.info("stopped", aborted_associations=aborted)
    return 0
