"""TCP details of the listener that pynetdicom leaves to us.

- TCP_NODELAY on every accepted socket, and TCP_QUICKACK re-armed before each
  read on Linux: senders that leave Nagle's algorithm on (dcmtk's storescu and
  the modalities built on it) otherwise wait ~40 ms for a delayed ACK on every
  small C-STORE.
- A read timeout on every accepted socket: a peer that stops mid-PDU frees its
  slot after `network_timeout` instead of holding a thread forever.
- A bound on the PDU length we agree to read: a hostile length field must not
  make us allocate gigabytes.
- poll() instead of select() to ask whether a socket has data: select() fails
  on descriptors numbered 1024 and above, and pynetdicom takes that failure
  for a closed connection, so a busy listener would drop healthy associations.
- TLS (a listener with `tls_context`): the handshake runs in the connection's
  own thread, with a deadline, before pynetdicom sees the socket. pynetdicom's
  own TLS server shakes hands in the accept loop, where one silent connection
  stalls every sender behind it. An SSLSocket works unchanged below: pynetdicom's
  `ready()` asks it for `pending()` bytes, `recv_into` and `setsockopt` work.
"""

import select
import socket
import ssl

import structlog
from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from scp import notify, protocol, tls

log = structlog.get_logger("imaging_scp")
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)

# The largest non-P-DATA PDU we accept (an A-ASSOCIATE-RQ with the maximum 128
# presentation contexts, each with many transfer syntaxes, stays well below it).
MIN_PDU_READ_LIMIT = 1024 * 1024


class ReceiverSocket(AssociationSocket):
    """An association socket that keeps ACKs immediate and bounds PDU reads."""

    pdu_read_limit = MIN_PDU_READ_LIMIT

    @property
    def ready(self) -> bool:
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():  # decrypted, already read
            return True
        poller = select.poll()
        try:
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):  # as pynetdicom: the connection is gone
            self.event_queue.put("Evt17")
            return False

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.pdu_read_limit:
            # pynetdicom treats OSError as "connection closed" and aborts.
            raise OSError(
                f"peer announced a {nr_bytes}-byte PDU, above the {self.pdu_read_limit}-byte limit"
            )
        sock = self.socket
        buffer = bytearray(nr_bytes)
        received = 0
        with memoryview(buffer) as view:
            while received < nr_bytes:
                if _TCP_QUICKACK is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
                count = sock.recv_into(view[received:])
                if count == 0:  # peer closed: return what we have, as pynetdicom expects
                    break
                received += count
        if received < nr_bytes:
            del buffer[received:]
        return buffer


class ReceiverRequestHandler(RequestHandler):
    """pynetdicom's request handler, with our socket class on the association,
    and the TLS handshake first on a TLS listener."""

    def handle(self):
        context = self.server.tls_context
        if context is not None:
            self.request = self._tls_handshake(context)
            if self.request is None:
                return
        super().handle()

    def _tls_handshake(self, context: ssl.SSLContext) -> ssl.SSLSocket | None:
        """The connection's socket after a completed TLS handshake, or None when
        the peer failed it (closed, logged, and no association created)."""
        host, port = self.client_address[:2]
        peer = f"{host}:{port}"
        try:
            secured = tls.handshake(context, self.request, self.server.tls_handshake_timeout)
        except (OSError, ssl.SSLError) as exc:  # HandshakeTimeout is an OSError
            self.request.close()
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            log.warning("tls.handshake_failed", peer=peer, reason=reason)
            return None
        if self.server.stopping:  # the handshake outlasted a stop: nothing may start now
            secured.close()
            return None
        log.info("tls.established", peer=peer, **tls.describe(secured))
        return secured

    def _create_association(self):
        assoc = super()._create_association()
        # pynetdicom builds the AssociationSocket itself; ReceiverSocket only
        # overrides a method, so changing the class of the instance is safe.
        assoc.dul.socket.__class__ = ReceiverSocket
        assoc.dul.socket.pdu_read_limit = max(self.server.max_pdu + 6, MIN_PDU_READ_LIMIT)
        protocol.install(assoc)
        return assoc


class ReceiverServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with our socket options on accepted connections."""

    # A connection's thread only shakes hands (TLS) and starts the association's
    # own thread; it must not hold the process up at exit.
    daemon_threads = True

    def __init__(
        self,
        *args,
        connection_timeout: float,
        max_pdu: int,
        tls_context: ssl.SSLContext | None = None,
        tls_handshake_timeout: float = 10.0,
        reuse_port: bool = False,
        **kwargs,
    ):
        self.reuse_port = reuse_port
        self.connection_timeout = connection_timeout
        self.max_pdu = max_pdu
        # Not pynetdicom's `ssl_context`, which would shake hands in the accept loop.
        self.tls_context = tls_context
        self.tls_handshake_timeout = tls_handshake_timeout
        self.stopping = False
        self.watchdog = notify.Watchdog()
        super().__init__(*args, request_handler=ReceiverRequestHandler, **kwargs)

    def server_bind(self) -> None:
        if self.reuse_port:  # several worker processes listen on one port
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self):
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.settimeout(self.connection_timeout)
        return client, address

    def shutdown(self) -> None:
        self.stopping = True
        super().shutdown()

    def service_actions(self) -> None:
        """Called by serve_forever() on every loop (at least every 0.5 s): the
        systemd watchdog ping comes from here, so it proves the accept loop lives."""
        super().service_actions()  # pynetdicom's periodic gc.collect()
        self.watchdog.ping_if_due()
