"""Large objects go to disk while they arrive, not to memory.

pynetdicom accumulates each received dataset in an `io.BytesIO` that it creates
by name in `pynetdicom.dimse_messages`. `SpoolingDataset` is a BytesIO that keeps
the first `threshold` bytes in memory — the fast path for ordinary images — and
past that moves everything to a temporary file under the data directory's
`.incoming` (same filesystem as the archive). The file is deleted when closed,
which also happens when an association aborts and pynetdicom drops the message.
"""

import io
import tempfile
from pathlib import Path

import pynetdicom.dimse_messages


class SpoolingDataset(io.BytesIO):
    threshold: int = 64 * 1024 * 1024
    directory: Path | None = None

    def __init__(self, *args):
        super().__init__(*args)
        self.spool = None  # the temp file, once the dataset outgrew memory

    def write(self, data) -> int:
        if self.spool is None:
            if self.directory is None or self.tell() + len(data) <= self.threshold:
                return super().write(data)
            # Lives as long as this message: closing it (or dropping it) deletes it.
            self.spool = tempfile.NamedTemporaryFile(  # noqa: SIM115
                dir=self.directory, prefix="spool-", suffix=".part"
            )
            with self.getbuffer() as received:
                self.spool.write(received)
            self.seek(0)
            self.truncate()
        return self.spool.write(data)

    def received(self):
        """The dataset as received: this BytesIO, or the spool file (flushed)."""
        if self.spool is None:
            return self
        self.spool.flush()
        return self.spool


def discard_partial(assoc) -> None:
    """Delete the spool file of a dataset whose transfer broke off.

    pynetdicom keeps the unfinished message until the association object is
    garbage collected (it sits in a reference cycle), which may be much later.
    """
    message = getattr(assoc.dimse, "message", None)
    data_set = getattr(message, "data_set", None)
    if isinstance(data_set, SpoolingDataset) and data_set.spool is not None:
        data_set.spool.close()


def install_spooling(directory: Path, threshold: int) -> None:
    SpoolingDataset.directory = Path(directory)
    SpoolingDataset.threshold = threshold
    pynetdicom.dimse_messages.BytesIO = SpoolingDataset
