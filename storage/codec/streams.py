"""A dataset in a stream (a BytesIO off the wire, a file after its meta): its
bytes lent to a walk without a copy, or inflated; or the dataset read by
pydicom, for what the walk does not read."""

import contextlib
import io
import mmap
import os
import zlib
from collections.abc import Iterator
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from storage.codec.datasets import value_text
from storage.codec.walk import PIXEL_DATA_TAGS, HeaderError

_INFLATE_CHUNK = 1024 * 1024


def inflate(stream: BinaryIO, cap: int) -> tuple[io.BytesIO, bool]:
    """The dataset a raw deflate stream holds, inflated (at most `cap` bytes of
    it: a hostile "zip bomb" must not make us work without end), and whether it
    is all of it (False: the cap was hit).

    Raises HeaderError when the deflate stream is corrupt or ends before its
    final block (the dataset is truncated).
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = bytearray()
    try:
        while not inflater.eof:
            room = cap - len(inflated)
            if room <= 0:
                return io.BytesIO(inflated), False
            data = inflater.unconsumed_tail or stream.read(_INFLATE_CHUNK)
            if not data:
                raise HeaderError(
                    f"dataset is truncated: deflate stream ends early,"
                    f" after {len(inflated)} inflated bytes"
                )
            inflated += inflater.decompress(data, room)
    except zlib.error as exc:
        raise HeaderError(f"deflated dataset does not inflate: {exc}") from exc
    return io.BytesIO(inflated), True


@contextlib.contextmanager
def encoded_bytes(stream: BinaryIO) -> Iterator[tuple[object, int]]:
    """(buffer, start): bytes holding the dataset of `stream` from `start`, for
    a walk, without copying them. The stream's position is unchanged.

    A BytesIO lends its buffer (released on exit, so the BytesIO may grow
    again); a file is mapped, so a large object received to disk is not read
    into memory; anything else is read and the position restored.
    """
    start = stream.tell()
    if isinstance(stream, io.BytesIO):
        with stream.getbuffer() as view:
            yield view, start
        return
    try:
        fileno = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fileno = None
    if fileno is not None:
        flush = getattr(stream, "flush", None)
        if flush is not None and getattr(stream, "writable", lambda: False)():
            flush()  # a spool file still being written: map what it holds
        if os.fstat(fileno).st_size <= start:
            yield b"", 0  # nothing after the position (mmap refuses an empty file)
            return
        with (
            mmap.mmap(fileno, 0, access=mmap.ACCESS_READ) as mapped,
            memoryview(mapped) as view,
        ):
            yield view, start
        return
    data = stream.read()
    stream.seek(start)
    yield data, 0


class DatasetElements:
    """The elements of a Dataset read by pydicom, as `WalkedElements` gives
    those of the walk: `text(tag)` and `items(tag)`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def text(self, tag: int) -> str | None:
        """The value as one string (see `value_text`), or None when absent,
        empty or not convertible."""
        try:
            element = self.dataset.get(tag)
            if element is None:
                return None
            value = element.value
        except Exception:
            return None
        return value_text(value)

    def items(self, tag: int) -> list[Dataset]:
        try:
            element = self.dataset.get(tag)
            return list(element.value) if element is not None and element.value else []
        except Exception:
            return []


def read_with_pydicom(
    stream: BinaryIO, *, implicit: bool, little_endian: bool, tags: list[int]
) -> DatasetElements:
    """The elements `tags` of the dataset in `stream`, read by pydicom up to the
    pixel data. Raises HeaderError("dataset does not parse: ...") where pydicom
    fails (call it inside `with lenient_reading`)."""
    try:
        dataset = read_dataset(
            stream, implicit, little_endian, stop_when=_at_pixel_data, specific_tags=tags
        )
    except Exception as exc:  # pydicom raises many kinds on malformed input
        raise HeaderError(f"dataset does not parse: {exc}") from exc
    return DatasetElements(dataset)


def _at_pixel_data(tag, vr, length) -> bool:
    return tag in PIXEL_DATA_TAGS
