"""Small datasets read with pydicom, their values converted leniently.

A sender's odd value (an IS of "abc", a DA range in a C-FIND key, a UID with a
letter) must not stop us or fill our log: pydicom's reading validation (its
WARN default) logs and warns about each such value, and costs a check per
value. pydicom has no per-call setting for it. So the `imaging-scp` command
turns it off for its whole process when it starts (`lenient_reading.everywhere`:
pynetdicom and pydicom's UID names read peers' values too), and our own readers
turn it off around what they read (`with lenient_reading`), whoever imported them:
importing this project changes nothing in pydicom.
"""

import io
import threading
import warnings
import zlib

from pydicom import config
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import correct_ambiguous_vr, write_dataset

from storage.codec.syntax import transfer_syntax


class _LenientReading:
    """`with lenient_reading:` pydicom converts values without validating them
    inside the block (in any thread: the setting is pydicom's, for the whole
    process, while a block is open). A class, not a generator: it is on the
    receive path, once per instance."""

    def __init__(self):
        self._lock = threading.Lock()
        self._readers = 0
        self._saved_mode = config.IGNORE
        self._everywhere = False  # set for good: nothing to count

    def __enter__(self) -> None:
        if self._everywhere:
            return
        with self._lock:
            if self._readers == 0:
                self._saved_mode = config.settings.reading_validation_mode
                if self._saved_mode != config.IGNORE:
                    config.settings.reading_validation_mode = config.IGNORE
            self._readers += 1

    def __exit__(self, *exc_info) -> None:
        if self._everywhere:
            return
        with self._lock:
            self._readers -= 1
            if self._readers == 0 and self._saved_mode != config.IGNORE:
                config.settings.reading_validation_mode = self._saved_mode

    def everywhere(self) -> None:
        """pydicom reads without validating, in this process, from now on: for
        the `imaging-scp` command, whose every part reads what peers send
        (pynetdicom, and pydicom's names of their UIDs, too). A character set
        pydicom does not know, or a file meta whose VRs it must guess (STOW-RS),
        it both logs (its logger: serve's log, as JSON) and warns about; the
        warning would be a raw line on stderr, for serve and the web and for the
        admin at a `rebuild`, once per file: the log says it."""
        with self._lock:
            config.settings.reading_validation_mode = config.IGNORE
            self._saved_mode = config.IGNORE  # what a block still open gives back
            self._everywhere = True
        warnings.filterwarnings(
            "ignore", category=UserWarning, module=r"pydicom\.(charset|filereader)"
        )


lenient_reading = _LenientReading()


def decode_dataset(data: bytes, syntax_uid: str) -> Dataset:
    """The dataset encoded in `data` in transfer syntax `syntax_uid`, every value
    converted (leniently, see `lenient_reading`). A value pydicom cannot
    convert is left to fail where it is read, as it would have without this."""
    syntax = transfer_syntax(syntax_uid)
    if syntax.deflated:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    dataset = read_dataset(io.BytesIO(data), syntax.implicit, syntax.little_endian)
    with lenient_reading:
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


def reencode_dataset(data: bytes, from_uid: str, to_uid: str) -> bytes:
    """A data set in `from_uid` encoded again in `to_uid`, both native little
    endian syntaxes (explicit or implicit VR, deflated only as the source):
    the values' bytes as they were, the VRs from the dictionary when they were
    implicit (UN for an unknown private element)."""
    source, target = transfer_syntax(from_uid), transfer_syntax(to_uid)
    if source.encapsulated or target.encapsulated or target.deflated:
        raise ValueError(f"no conversion from {from_uid} to {to_uid}")
    if source.deflated:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    with lenient_reading:
        dataset = read_dataset(io.BytesIO(data), source.implicit, source.little_endian)
        correct_ambiguous_vr(dataset, True)
        out = DicomBytesIO()
        out.is_little_endian = True
        out.is_implicit_VR = target.implicit
        write_dataset(out, dataset)
    return out.getvalue()


def value_text(value) -> str | None:
    """A converted value as one string (multiple values joined by a backslash,
    as DICOM writes them), stripped of padding; None when empty."""
    if value is None:
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(item) for item in value)
    text = str(value).strip().strip("\x00").strip()
    return text or None
