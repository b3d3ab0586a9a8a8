"""Event-driven versions of pynetdicom's two per-association polling loops.

pynetdicom runs two threads per association, each polling every millisecond:
the DUL thread (socket and outgoing PDUs) and the association thread (decoded
DIMSE messages). A C-STORE crosses both, so each object waits for several poll
periods, and the wake-ups compete for the CPU with the work. Here each loop
blocks on what it waits for instead: the DUL in `select` on the socket and on a
pipe that `send_pdu` writes to, the association on its message queue (which
pynetdicom also wakes on an abort). The loop bodies are pynetdicom 3.0's own
(MIT licence), with only the waiting changed.
"""

import contextlib
import os
import queue
import select
import ssl

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ

# The longest a loop sleeps without news: it bounds how late the ARTIM timer,
# an A-RELEASE and the network timeout are noticed.
IDLE_WAIT = 0.02


class WakingDUL(DULServiceProvider):
    """The DUL thread, woken by the socket or by a PDU to send."""

    def prepare_waking(self) -> None:
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)

    def send_pdu(self, primitive) -> None:
        super().send_pdu(primitive)
        # A full pipe means it is awake already; a closed one, that it is done.
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"\0")

    def _wait_for_work(self) -> None:
        sock = self.socket.socket if self.socket is not None else None
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes that select() cannot see
        watched = [self._wake_read] + ([sock] if sock is not None and sock.fileno() >= 0 else [])
        try:
            ready, _, _ = select.select(watched, [], [], IDLE_WAIT)
        except (OSError, ValueError):
            return  # the socket closed under us: the loop will notice
        if self._wake_read in ready:
            os.read(self._wake_read, 4096)

    def run_reactor(self) -> None:
        try:
            self._run_waking_reactor()
        finally:
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _run_waking_reactor(self) -> None:
        self._idle_timer.start()
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:
                # As pynetdicom does: bypass the state machine and abort.
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                if self.to_provider_queue.empty():
                    self._wait_for_work()
                continue
            self.state_machine.do_action(event)


class WakingAssociation(Association):
    """The association thread, woken by a decoded DIMSE message."""

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=IDLE_WAIT)
            except queue.Empty:
                context_id, msg = None, None
            if msg:
                self._serve_request(msg, context_id)

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def make_waking(assoc: Association) -> None:
    """Switch a new acceptor association (threads not started) to the waking loops."""
    assoc.__class__ = WakingAssociation
    assoc.dul.__class__ = WakingDUL
    assoc.dul.prepare_waking()
