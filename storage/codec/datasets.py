"""Small datasets read with pydicom, their values converted leniently.

A sender's odd value (an IS of "abc", a DA range in a C-FIND key, a UID with a
letter) must not stop us or fill our log: pydicom's reading validation (its
WARN default) logs and warns about each such value, and costs a check per
value. pydicom has no per-call setting for it. So the `imaging-scp` command
turns it off for its whole process when it starts (`read_leniently_everywhere`:
pynetdicom and pydicom's UID names read peers' values too), and our own readers
turn it off around what they read (`lenient_reading`), whoever imported them:
importing this project changes nothing in pydicom.
"""

import io
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

from pydicom import config
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from storage.codec.syntax import transfer_syntax

_readers_lock = threading.Lock()
_readers = 0
_saved_mode: int | None = None


@contextmanager
def lenient_reading() -> Iterator[None]:
    """pydicom converts values without validating them inside this block (in
    any thread: the setting is pydicom's, for the whole process, while a block
    is open)."""
    global _readers, _saved_mode
    with _readers_lock:
        if _readers == 0:
            _saved_mode = config.settings.reading_validation_mode
            config.settings.reading_validation_mode = config.IGNORE
        _readers += 1
    try:
        yield
    finally:
        with _readers_lock:
            _readers -= 1
            if _readers == 0:
                config.settings.reading_validation_mode = _saved_mode


def read_leniently_everywhere() -> None:
    """pydicom reads without validating, in this process, from now on: for the
    `imaging-scp` command, whose every part reads what peers send."""
    global _saved_mode
    with _readers_lock:
        config.settings.reading_validation_mode = config.IGNORE
        _saved_mode = config.IGNORE  # what the last open `lenient_reading` gives back


def decode_dataset(data: bytes, syntax_uid: str) -> Dataset:
    """The dataset encoded in `data` in transfer syntax `syntax_uid`, every value
    converted (leniently, see `lenient_reading`). A value pydicom cannot
    convert is left to fail where it is read, as it would have without this."""
    syntax = transfer_syntax(syntax_uid)
    if syntax.deflated:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    dataset = read_dataset(io.BytesIO(data), syntax.implicit, syntax.little_endian)
    with lenient_reading():
        _convert_values(dataset)
    return dataset


def _convert_values(dataset: Dataset) -> None:
    for tag in list(dataset.keys()):
        try:
            element = dataset[tag]
        except Exception:  # pydicom raises many kinds on a malformed value
            continue
        if element.VR == "SQ":
            for item in element.value:
                _convert_values(item)
