"""An event-driven version of pynetdicom's association loop.

pynetdicom's association thread polls for decoded DIMSE messages every
millisecond; each C-STORE waits for a poll period, and the wake-ups compete for
the CPU with the work. Here the loop blocks on its message queue instead (which
pynetdicom also wakes on an abort). The loop body is pynetdicom 3.0's own (MIT
licence), with only the waiting changed.

(The DUL thread's own 1 ms poll stays: pynetdicom binds the DUL thread's target
when it creates it, so a subclass swapped in later never runs.)
"""

import queue

from pynetdicom import evt
from pynetdicom.association import Association

# The longest the loop sleeps without news: it bounds how late an A-RELEASE and
# the network timeout are noticed.
IDLE_WAIT = 0.02


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
    """Switch a new acceptor association (thread not started) to the waking loop."""
    assoc.__class__ = WakingAssociation
