"""Instance files on disk: encoding the file header, durable writes, the layout.

A stored file is the 128-byte preamble, ``DICM``, our file meta group, and then the
dataset bytes exactly as received, from where the meta group's length says it ends
(`dataset_offset`: the one definition ingest and every reader use). Files are
written to a temporary name under ``<data>/.incoming/<node>`` (same filesystem),
fsynced, and renamed into ``<data>/<study>/<series>/<sop>.dcm``; the directory is
fsynced after the rename so the new name survives a power cut too.
"""

import hashlib
import itertools
import json
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from storage.codec.datasets import decode_dataset
from storage.codec.elements import encode_element, pad
from storage.codec.syntax import EXPLICIT_VR_LITTLE_ENDIAN

# Generated once with pydicom.uid.generate_uid(entropy_srcs=["imaging-scp"]).
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.11069188136420714549864405244484754416"
IMPLEMENTATION_VERSION_NAME = "IMAGING_SCP_01"

INCOMING_DIR = ".incoming"
CONFLICTS_DIR = "conflicts"
TEMP_SUFFIX = ".part"
INSTANCE_SUFFIX = ".dcm"

_PREAMBLE = b"\x00" * 128 + b"DICM"
# The elements of our file meta that are the same in every file, encoded once.
_VERSION = encode_element(0x00020001, "OB", b"\x00\x01")
_IMPLEMENTATION = encode_element(
    0x00020012, "UI", pad(IMPLEMENTATION_CLASS_UID.encode(), b"\x00")
) + encode_element(0x00020013, "SH", pad(IMPLEMENTATION_VERSION_NAME.encode()))
_PRIVATE_INFORMATION_CREATOR = encode_element(
    0x00020100, "UI", pad(IMPLEMENTATION_CLASS_UID.encode(), b"\x00")
)


def encode_file_header(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, receipt: dict
) -> bytes:
    """Preamble, magic and File Meta Information group (Explicit VR Little Endian).

    `receipt` (when and from whom the object arrived: received_at, calling_ae,
    called_ae, peer, association_id) is kept in the file itself, as Sending and
    Receiving AE Title and as Private Information under our implementation UID,
    so the index can be rebuilt from the files alone.
    """
    elements = [
        _VERSION,
        encode_element(0x00020002, "UI", pad(sop_class_uid.encode(), b"\x00")),
        encode_element(0x00020003, "UI", pad(sop_instance_uid.encode(), b"\x00")),
        encode_element(0x00020010, "UI", pad(transfer_syntax.encode(), b"\x00")),
        _IMPLEMENTATION,
    ]
    for tag, key in ((0x00020017, "calling_ae"), (0x00020018, "called_ae")):
        title = receipt.get(key)
        if title and title.isascii():
            elements.append(encode_element(tag, "AE", pad(title.encode()[:16])))
    elements.append(_PRIVATE_INFORMATION_CREATOR)
    elements.append(encode_element(0x00020102, "OB", pad(json.dumps(receipt).encode())))
    body = b"".join(elements)
    group_length = encode_element(0x00020000, "UL", struct.pack("<I", len(body)))
    return _PREAMBLE + group_length + body


@dataclass(frozen=True)
class FileMeta:
    """What a stored file says about itself."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    transfer_syntax: str | None
    dataset_offset: int
    receipt: dict


def read_file_meta(path: Path) -> FileMeta:
    """Read a DICOM file's meta group (ours or another writer's): the elements
    its group length covers (see `dataset_offset`).

    Raises ValueError when the file is not a DICOM file with a meta group.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(_GROUP_LENGTH_END)
            offset = dataset_offset(head)
            group = handle.read(offset - len(head))
        if len(group) != offset - len(head):
            raise ValueError(f"the file ends inside its meta group ({offset} bytes)")
        meta = decode_dataset(head[len(_PREAMBLE) :] + group, EXPLICIT_VR_LITTLE_ENDIAN)
    except Exception as exc:
        raise ValueError(f"{path}: not a DICOM file with file meta: {exc}") from exc
    receipt = {}
    if _meta_text(meta, "PrivateInformationCreatorUID") == IMPLEMENTATION_CLASS_UID:
        try:
            receipt = json.loads(bytes(meta.PrivateInformation).rstrip(b" \x00"))
        except ValueError:
            receipt = {}
    return FileMeta(
        sop_class_uid=_meta_text(meta, "MediaStorageSOPClassUID"),
        sop_instance_uid=_meta_text(meta, "MediaStorageSOPInstanceUID"),
        transfer_syntax=_meta_text(meta, "TransferSyntaxUID"),
        dataset_offset=offset,
        receipt=receipt,
    )


# Preamble, DICM and the File Meta Information Group Length element (UL, 4 bytes).
_GROUP_LENGTH_END = len(_PREAMBLE) + 12
# A meta group larger than this is no file of ours or anybody's.
_MAX_META = 1024 * 1024


def dataset_offset(head: bytes) -> int:
    """Where the dataset of a stored file starts, given the file's first bytes
    (at least its preamble, DICM and group length element): right after the
    meta group, as long as its File Meta Information Group Length (0002,0000)
    says. Ingest hashes the dataset from there, and every reader of a stored
    file finds it there.

    Never by reading on while elements are of group 0002: a sender may send
    such an element as the first of its dataset (dcmtk does, with a file whose
    group length leaves an element out), and it is then part of the dataset
    as received. Raises ValueError for a file without a group length (which
    PS3.10 7.1 requires, and every file written here has).
    """
    if len(head) < _GROUP_LENGTH_END or not head.startswith(_PREAMBLE):
        raise ValueError("no DICM preamble")
    tag, vr, length = struct.unpack_from("<I2sH", head, len(_PREAMBLE))
    if (tag, vr, length) != (0x0000_0002, b"UL", 4):
        raise ValueError(
            "its file meta does not begin with the File Meta Information Group Length (0002,0000)"
        )
    (group_length,) = struct.unpack_from("<I", head, len(_PREAMBLE) + 8)
    if group_length > _MAX_META:
        raise ValueError(f"File Meta Information Group Length {group_length} is implausible")
    return _GROUP_LENGTH_END + group_length


def _meta_text(meta, keyword: str) -> str | None:
    value = meta.get(keyword)
    return str(value).strip("\x00 ") or None if value is not None else None


def instance_relpath(study_uid: str, series_uid: str, sop_instance_uid: str) -> PurePosixPath:
    """Where an instance lives, relative to the data directory. UIDs must be valid."""
    return PurePosixPath(study_uid, series_uid, sop_instance_uid + INSTANCE_SUFFIX)


def conflict_relpath(sop_instance_uid: str, sha256: str) -> PurePosixPath:
    """Where a second, different copy of an instance is kept aside."""
    return PurePosixPath(CONFLICTS_DIR, sop_instance_uid, sha256[:16] + INSTANCE_SUFFIX)


@dataclass(frozen=True)
class TempFile:
    """A durable file under a temporary name, not yet visible in the layout."""

    path: Path


def holds_dataset(path: Path, sha256: str, size: int | None = None) -> bool:
    """Whether the stored file at `path` still holds the dataset whose SHA-256 was
    recorded at receipt (and, when given, has the file size recorded)."""
    try:
        if size is not None and os.stat(path).st_size != size:
            return False
        return file_dataset_digest(path) == sha256
    except (OSError, ValueError):  # gone, unreadable, or no longer a DICOM file
        return False


def file_dataset_digest(path: Path) -> str:
    """SHA-256 of a stored file's dataset (the bytes after its meta group)."""
    offset = read_file_meta(path).dataset_offset
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


_temp_numbers = itertools.count()


def _temp_name() -> str:
    # Unique across the listener processes sharing `.incoming` (pid), and
    # cheaper than a random UUID on every object; O_EXCL guards the rest.
    return f"{os.getpid():x}-{time.time_ns():x}-{next(_temp_numbers)}{TEMP_SUFFIX}"


def incoming_dir(data_dir: Path, node: str) -> Path:
    """Where one node's temporary files are: ``.incoming/<node>``. Only that
    node's startup recovery touches them (several nodes share a data dir)."""
    return Path(data_dir) / INCOMING_DIR / node


NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class TempWriter:
    """A new temporary file in a node's `.incoming` directory that a dataset is
    written to as it arrives, after `head` (the file header), which goes out
    with its first bytes. `durable()` fsyncs and closes it; `discard()` removes
    it. On an OSError from a write the file is left to the caller to discard."""

    def __init__(self, incoming: Path, head: bytes = b""):
        self.path = incoming / _temp_name()
        self.size = len(head)
        self._head = head
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def write(self, data) -> None:
        fd = self._fd
        if self._head:
            head, self._head = self._head, b""
            written = os.writev(fd, [head, data])
            if written < len(head):
                self._write_all(fd, memoryview(head)[written:])
                written = len(head)
            self._write_all(fd, memoryview(data)[written - len(head) :])
        else:
            self._write_all(fd, memoryview(data))
        self.size += len(data)

    @staticmethod
    def _write_all(fd: int, view: memoryview) -> None:
        while view:
            view = view[os.write(fd, view) :]

    def durable(self) -> TempFile:
        try:
            if self._head:  # nothing came after it
                head, self._head = self._head, b""
                self._write_all(self._fd, memoryview(head))
            os.fsync(self._fd)
        finally:
            self._close()
        return TempFile(path=self.path)

    def discard(self) -> None:
        self._close()
        self.path.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def link_into_place(
    data_dir: Path, temp: TempFile, relpath: "PurePosixPath | str", *, replace: bool = True
) -> None:
    """Give a durable temp file its final name, durably, keeping the temp name.

    The temp name is removed by the caller only once the index has committed:
    until then it marks the object as "placed, maybe not indexed", which is what
    startup recovery looks for (`placed_path`). A file already at the final name
    (policy overwrite) is replaced atomically, or, without `replace`, raises
    FileExistsError.
    """
    # Strings, not Paths, and the directory made only when the link finds it
    # missing: this runs for every instance.
    final = os.path.join(data_dir, relpath)
    try:
        try:
            os.link(temp.path, final)
        except FileNotFoundError:  # the series' first instance
            ensure_directory(data_dir, Path(final).parent)
            os.link(temp.path, final)
    except FileExistsError:
        if not replace:
            raise
        # Staged in .incoming, where startup recovery looks: a crash between
        # the two steps leaves nothing stray in the study tree.
        staging = temp.path.with_name(_temp_name())
        os.link(temp.path, staging)
        os.replace(staging, final)
    fsync_directory(os.path.dirname(final))


def placed_path(
    data_dir: Path, temp: Path, candidates: list[PurePosixPath]
) -> PurePosixPath | None:
    """Which of `candidates` is a temp file's final name, if it was placed."""
    for relpath in candidates:
        try:
            if os.path.samefile(temp, data_dir / relpath):
                return relpath
        except FileNotFoundError:
            continue
    return None


def ensure_directory(data_dir: Path, directory: Path) -> None:
    """Create `directory` (inside `data_dir`) with every new level fsynced into its parent."""
    if directory.is_dir():
        return
    missing = []
    level = directory
    while not level.is_dir() and level != data_dir:
        missing.append(level)
        level = level.parent
    for level in reversed(missing):
        try:
            level.mkdir()
        except FileExistsError:
            continue  # a concurrent association created it
        fsync_directory(level.parent)


def fsync_directory(directory: "Path | str") -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_data_dir(data_dir: Path, node: str, *, every_node: bool = False) -> list[Path]:
    """Create the data directory layout; return the temp files a crash of this
    node left (see `link_into_place`), oldest first — with `every_node`, those
    of every node's directory (an index no other machine writes to). Files
    directly in `.incoming` are an earlier version's, and this node's."""
    root = Path(data_dir) / INCOMING_DIR
    own = incoming_dir(data_dir, node)
    own.mkdir(parents=True, exist_ok=True)
    directories = [root, own]
    if every_node:
        directories = [root, *sorted(path for path in root.iterdir() if path.is_dir())]
    temps = [temp for directory in directories for temp in directory.glob("*" + TEMP_SUFFIX)]
    return sorted(temps, key=lambda path: path.stat().st_mtime_ns)
