"""The Query/Retrieve FIND service as SCP: C-FIND over the index.

A C-FIND-RQ's identifier is decoded (pydicom, in the request's character set)
into a `storage.catalog.find.Query`; the matches come from the catalog's
cursor one at a time and each becomes a Pending response, encoded by hand (a
response is a dozen short text elements and there may be thousands of them). The
association sends them one by one between its reads (`Outbox.stream`), so a
C-CANCEL-RQ is seen before the next response: the query ends with Cancel
(0xFE00) there.

Statuses: Pending 0xFF00, or 0xFF01 when the request has keys we do not
support (they come back empty); Success at the end; 0x0122 for a SOP class
that is no FIND model; 0xA900 for an identifier
that names no level or breaks the hierarchical rules, 0xC000 for one that
does not decode or is missing, 0xA700 when more than `find_limit` matches were sent.
"""

from pydicom.datadict import keyword_for_tag

from scp import dimse, metrics
from scp.association import (
    Conversation,
    Identifier,
    IndexResponses,
    Outbox,
    Refused,
    Session,
    failure_response,
)
from storage.catalog import find
from storage.catalog.engines import IndexLocation
from storage.catalog.health import IndexHealth
from storage.codec.datasets import decode_dataset
from storage.codec.elements import encode_element, pad
from storage.codec.syntax import transfer_syntax as syntax_of

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
ROOTS = {PATIENT_ROOT_FIND: find.PATIENT_ROOT, STUDY_ROOT_FIND: find.STUDY_ROOT}

SUCCESS = 0x0000
PENDING = 0xFF00
PENDING_WITH_UNSUPPORTED_KEYS = 0xFF01
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700
IDENTIFIER_DOES_NOT_MATCH = 0xA900
SOP_CLASS_NOT_SUPPORTED = 0x0122
UNABLE_TO_PROCESS = 0xC000
# How a query ends, as counted.
OUTCOMES = ("success", "cancelled", "refused", "failed")

_SPECIFIC_CHARACTER_SET = 0x00080005
_QUERY_RETRIEVE_LEVEL = 0x00080052
_RETRIEVE_AE_TITLE = 0x00080054
_NOT_KEYS = {_SPECIFIC_CHARACTER_SET, _QUERY_RETRIEVE_LEVEL, _RETRIEVE_AE_TITLE}
_UNIQUE_KEY = {
    find.PATIENT: "PatientID",
    find.STUDY: "StudyInstanceUID",
    find.SERIES: "SeriesInstanceUID",
    find.IMAGE: "SOPInstanceUID",
}


class FindService:
    def __init__(
        self,
        location: IndexLocation,
        aet: str,
        find_limit: int,
        index_health: IndexHealth,
        index_timeout: float,
    ):
        self.location = location
        self.index_timeout = index_timeout
        self.index_health = index_health  # told when a query finds the index damaged
        self.aet = aet
        self.find_limit = find_limit

    def join(self, session: Session) -> "FindConversation":
        return FindConversation(self, session)


class FindConversation(Conversation):
    def __init__(self, service: FindService, session: Session):
        self.service = service
        self.session = session

    def request(self, command: dimse.Command, outbox: Outbox) -> "IncomingQuery | None":
        if command.has_dataset:
            return IncomingQuery(self.service, self.session, command, outbox)
        self.session.log.warning("find.refused", reason="C-FIND-RQ without an identifier")
        if metrics.recorder is not None:
            metrics.recorder.find_ended("refused", 0)
        outbox.send(failure_response(command, UNABLE_TO_PROCESS, "C-FIND-RQ without an identifier"))
        return None


class IncomingQuery(Identifier):
    """A C-FIND-RQ's identifier on its way in, then the query it asks."""

    def __init__(self, service: FindService, session: Session, command, outbox: Outbox):
        super().__init__(command, outbox)
        self.service = service
        self.session = session
        self.transfer_syntax = outbox.transfer_syntax

    def finish(self) -> None:
        """Answer with the query's responses, streamed; the first may be a failure."""
        self.outbox.stream(lambda: RunningQuery(self, bytes(self._data)))


class RunningQuery(IndexResponses):
    """One C-FIND being answered: `next_response` gives one response at a time
    until `done`."""

    def __init__(self, incoming: IncomingQuery, data: bytes):
        super().__init__(incoming.service, incoming.session, incoming.command)
        syntax = syntax_of(incoming.transfer_syntax)
        self.explicit = not syntax.implicit
        try:
            if not syntax.little_endian:
                raise Refused(UNABLE_TO_PROCESS, "big endian identifiers are not served")
            self.query, self.returned, self.unsupported = self._read(incoming, data)
            find.check_query(self.query)
        except find.QueryError as exc:
            self._failure = Refused(IDENTIFIER_DOES_NOT_MATCH, str(exc))
        except Refused as refused:
            self._failure = refused
        if self._failure is None:
            self.session.log.info(
                "find.request",
                level=self.query.level,
                root=self.query.root,
                keys={k: v for k, v in self.query.keys.items() if v},
                unsupported=[keyword_for_tag(tag) or f"{tag:08X}" for tag, _ in self.unsupported],
            )

    def _read(self, incoming: IncomingQuery, data: bytes):
        root = ROOTS.get(self.command.uid(dimse.AFFECTED_SOP_CLASS_UID) or "")
        if root is None:
            raise Refused(
                SOP_CLASS_NOT_SUPPORTED,
                f"{self.command.uid(dimse.AFFECTED_SOP_CLASS_UID)} is no Patient or Study Root"
                " FIND model",
            )
        try:
            dataset = decode_dataset(data, incoming.transfer_syntax)
            level = str(dataset.get("QueryRetrieveLevel", "") or "").strip().upper()
            find.check_level(level)  # before the keys, which depend on it
            keys: dict[str, str] = {}
            returned: list[tuple[int, str]] = []  # (tag, keyword) in tag order
            unsupported: list[tuple[int, str]] = []  # (tag, VR)
            for element in dataset:
                tag = int(element.tag)
                if tag in _NOT_KEYS or element.tag.group == 0x0002:
                    continue
                keyword = element.keyword
                if find.key_for(keyword, level) is None or element.VR == "SQ":
                    # Implicit VR gives "UN", or "US or SS" for an ambiguous tag.
                    unsupported.append((tag, element.VR if len(element.VR) == 2 else "UN"))
                    continue
                keys[keyword] = _text(element.value)
                returned.append((tag, keyword))
        except (Refused, find.QueryError):
            raise
        except Exception as exc:  # pydicom raises many kinds on malformed data
            raise Refused(UNABLE_TO_PROCESS, f"identifier does not decode: {exc}") from exc
        unique = _UNIQUE_KEY.get(level)
        if unique and unique not in keys:  # the level's unique key is always returned
            keys[unique] = ""
            returned.append((find.KEYS[unique].tag, unique))
            returned.sort()
        return find.Query(root, level, keys), returned, unsupported

    # -- the responses -----------------------------------------------------------------

    def next_response(self) -> tuple[bytes, bytes]:
        """The next (command, identifier) to send; after the last one, `done`."""
        if self._failure is not None:
            return self._final(self._failure.status, self._failure.reason)
        if self.cancelled:
            return self._final(CANCEL)
        limit = self.service.find_limit
        try:
            if self._rows is None:
                self._rows = self._open_reader().find(self.query)
            match = next(self._rows, None)
        except find.QueryError as exc:
            return self._final(IDENTIFIER_DOES_NOT_MATCH, str(exc))
        except Exception as exc:
            return self._final(UNABLE_TO_PROCESS, self._index_failed(exc, "find.failed", "query"))
        if match is None:
            return self._final(SUCCESS)
        if limit and self.matches >= limit:
            return self._final(
                OUT_OF_RESOURCES, f"more than {limit} matches (find_limit): narrow the query"
            )
        self.matches += 1
        status = PENDING_WITH_UNSUPPORTED_KEYS if self.unsupported else PENDING
        return self._response(status, with_dataset=True), self._identifier(match)

    def _final(self, status: int, comment: str | None = None) -> tuple[bytes, bytes]:
        self.done = True
        self.close()
        if self._failure is not None or status not in (SUCCESS, CANCEL):
            outcome = "refused" if self._failure else "failed"
            self.session.log.warning(
                "find." + outcome,
                status=f"0x{status:04X}",
                reason=comment,
                matches=self.matches,
            )
        else:
            self.session.log.info(
                "find.end",
                matches=self.matches,
                ms=self._ms(),
                cancelled=status == CANCEL,
            )
            outcome = "cancelled" if status == CANCEL else "success"
        if metrics.recorder is not None:
            metrics.recorder.find_ended(outcome, self.matches)
        return self._response(status, comment=comment), b""

    def _response(self, status: int, *, comment=None, with_dataset=False) -> bytes:
        return dimse.response(
            dimse.C_FIND_RSP,
            self.message_id,
            status,
            sop_class_uid=self.command.uid(dimse.AFFECTED_SOP_CLASS_UID),
            error_comment=comment,
            with_dataset=with_dataset,
        )

    def _identifier(self, match: dict) -> bytes:
        elements: list[tuple[int, str, bytes]] = []
        non_ascii = False
        for tag, keyword in self.returned:
            key = find.key_for(keyword, self.query.level)
            value = _value_bytes(match.get(keyword), key.vr)
            if value is None:
                value = _value_bytes(match[keyword], key.vr, "utf-8")
                non_ascii = True
            elements.append((tag, key.vr, value))
        elements += [(tag, vr, b"") for tag, vr in self.unsupported]
        elements.append((_QUERY_RETRIEVE_LEVEL, "CS", pad(self.query.level.encode())))
        elements.append((_RETRIEVE_AE_TITLE, "AE", pad(self.service.aet.encode())))
        if non_ascii:
            elements.append((_SPECIFIC_CHARACTER_SET, "CS", pad(b"ISO_IR 192")))
        elements.sort()
        return b"".join(
            encode_element(tag, vr, value, explicit=self.explicit) for tag, vr, value in elements
        )


def _text(value) -> str:
    """A requested value as text: "" when empty, values joined by backslash."""
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _value_bytes(value, vr: str, encoding: str = "ascii") -> bytes | None:
    """A value as the element's bytes, even length; None when it is not ASCII."""
    if value is None:
        return b""
    if isinstance(value, list):
        value = "\\".join(value)
    text = str(value)
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:
        return None
    return pad(data, b"\0" if vr == "UI" else b" ")
