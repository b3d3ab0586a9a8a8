"""DICOMweb (PS3.18) over the index, at /dicomweb: QIDO-RS searches with the
C-FIND matching code (CatalogReader.find), WADO-RS retrieves of the stored
files as stored, their metadata and frames, WADO-URI, and STOW-RS
(scp.web.stow).

Retrieves read the file paths from the index and stream the files from disk,
read straight into blocks of the response: memory does not grow with the study.
Every file is checked before the first byte is sent, so a missing one is a 500
(and a `web.file_missing` event), never a body that looks complete; a file that
vanishes mid-stream ends the connection without the closing boundary. A client
that demands Explicit VR Little Endian gets each file stored in another
uncompressed little-endian syntax converted (one instance in memory at a time);
any other demand is a 406.
"""

import io
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import pydicom
import structlog
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.encaps import get_frame
from pydicom.valuerep import AMBIGUOUS_VR, BYTES_VR, VR
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from scp.config import Config
from scp.server import open_store
from scp.web import index
from scp.web.stow import StowRs
from storage.catalog import find
from storage.catalog.lifecycle import OFFLINE, UNAVAILABLE
from storage.catalog.reads import CatalogReader
from storage.codec.syntax import EXPLICIT_VR_LITTLE_ENDIAN, transfer_syntax
from storage.documents import dicom_json
from storage.files import prepare_data_dir
from storage.store import InstanceStore

log = structlog.get_logger("imaging_scp")

DICOM_JSON = "application/dicom+json"
_UID = re.compile(r"[0-9.]{1,64}")
_CHUNK = 1 << 20
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
# A streamed body goes out in blocks of this size: each is one trip to the thread
# pool (StreamingResponse iterates there) and one write to the socket, where a
# piece at a time took three of each per instance. Not larger: on a kernel
# without preemption (PREEMPT_NONE, the servers' default) a write of a block to
# the socket holds its CPU for as long as it takes, and the listener's threads
# wait behind it. Measured beside a WADO-RS loop, a sleeping thread woke up late
# by 960 µs (p90) with 4 MiB blocks, 410 µs with 1 MiB, 95 µs with no loop; the
# listener's ingest kept 0.72-0.82x its rate alone with 4 MiB, 0.85-0.94x with 1 MiB.
_BLOCK = 1 << 20
# PS3.18 Table 10.6.3-3 to -5: what a search returns without includefield, as far
# as the index holds it (key_for drops the rest).
_DEFAULT_KEYS = {
    find.STUDY: [
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "InstanceAvailability",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ],
    find.SERIES: [
        "Modality",
        "SeriesInstanceUID",
        "SeriesNumber",
        "SeriesDescription",
        "NumberOfSeriesRelatedInstances",
        "InstanceAvailability",
        "StudyInstanceUID",
    ],
    find.IMAGE: [
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceAvailability",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
        "StudyInstanceUID",
        "SeriesInstanceUID",
    ],
}
_CONTROL = {"includefield", "limit", "offset", "fuzzymatching"}
_AS_STORED = ("*", None)


class _Refused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def routes(config: Config) -> list[Route]:
    api = _DicomWeb(config)
    stow = StowRs(lambda: _open_store(config), config.web_url)
    study, series = "/dicomweb/studies/{study}", "/dicomweb/studies/{study}/series/{series}"
    instance = series + "/instances/{instance}"
    return [
        Route("/dicomweb/studies", api.search, methods=["GET"]),
        Route("/dicomweb/studies", stow.store, methods=["POST"]),
        Route(study, stow.store, methods=["POST"]),
        Route(study + "/series", api.search, methods=["GET"]),
        Route(series + "/instances", api.search, methods=["GET"]),
        Route("/dicomweb/series", api.search, methods=["GET"]),
        Route(study + "/instances", api.search, methods=["GET"]),
        Route("/dicomweb/instances", api.search, methods=["GET"]),
        Route(study, api.retrieve, methods=["GET"]),
        Route(series, api.retrieve, methods=["GET"]),
        Route(instance, api.retrieve, methods=["GET"]),
        Route(study + "/metadata", api.metadata, methods=["GET"]),
        Route(series + "/metadata", api.metadata, methods=["GET"]),
        Route(instance + "/metadata", api.metadata, methods=["GET"]),
        Route(instance + "/frames/{frames}", api.frames, methods=["GET"]),
        Route(instance + "/bulkdata/{tag}", api.bulkdata, methods=["GET"]),
        Route("/wado", api.wado_uri, methods=["GET"]),
    ]


def _open_store(config: Config) -> InstanceStore:
    """The listener's own store setup (index timeout, health monitor). Temp files
    go to this node's .incoming directory, which the listener's start recovers
    (scp.server.recover): the web leaves them alone, a STOW-RS may be writing."""
    prepare_data_dir(config.data_dir, config.node)
    return open_store(config)


def _error(status: int, reason: str) -> Response:
    return JSONResponse({"error": reason}, status)


class _DicomWeb:
    def __init__(self, config: Config):
        self._config = config
        self._root = config.data_dir.resolve()

    def _reader(self) -> CatalogReader:
        return index.reader(self._config)

    # --- QIDO-RS -----------------------------------------------------------------------

    def search(self, request: Request) -> Response:
        params = request.path_params
        path = request.url.path
        level = (
            find.IMAGE
            if path.endswith("/instances")
            else find.SERIES
            if path.endswith("/series")
            else find.STUDY
        )
        keys: dict[str, str] = {}
        for name in ("study", "series"):
            if name in params:
                if not _UID.fullmatch(params[name]):
                    return _error(400, f"not a UID: {params[name]!r}")
                keys["StudyInstanceUID" if name == "study" else "SeriesInstanceUID"] = params[name]
        returned = list(_DEFAULT_KEYS[level])
        if level != find.STUDY and "study" not in params:  # relational: the study's too
            returned += _DEFAULT_KEYS[find.STUDY]
        limit, offset = None, 0
        try:
            for name, value in request.query_params.multi_items():
                if name == "includefield":
                    for field in value.split(","):
                        if field == "all":
                            returned += [k for k in find.KEYS if find.key_for(k, level)]
                        else:
                            returned.append(_keyword(field))
                elif name == "limit":
                    limit = _count(name, value)
                elif name == "offset":
                    offset = _count(name, value)
                elif name not in _CONTROL:
                    keys[_keyword(name)] = value
            query = {k: "" for k in returned} | keys
            query = {k: v for k, v in query.items() if find.key_for(k, level)}
            unsupported = sorted(set(keys) - set(query))
            if unsupported:
                raise _Refused(400, f"cannot match on {', '.join(unsupported)} here")
        except _Refused as exc:
            return _error(exc.status, str(exc))
        vrs = {k: (find.key_for(k, level).tag, find.key_for(k, level).vr) for k in query}
        vrs["RetrieveURL"] = (0x00081190, "UR")
        base = self._config.web_url + "/dicomweb"
        with self._reader() as reader:
            rows = islice(
                reader.find(find.Query(find.STUDY_ROOT, level, query)),
                offset,
                None if limit is None else offset + limit,
            )
            documents = []
            try:
                for match in rows:
                    if level != find.IMAGE:
                        url = f"{base}/studies/{match.get('StudyInstanceUID', '')}"
                        if level == find.SERIES:
                            url += f"/series/{match['SeriesInstanceUID']}"
                        match["RetrieveURL"] = url
                    documents.append(dicom_json(match, vrs))
            except find.QueryError as exc:  # a value its key cannot match, found as the query runs
                return _error(400, str(exc))
        return JSONResponse(documents, media_type=DICOM_JSON)

    # --- WADO-RS -----------------------------------------------------------------------

    def _files(self, study: str, series: str | None, instance: str | None) -> list[dict]:
        """The instances a retrieve sends, their files checked; _Refused when the
        study, series or instance is unknown, not available or a file is missing."""
        for uid in (study, series, instance):
            if uid is not None and not _UID.fullmatch(uid):
                raise _Refused(400, f"not a UID: {uid!r}")
        with self._reader() as reader:
            found = reader.study(study, self._config.stable_after)
            if found is None:
                raise _Refused(404, f"study {study} is not in the index")
            selected = [s for s in found["series"] if series is None or s["series_uid"] == series]
            if not selected:
                raise _Refused(404, f"series {series} is not in study {study}")
            for row in selected:
                if row["availability"] in (OFFLINE, UNAVAILABLE):
                    status = 404 if row["availability"] == OFFLINE else 410
                    raise _Refused(status, f"series {row['series_uid']} is {row['availability']}")
            if instance is not None:
                row = reader.instance(instance)
                if row is None or row["series_uid"] != series or row["study_uid"] != study:
                    raise _Refused(404, f"instance {instance} is not in series {series}")
                instances = [row]
            elif series is not None:
                instances = list(reader.instances(series_uid=series))
            else:
                instances = list(reader.instances(study_uid=study))
        for row in instances:
            row["file"] = self._file(row)
        return instances

    def _file(self, row: dict) -> Path:
        path = (self._root / row["path"]).resolve()
        if not path.is_relative_to(self._root) or not path.is_file():
            log.error(
                "web.file_missing", sop_instance_uid=row["sop_instance_uid"], path=row["path"]
            )
            raise _Refused(500, f"the file of instance {row['sop_instance_uid']} is missing")
        return path

    def retrieve(self, request: Request) -> Response:
        p = request.path_params
        try:
            wanted = _accepted_syntax(request.headers.get("accept"), "application/dicom")
            instances = self._files(p["study"], p.get("series"), p.get("instance"))
            if wanted not in _AS_STORED:
                unconvertible = {
                    row["transfer_syntax"]
                    for row in instances
                    if not _converts(row["transfer_syntax"], wanted)
                }
                if unconvertible:
                    raise _Refused(
                        406, f"stored as {', '.join(sorted(unconvertible))}, not {wanted}"
                    )
        except _Refused as exc:
            return _error(exc.status, str(exc))
        boundary = uuid.uuid4().hex
        parts = (
            (
                f"application/dicom; transfer-syntax={row['transfer_syntax']}",
                [_Span(row["file"])],
            )
            if wanted in _AS_STORED or row["transfer_syntax"] == wanted
            else (f"application/dicom; transfer-syntax={wanted}", _converted(row["file"], wanted))
            for row in instances
        )
        return StreamingResponse(
            _blocks(_multipart(parts, boundary)),
            media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
        )

    def metadata(self, request: Request) -> Response:
        p = request.path_params
        try:
            instances = self._files(p["study"], p.get("series"), p.get("instance"))
        except _Refused as exc:
            return _error(exc.status, str(exc))
        base = self._config.web_url + f"/dicomweb/studies/{p['study']}"

        def document(row: dict) -> dict:
            url = f"{base}/series/{row['series_uid']}/instances/{row['sop_instance_uid']}"
            dataset = pydicom.dcmread(row["file"], stop_before_pixels=True)
            return _json_model(dataset, url, row["sop_instance_uid"]) | _pixel_data_uri(
                dataset, url
            )

        return JSONResponse([document(row) for row in instances], media_type=DICOM_JSON)

    def bulkdata(self, request: Request) -> Response:
        p = request.path_params
        try:
            (row,) = self._files(p["study"], p["series"], p["instance"])
            tag = int(p["tag"], 16) if re.fullmatch(r"[0-9A-Fa-f]{8}", p["tag"]) else None
            # A large value is left unread (deferred) and streamed from its offset in
            # the file; a deflated file has no offsets, so it is read whole.
            deflated = transfer_syntax(row["transfer_syntax"]).deflated
            dataset = pydicom.dcmread(row["file"], defer_size=None if deflated else _CHUNK)
            if tag is None or tag not in dataset:
                raise _Refused(404, f"no bulk data {p['tag']} in this instance")
            element = dataset.get_item(tag, keep_deferred=True)
            vr = _vr_of(element)
            if vr not in _BULK_DATA_VRS:
                raise _Refused(404, f"{p['tag']} is not bulk data (VR {vr})")
        except _Refused as exc:
            return _error(exc.status, str(exc))
        if element.value is None:
            return _octets([[_Span(row["file"], element.value_tell, element.length)]])
        return _octets([[element.value]])  # its bytes as stored: not yet converted

    def frames(self, request: Request) -> Response:
        p = request.path_params
        try:
            numbers = [int(n) for n in p["frames"].split(",") if n.strip().isdecimal()]
            if not numbers or len(numbers) != len(p["frames"].split(",")) or 0 in numbers:
                raise _Refused(400, f"frame numbers start at 1: {p['frames']!r}")
            (row,) = self._files(p["study"], p["series"], p["instance"])
            frames = _frames(row["file"], row["transfer_syntax"], numbers)
        except _Refused as exc:
            return _error(exc.status, str(exc))
        return _octets([[frame] for frame in frames], row["transfer_syntax"])

    # --- WADO-URI ----------------------------------------------------------------------

    def wado_uri(self, request: Request) -> Response:
        q = request.query_params
        try:
            if q.get("requestType") != "WADO":
                raise _Refused(400, "requestType=WADO is required")
            content = q.get("contentType", "application/dicom")
            if content != "application/dicom":
                raise _Refused(406, f"contentType {content}: application/dicom only")
            uids = [q.get(k) for k in ("studyUID", "seriesUID", "objectUID")]
            if not all(uids):
                raise _Refused(400, "studyUID, seriesUID and objectUID are required")
            (row,) = self._files(*uids)
        except _Refused as exc:
            return _error(exc.status, str(exc))
        return StreamingResponse(_blocks([_Span(row["file"])]), media_type="application/dicom")


def _keyword(name: str) -> str:
    """A query key (a keyword or 8 hex digits) as its keyword."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        keyword = keyword_for_tag(int(name, 16))
    else:
        keyword = name if tag_for_keyword(name) is not None else ""
    if not keyword:
        raise _Refused(400, f"{name!r} is not a DICOM attribute")
    return keyword


def _count(name: str, value: str) -> int:
    if not re.fullmatch(r"[0-9]{1,18}", value):  # islice takes up to sys.maxsize
        raise _Refused(400, f"{name}: a number of at most 18 digits, got {value!r}")
    return int(value)


def _accepted_syntax(accept: str | None, media_type: str) -> str | None:
    """The transfer syntax an Accept header asks for (None: none named); _Refused
    (406) when it accepts no `media_type` at all."""
    if not accept or "*/*" in accept:
        return None
    for choice in accept.split(","):
        if media_type in choice or "multipart/related" in choice and "type=" not in choice:
            match = re.search(r"transfer-syntax=\"?([0-9.*]+)", choice)
            return match.group(1) if match else None
    raise _Refused(406, f'Accept: {accept}: only multipart/related; type="{media_type}"')


class _Span(NamedTuple):
    """A file's bytes from `start`, `length` of them or up to its end."""

    path: Path
    start: int = 0
    length: int | None = None


def _blocks(pieces: Iterable[bytes | _Span]) -> Iterator[memoryview]:
    """The pieces in blocks of _BLOCK bytes (the last one shorter), file bytes read
    straight into them. A file shorter than its span raises: the response ends
    without its closing boundary."""
    block, filled = memoryview(bytearray(_BLOCK)), 0
    for piece in pieces:
        with _reader(piece) as readinto:
            while got := readinto(block[filled:]):
                filled += got
                if filled == _BLOCK:
                    # A new block each time: the one sent may still be referenced.
                    yield block
                    block, filled = memoryview(bytearray(_BLOCK)), 0
    if filled:
        yield block[:filled]


@contextmanager
def _reader(piece: bytes | _Span) -> Iterator[Callable[[memoryview], int]]:
    """A readinto over the piece (0: its end), its file open meanwhile."""
    if isinstance(piece, bytes):
        yield io.BytesIO(piece).readinto
        return
    with piece.path.open("rb", buffering=0) as handle:
        handle.seek(piece.start)
        left = piece.length

        def readinto(into: memoryview) -> int:
            nonlocal left
            if left is None:
                return handle.readinto(into)
            got = handle.readinto(into[:left]) if left else 0
            if left and not got:
                raise OSError(f"{piece.path}: {left} bytes missing at its end")
            left -= got
            return got

        yield readinto


def _converts(stored: str, wanted: str) -> bool:
    """Whether a file stored as `stored` is sent as `wanted`: as it is, or converted
    from an uncompressed little-endian syntax to Explicit VR Little Endian, PS3.18's
    default for native pixel data (Implicit VR is not among its syntaxes)."""
    if stored == wanted:
        return True
    syntax = transfer_syntax(stored)
    return wanted == EXPLICIT_VR_LITTLE_ENDIAN and syntax.little_endian and not syntax.encapsulated


def _converted(path: Path, wanted: str) -> Iterator[bytes]:
    """The stored file re-encoded in `wanted`, read when its part is due."""
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = wanted
    encoded = io.BytesIO()
    dataset.save_as(encoded, enforce_file_format=True)
    yield encoded.getvalue()


def _multipart(parts, boundary: str) -> Iterator[bytes | _Span]:
    for content_type, body in parts:
        yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
        yield from body
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _octets(values, syntax_uid: str | None = None) -> Response:
    """Bulk data or frames, each value given as its pieces, one part each."""
    boundary = uuid.uuid4().hex
    part_type = "application/octet-stream"
    if syntax_uid:
        part_type += f"; transfer-syntax={syntax_uid}"
    return StreamingResponse(
        _blocks(_multipart(((part_type, pieces) for pieces in values), boundary)),
        media_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}',
    )


# The VRs the DICOM JSON model gives a BulkDataURI (pydicom's to_json_dict).
_BULK_DATA_VRS = (BYTES_VR | AMBIGUOUS_VR) - {VR.US_SS}


def _vr_of(element) -> str:
    if element.VR:
        return element.VR
    try:  # implicit VR: the dictionary's
        return dictionary_VR(element.tag)
    except KeyError:  # a private or unknown tag
        return VR.UN


def _json_model(dataset, url: str, instance: str) -> dict:
    """The dataset in the DICOM JSON model, binary values over 4 KiB as their
    BulkDataURI. An element the model cannot hold as stored (a DS or IS that is
    not a number, a VR pydicom does not know) is left out and logged: one odd
    value does not take a study's metadata away from a viewer."""

    def bulk_data_uri(element) -> str:
        return f"{url}/bulkdata/{int(element.tag):08X}"

    document = {}
    for tag in dataset.keys():  # noqa: SIM118 - iterating a Dataset converts every element
        try:
            document[f"{tag:08X}"] = dataset[tag].to_json_dict(bulk_data_uri, 4096)
        except Exception as exc:  # pydicom raises many kinds on values it cannot convert
            log.warning(
                "web.metadata_left_out",
                sop_instance_uid=instance,
                tag=f"{tag:08X}",
                reason=str(exc),
            )
    return document


def _pixel_data_uri(dataset, url: str) -> dict:
    """The Pixel Data a metadata request leaves out, as its BulkDataURI."""
    if not {"Rows", "Columns"} <= set(dataset.dir()):
        return {}
    # Ours, not pydicom's UID.is_encapsulated: that raises for a private syntax.
    vr = "OB" if transfer_syntax(dataset.file_meta.TransferSyntaxUID).encapsulated else "OW"
    return {"7FE00010": {"vr": vr, "BulkDataURI": f"{url}/bulkdata/7FE00010"}}


def _frames(path: Path, syntax_uid: str, numbers: list[int]) -> list[bytes]:
    """Frames `numbers` (from 1) of the Pixel Data as stored: slices of native
    pixels or the encapsulated fragments of each frame, read from the file
    alone (a large multi-frame object is not loaded)."""
    syntax = transfer_syntax(syntax_uid)
    if syntax.encapsulated:
        return _encapsulated_frames(path, numbers)
    # A deflated file has no offsets to seek to: read into memory.
    dataset = pydicom.dcmread(path, defer_size=None if syntax.deflated else _CHUNK)
    if "PixelData" not in dataset:
        raise _Refused(404, "this instance has no pixel data")
    _check_frame_numbers(dataset, numbers)
    size = dataset.Rows * dataset.Columns * dataset.SamplesPerPixel * dataset.BitsAllocated // 8
    pixels = dataset.get_item(0x7FE00010, keep_deferred=True)
    if pixels.value is not None:  # not deferred: small, or deflated
        return [pixels.value[(n - 1) * size : n * size] for n in numbers]
    with path.open("rb") as handle:
        frames = []
        for n in numbers:
            handle.seek(pixels.value_tell + (n - 1) * size)
            frames.append(handle.read(size))
        return frames


def _encapsulated_frames(path: Path, numbers: list[int]) -> list[bytes]:
    """Each frame found by the Extended or Basic Offset Table, or by the
    fragments' item headers, and read alone: a viewer asks for a cine's frames
    one at a time, and the object may run to gigabytes."""
    with path.open("rb") as handle:
        dataset = pydicom.dcmread(handle, stop_before_pixels=True)
        # pydicom leaves the file at the Pixel Data element: its tag, VR and
        # undefined length (12 bytes), then the Basic Offset Table item.
        if handle.read(12)[:4] != _PIXEL_DATA_TAG:
            raise _Refused(404, "this instance has no pixel data")
        count = _check_frame_numbers(dataset, numbers)
        extended = None
        if "ExtendedOffsetTable" in dataset and "ExtendedOffsetTableLengths" in dataset:
            extended = (dataset.ExtendedOffsetTable, dataset.ExtendedOffsetTableLengths)
        try:
            return [
                get_frame(handle, n - 1, number_of_frames=count, extended_offsets=extended)
                for n in numbers
            ]
        except ValueError as exc:  # fragments that do not make the frames announced
            raise _Refused(404, f"the stored pixel data does not hold the frame: {exc}") from exc


def _check_frame_numbers(dataset, numbers: list[int]) -> int:
    """The object's Number of Frames; 404 for a frame number past it."""
    count = int(dataset.get("NumberOfFrames", 1) or 1)
    if max(numbers) > count:
        raise _Refused(404, f"this instance has {count} frame(s)")
    return count
