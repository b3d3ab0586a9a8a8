"""The floor: the least a Python receiver with imaging-scp's durability does.

    python benchmarks/floor.py PORT OUT_DIR

`../shared/notes/receive-engine.md`'s throw-away receiver, kept to tell what a
machine allows from what our code costs: one thread per association with
blocking reads, PDUs and command sets parsed by hand, a hand-built C-STORE-RSP;
for each instance a temp file (fsync), a link into `<study>/<series>/`, a
directory fsync, one SQLite transaction of three rows (WAL, synchronous=FULL),
then the response. The header is read with imaging-scp's own walk
(`storage.header.DatasetWalk`), so the difference is everything else: no
checks, no group commit, no first-value-wins, no logs, no recovery, no TLS.
A benchmark yardstick, not a service: it accepts whatever is proposed.
"""

import hashlib
import itertools
import os
import socket
import sqlite3
import struct
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scp import association  # noqa: E402  (the association's negotiation only)
from storage.header import DatasetWalk  # noqa: E402

_PDU_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")
_ELEMENT = struct.Struct("<HHI")
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
_RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
_MAX_PDU = 1 << 20


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0, element, len(value)) + value


def _even(uid: bytes) -> bytes:
    return uid + b"\0" if len(uid) % 2 else uid


def _store_response(sop_class: bytes, sop_instance: bytes, message_id: bytes) -> bytes:
    body = b"".join(
        (
            _element(0x0002, _even(sop_class)),
            _element(0x0100, b"\x01\x80"),
            _element(0x0120, message_id),
            _element(0x0800, b"\x01\x01"),
            _element(0x0900, b"\x00\x00"),
            _element(0x1000, _even(sop_instance)),
        )
    )
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _command_elements(data: bytes) -> dict[int, bytes]:
    elements, pos = {}, 0
    while pos < len(data):
        _, element, length = _ELEMENT.unpack_from(data, pos)
        elements[element] = data[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return elements


class Floor:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.incoming = out_dir / ".incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(
            out_dir / "index.sqlite", check_same_thread=False, isolation_level=None
        )
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(
            "CREATE TABLE IF NOT EXISTS studies (study_uid TEXT PRIMARY KEY, instances INTEGER);"
            "CREATE TABLE IF NOT EXISTS series (series_uid TEXT PRIMARY KEY, study_uid TEXT,"
            " instances INTEGER);"
            "CREATE TABLE IF NOT EXISTS instances (sop_instance_uid TEXT PRIMARY KEY,"
            " series_uid TEXT, path TEXT, size INTEGER, sha256 TEXT);"
        )
        self.db_lock = threading.Lock()
        self.temp_numbers = itertools.count()

    def serve(self, sock: socket.socket) -> None:
        with sock:
            Association(self, sock).run()

    def keep(self, received: "Received") -> None:
        """Durable file, durable name, durable row: then the response may go."""
        header = received.walk.finish()
        os.fsync(received.fd)
        os.close(received.fd)
        directory = self.out_dir / header.study_uid / header.series_uid
        directory.mkdir(parents=True, exist_ok=True)
        relpath = f"{header.study_uid}/{header.series_uid}/{header.sop_instance_uid}.dcm"
        os.link(received.temp, self.out_dir / relpath)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with self.db_lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT INTO studies VALUES (?, 1)"
                " ON CONFLICT DO UPDATE SET instances = instances + 1",
                (header.study_uid,),
            )
            db.execute(
                "INSERT INTO series VALUES (?, ?, 1)"
                " ON CONFLICT DO UPDATE SET instances = instances + 1",
                (header.series_uid, header.study_uid),
            )
            db.execute(
                "INSERT INTO instances VALUES (?, ?, ?, ?, ?)",
                (
                    header.sop_instance_uid,
                    header.series_uid,
                    relpath,
                    received.size,
                    received.digest.hexdigest(),
                ),
            )
            db.execute("COMMIT")
        os.unlink(received.temp)


class Received:
    """One dataset on its way to its temp file."""

    def __init__(self, floor: Floor, transfer_syntax: str, command: dict[int, bytes]):
        self.command = command
        self.temp = floor.incoming / f"{os.getpid()}-{next(floor.temp_numbers)}.part"
        self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        head = b"\x00" * 128 + b"DICM" + _element(0x0010, _even(transfer_syntax.encode()))
        self.size = os.write(self.fd, head)
        self.digest = hashlib.sha256()
        self.walk = DatasetWalk(transfer_syntax)

    def write(self, fragment) -> None:
        view = memoryview(fragment)
        while view:
            view = view[os.write(self.fd, view) :]
        self.size += len(fragment)
        self.digest.update(fragment)
        self.walk.feed(fragment)


class Association:
    def __init__(self, floor: Floor, sock: socket.socket):
        self.floor = floor
        self.sock = sock
        self.buffer = bytearray(_MAX_PDU + 6)
        self.view = memoryview(self.buffer)
        self.start = self.end = 0
        self.contexts: dict[int, str] = {}

    def read(self, count: int):
        if self.end - self.start < count:
            if self.start + count > len(self.buffer):
                left = self.end - self.start
                self.view[:left] = self.view[self.start : self.end]
                self.start, self.end = 0, left
            while self.end - self.start < count:
                if _TCP_QUICKACK is not None:
                    self.sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
                got = self.sock.recv_into(self.view[self.end :])
                if got == 0:
                    return None
                self.end += got
        start, self.start = self.start, self.start + count
        return self.view[start : start + count]

    def run(self) -> None:
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        command, received = bytearray(), None
        while (header := self.read(6)) is not None:
            kind, length = _PDU_HEADER.unpack_from(header)
            body = self.read(length)
            if body is None:
                return
            if kind == 0x01:
                request = association.read_request(bytes(header) + bytes(body))
                agreement = association.agree(request, _MAX_PDU)
                self.contexts = {
                    cid: str(cx.transfer_syntax[0]) for cid, cx in agreement.contexts.items()
                }
                self.sock.sendall(agreement.pdu)
            elif kind == 0x04:
                pos = 0
                while pos < length:
                    pdv_length, context_id, control = _PDV_HEADER.unpack_from(body, pos)
                    fragment = body[pos + 6 : pos + 4 + pdv_length]
                    pos += 4 + pdv_length
                    if control & 0x01:
                        command += fragment
                        if control & 0x02:
                            elements = _command_elements(bytes(command))
                            command.clear()
                            received = Received(self.floor, self.contexts[context_id], elements)
                        continue
                    received.write(fragment)
                    if control & 0x02:
                        self.floor.keep(received)
                        elements = received.command
                        response = _store_response(
                            elements[0x0002].rstrip(b"\0"),
                            elements[0x1000].rstrip(b"\0"),
                            elements[0x0110],
                        )
                        pdv = _PDV_HEADER.pack(len(response) + 2, context_id, 0x03) + response
                        self.sock.sendall(_PDU_HEADER.pack(0x04, len(pdv)) + pdv)
                        received = None
            elif kind == 0x05:
                self.sock.sendall(_RELEASE_RP)
                return
            else:  # an abort, or what a yardstick need not understand
                return


def main() -> None:
    port, out_dir = int(sys.argv[1]), Path(sys.argv[2])
    floor = Floor(out_dir)
    listener = socket.create_server(("127.0.0.1", port), backlog=64)
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=floor.serve, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    main()
