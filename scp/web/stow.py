"""STOW-RS (PS3.18 10.5): `POST /dicomweb/studies` with a multipart/related body
of application/dicom parts. Each part goes through the same storage call as a
C-STORE's dataset (storage.store.InstanceStore.receive): the same checks and
refusals, duplicates policy and durability, the same index update and the same
`instance.stored` event (with `origin: stow-rs`, the client's address and its
token's name).

The body is parsed as it arrives (python-multipart's streaming parser): each
part's file meta group is read to announce the instance, and the dataset's
bytes go on to the temp file in `.incoming` as they come, so memory does not
grow with the upload. A part is stored when its closing boundary arrives; a
body cut off inside a part leaves nothing of that part behind.
"""

import io
import re
import struct
import uuid

import pydicom
import structlog
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from scp.store_service import REFUSAL_STATUS
from storage.catalog import Provenance
from storage.store import InstanceStore, Refusal, StoreRefused
from storage.uids import is_valid_uid

log = structlog.get_logger("imaging_scp")

DICOM_JSON = "application/dicom+json"
_PREAMBLE = 132  # 128 bytes and "DICM"
_MAX_META = 64 * 1024  # a file meta group larger than this is not one
# PS3.18 Failure Reasons (Table I.2-2) besides the C-STORE statuses.
_PROCESSING_FAILURE = 0x0110
_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?')


class _Part:
    """One application/dicom part on its way into the store."""

    def __init__(self, store: InstanceStore, provenance: Provenance):
        self._store = store
        self._provenance = provenance
        self._head = bytearray()
        self.incoming = None
        self.sop_class_uid = self.sop_instance_uid = None
        self.refused: StoreRefused | None = None
        self.failure_reason: int | None = None  # when not the refusal's C-STORE status

    def write(self, data: bytes) -> None:
        if self.incoming is not None:
            self.incoming.write(data)
            return
        if self.refused is not None:
            return
        self._head += data
        if len(self._head) < _PREAMBLE + 12:
            return
        if self._head[128:132] != b"DICM" or self._head[_PREAMBLE : _PREAMBLE + 4] != (
            b"\x02\x00\x00\x00"
        ):
            self.refused = StoreRefused(Refusal.UNREADABLE, "not a DICOM file (no DICM prefix)")
            return
        end = _PREAMBLE + 12 + struct.unpack("<I", self._head[_PREAMBLE + 8 : _PREAMBLE + 12])[0]
        if end > _MAX_META:
            self.refused = StoreRefused(Refusal.UNREADABLE, "file meta group too large")
            return
        if len(self._head) < end:
            return
        try:  # pydicom converts each value when it is first read: each can fail
            meta = pydicom.dcmread(io.BytesIO(bytes(self._head[:end]))).file_meta
            transfer_syntax = str(meta.TransferSyntaxUID)
            self.sop_class_uid = meta.get("MediaStorageSOPClassUID")
            self.sop_instance_uid = meta.get("MediaStorageSOPInstanceUID")
        except Exception as exc:  # pydicom's errors are many; any one: unreadable
            self.refused = StoreRefused(Refusal.UNREADABLE, f"unreadable file meta: {exc}")
            return
        if not is_valid_uid(transfer_syntax):
            # Over DICOM the negotiation admits only UIDs; this one would go into
            # the file, the index and WADO-RS's Content-Type as written.
            self.refused = StoreRefused(
                Refusal.UNREADABLE, f"Transfer Syntax UID {transfer_syntax!r} is not a UID"
            )
            self.failure_reason = _TRANSFER_SYNTAX_NOT_SUPPORTED
            return
        self.incoming = self._store.receive(
            transfer_syntax, self.sop_class_uid, self.sop_instance_uid, self._provenance
        )
        rest = bytes(self._head[end:])
        self._head = bytearray()
        if rest:
            self.incoming.write(rest)

    def finish(self):
        """The part is complete: its StoreResult; StoreRefused when refused."""
        if self.incoming is None:
            raise self.refused or StoreRefused(Refusal.UNREADABLE, "the part ends in its header")
        return self.incoming.finish()

    def discard(self) -> None:
        if self.incoming is not None:
            self.incoming.discard()


class StowRs:
    """Stores what STOW-RS requests bring; `store` is made on the first one."""

    def __init__(self, open_store, base_url: str):
        self._open_store = open_store
        self._store: InstanceStore | None = None
        self._base_url = base_url

    async def store(self, request: Request) -> Response:
        content_type = request.headers.get("content-type", "")
        boundary = _BOUNDARY.search(content_type)
        if not content_type.startswith("multipart/related") or boundary is None:
            return JSONResponse({"error": "multipart/related with a boundary only"}, 415)
        if "application/dicom" not in content_type:
            return JSONResponse({"error": 'type="application/dicom" parts only'}, 415)
        if self._store is None:
            self._store = await run_in_threadpool(self._open_store)
        client = request.client.host if request.client else None
        token = request.scope.get("state", {}).get("token_name")
        provenance = Provenance(peer=client, association_id=f"stow-{uuid.uuid4().hex[:12]}")
        stored, failed, current = [], [], []

        def begin():
            current.append(_Part(self._store, provenance))

        def data(chunk, start, end):
            current[-1].write(chunk[start:end])

        part_log = log.bind(origin="stow-rs", peer=client, token=token)

        def end_part():
            part = current.pop()
            try:
                result = part.finish()
            except StoreRefused as refused:
                failed.append((part, refused))
                part_log.warning(
                    "instance.refused",
                    request_sop_instance_uid=part.sop_instance_uid,
                    reason=refused.reason,
                    **refused.details,
                )
                return
            stored.append(result)
            part_log.info("instance.stored", **result.log_fields())

        ended = []
        parser = MultipartParser(
            boundary.group(1),
            {
                "on_part_begin": begin,
                "on_part_data": data,
                "on_part_end": end_part,
                "on_end": lambda: ended.append(True),
            },
        )
        problem = "the body ended before its closing boundary"
        try:
            async for chunk in request.stream():
                await run_in_threadpool(parser.write, chunk)
        except ClientDisconnect:
            pass
        except MultipartParseError as exc:  # e.g. a boundary that is not the announced one
            problem = f"not a multipart body with the announced boundary: {exc}"
        finally:
            for part in current:  # cut off inside a part: nothing of it stays
                part.discard()
        if not ended:
            part_log.warning("stow.incomplete", stored=len(stored), reason=problem)
            return JSONResponse({"error": problem} | self._answer(stored, failed), 400)
        status = 200 if not failed else 409 if not stored else 202
        return JSONResponse(self._answer(stored, failed), status, media_type=DICOM_JSON)

    def _answer(self, stored: list, failed: list) -> dict:
        """The PS3.18 store response: what was stored and what failed, and why."""
        answer = {}
        if stored:
            answer["00081199"] = {"vr": "SQ", "Value": [self._referenced(r) for r in stored]}
        if failed:
            answer["00081198"] = {
                "vr": "SQ",
                "Value": [
                    {
                        **_uids(part.sop_class_uid, part.sop_instance_uid),
                        "00081197": {
                            "vr": "US",
                            "Value": [
                                part.failure_reason
                                or REFUSAL_STATUS.get(refused.refusal, _PROCESSING_FAILURE)
                            ],
                        },
                    }
                    for part, refused in failed
                ],
            }
        return answer

    def _referenced(self, result) -> dict:
        """The instance, and the URL that retrieves what the index holds for it
        (a copy kept aside is not served: the first copy is, maybe elsewhere)."""
        header = result.header
        study, series = result.indexed_under or (header.study_uid, header.series_uid)
        url = (
            f"{self._base_url}/dicomweb/studies/{study}/series/{series}"
            f"/instances/{header.sop_instance_uid}"
        )
        return {
            **_uids(header.sop_class_uid, header.sop_instance_uid),
            "00081190": {"vr": "UR", "Value": [url]},
        }


def _uids(sop_class_uid, sop_instance_uid) -> dict:
    element = {}
    if sop_class_uid:
        element["00081150"] = {"vr": "UI", "Value": [str(sop_class_uid)]}
    if sop_instance_uid:
        element["00081155"] = {"vr": "UI", "Value": [str(sop_instance_uid)]}
    return element
