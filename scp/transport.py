"""TCP details of the listener that pynetdicom leaves to us.

- TCP_NODELAY on every accepted socket, and TCP_QUICKACK re-armed before each
  read on Linux: senders that leave Nagle's algorithm on (dcmtk's storescu and
  the modalities built on it) otherwise wait ~40 ms for a delayed ACK on every
  small C-STORE.
- A read timeout on every accepted socket: a peer that stops mid-PDU frees its
  slot after `network_timeout` instead of holding a thread forever.
- A bound on the PDU length we agree to read: a hostile length field must not
  make us allocate gigabytes.
"""

import socket

from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from scp import notify

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)

# The largest non-P-DATA PDU we accept (an A-ASSOCIATE-RQ with the maximum 128
# presentation contexts, each with many transfer syntaxes, stays well below it).
MIN_PDU_READ_LIMIT = 1024 * 1024


class ReceiverSocket(AssociationSocket):
    """An association socket that keeps ACKs immediate and bounds PDU reads."""

    pdu_read_limit = MIN_PDU_READ_LIMIT

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
    """pynetdicom's request handler, with our socket class on the association."""

    def _create_association(self):
        assoc = super()._create_association()
        # pynetdicom builds the AssociationSocket itself; ReceiverSocket only
        # overrides a method, so changing the class of the instance is safe.
        assoc.dul.socket.__class__ = ReceiverSocket
        assoc.dul.socket.pdu_read_limit = max(self.server.max_pdu + 6, MIN_PDU_READ_LIMIT)
        return assoc


class ReceiverServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with our socket options on accepted connections."""

    def __init__(self, *args, connection_timeout: float, max_pdu: int, **kwargs):
        self.connection_timeout = connection_timeout
        self.max_pdu = max_pdu
        self.watchdog = notify.Watchdog()
        super().__init__(*args, request_handler=ReceiverRequestHandler, **kwargs)

    def get_request(self):
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.settimeout(self.connection_timeout)
        return client, address

    def service_actions(self) -> None:
        """Called by serve_forever() on every loop (at least every 0.5 s): the
        systemd watchdog ping comes from here, so it proves the accept loop lives."""
        super().service_actions()  # pynetdicom's periodic gc.collect()
        self.watchdog.ping_if_due()
