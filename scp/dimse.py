"""DIMSE command sets (PS3.7 §9, §E): group 0000, implicit VR little endian.

A command set is a flat list of a dozen short elements: reading one is a walk
over tag/length pairs, and writing a response is packing a few of them. Both
are done here by hand because they sit on the path of every C-STORE.
"""

import struct
from dataclasses import dataclass

_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")

# Command Field values (PS3.7 E.1)
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_FIND_RQ = 0x0020
C_FIND_RSP = 0x8020
C_GET_RQ = 0x0010
C_GET_RSP = 0x8010
C_MOVE_RQ = 0x0021
C_MOVE_RSP = 0x8021
C_CANCEL_RQ = 0x0FFF
N_EVENT_REPORT_RQ = 0x0100
N_EVENT_REPORT_RSP = 0x8100
N_ACTION_RQ = 0x0130
N_ACTION_RSP = 0x8130
NO_DATASET = 0x0101
WITH_DATASET = 0x0001  # any value but NO_DATASET (PS3.7 E.1)

# Elements (0000,eeee) by their element number
AFFECTED_SOP_CLASS_UID = 0x0002
REQUESTED_SOP_CLASS_UID = 0x0003
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
MOVE_DESTINATION = 0x0600
PRIORITY = 0x0700
COMMAND_DATA_SET_TYPE = 0x0800
STATUS = 0x0900
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE_UID = 0x1000
REQUESTED_SOP_INSTANCE_UID = 0x1001
EVENT_TYPE_ID = 0x1002
ACTION_TYPE_ID = 0x1008
REMAINING_SUB_OPERATIONS = 0x1020
COMPLETED_SUB_OPERATIONS = 0x1021
FAILED_SUB_OPERATIONS = 0x1022
WARNING_SUB_OPERATIONS = 0x1023
MOVE_ORIGINATOR_AE_TITLE = 0x1030
MOVE_ORIGINATOR_MESSAGE_ID = 0x1031

UNRECOGNIZED_OPERATION = 0x0211
_ERROR_COMMENT_LENGTH = 64  # LO
# Where words were left out of an ErrorComment: ASCII (LO's default repertoire),
# and apart from the last word, so that no number looks continued.
_LEFT_OUT = " ..."


class CommandError(ValueError):
    """Bytes that are not a command set."""


@dataclass(frozen=True)
class Command:
    """The elements of a received command set, by element number."""

    elements: dict[int, bytes]

    def us(self, element: int) -> int | None:
        value = self.elements.get(element)
        return _US.unpack_from(value)[0] if value is not None and len(value) >= 2 else None

    def uid(self, element: int) -> str | None:
        """A UI value with its padding removed; None when absent, empty or not ASCII."""
        value = self.elements.get(element)
        if value is None:
            return None
        try:
            text = value.decode("ascii").rstrip("\0 ")
        except UnicodeDecodeError:
            return None
        return text or None

    def text(self, element: int) -> str:
        """A text value (an ErrorComment) without its padding; "" when absent."""
        return self.elements.get(element, b"").decode("ascii", "replace").rstrip("\0 ")

    @property
    def field(self) -> int | None:
        return self.us(COMMAND_FIELD)

    @property
    def message_id(self) -> int | None:
        return self.us(MESSAGE_ID)

    @property
    def responds_to(self) -> int | None:
        return self.us(MESSAGE_ID_BEING_RESPONDED_TO)

    @property
    def status(self) -> int | None:
        return self.us(STATUS)

    @property
    def has_dataset(self) -> bool:
        return self.us(COMMAND_DATA_SET_TYPE) not in (None, NO_DATASET)


def read_command(data) -> Command:
    """Decode a command set; CommandError when an element runs past the end or
    is not of group 0000."""
    elements = {}
    end = len(data)
    pos = 0
    while pos < end:
        if end - pos < 8:
            raise CommandError(f"command set ends inside an element header at byte {pos}")
        group, element, length = _ELEMENT.unpack_from(data, pos)
        pos += 8
        if group != 0x0000:
            raise CommandError(f"element ({group:04X},{element:04X}) in a command set")
        if length > end - pos:
            raise CommandError(f"(0000,{element:04X}) length {length} runs past the command set")
        elements[element] = bytes(data[pos : pos + length])
        pos += length
    return Command(elements)


def _uid_value(uid: str) -> bytes:
    data = uid.encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def fitted_comment(text: str) -> str:
    """`text` as an ErrorComment holds it (LO: 64 characters): whole words from
    its start, then " ..." where the rest was left out (the log has it whole).
    A number, UID or tag is never cut; only a first word longer than the limit
    is, as nothing else could be sent. Reasons put what matters first."""
    text = " ".join(text.split())  # LO holds no control characters
    if len(text) <= _ERROR_COMMENT_LENGTH:
        return text
    room = _ERROR_COMMENT_LENGTH - len(_LEFT_OUT)
    kept = ""
    for word in text.split(" "):
        longer = f"{kept} {word}" if kept else word
        if len(longer) > room:
            break
        kept = longer
    # A clause's punctuation is no use before the marker; a UID never ends in one.
    return (kept.rstrip(",;:.") or text[:room]) + _LEFT_OUT


def _text_value(text: str) -> bytes:
    data = fitted_comment(text).encode("ascii", "replace")
    return data + b" " if len(data) % 2 else data


def encode_command(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set of (element, value) pairs in ascending order, with its group length."""
    body = b"".join(_ELEMENT.pack(0, element, len(value)) + value for element, value in elements)
    return _ELEMENT.pack(0, 0x0000, 4) + struct.pack("<I", len(body)) + body


def response(
    command_field: int,
    message_id: int,
    status: int,
    *,
    sop_class_uid: str | None = None,
    sop_instance_uid: str | None = None,
    error_comment: str | None = None,
    action_type: int | None = None,
    sub_operations: tuple[int | None, int, int, int] | None = None,
    with_dataset: bool = False,
) -> bytes:
    """A response command set; `with_dataset`: a dataset follows it.
    `sub_operations`: a retrieve's (remaining, completed, failed, warning)
    counts, remaining None where it is not sent (a final response)."""
    elements = []
    if sop_class_uid:
        elements.append((AFFECTED_SOP_CLASS_UID, _uid_value(sop_class_uid)))
    elements += [
        (COMMAND_FIELD, _US.pack(command_field)),
        (MESSAGE_ID_BEING_RESPONDED_TO, _US.pack(message_id)),
        (COMMAND_DATA_SET_TYPE, _US.pack(WITH_DATASET if with_dataset else NO_DATASET)),
        (STATUS, _US.pack(status)),
    ]
    if error_comment:
        elements.append((ERROR_COMMENT, _text_value(error_comment)))
    if sop_instance_uid:
        elements.append((AFFECTED_SOP_INSTANCE_UID, _uid_value(sop_instance_uid)))
    if action_type is not None:
        elements.append((ACTION_TYPE_ID, _US.pack(action_type)))
    if sub_operations is not None:
        for element, count in zip(
            (
                REMAINING_SUB_OPERATIONS,
                COMPLETED_SUB_OPERATIONS,
                FAILED_SUB_OPERATIONS,
                WARNING_SUB_OPERATIONS,
            ),
            sub_operations,
            strict=True,
        ):
            if count is not None:
                elements.append((element, _US.pack(min(count, 0xFFFF))))
    return encode_command(elements)


def echo_request(message_id: int) -> bytes:
    """A C-ECHO-RQ command set (the requestor side, for `imaging-scp echo`)."""
    return encode_command(
        [
            (AFFECTED_SOP_CLASS_UID, _uid_value("1.2.840.10008.1.1")),
            (COMMAND_FIELD, _US.pack(C_ECHO_RQ)),
            (MESSAGE_ID, _US.pack(message_id)),
            (COMMAND_DATA_SET_TYPE, _US.pack(NO_DATASET)),
        ]
    )


def event_report_request(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, event_type: int
) -> bytes:
    """An N-EVENT-REPORT-RQ command set announcing its Event Information dataset."""
    return encode_command(
        [
            (AFFECTED_SOP_CLASS_UID, _uid_value(sop_class_uid)),
            (COMMAND_FIELD, _US.pack(N_EVENT_REPORT_RQ)),
            (MESSAGE_ID, _US.pack(message_id)),
            (COMMAND_DATA_SET_TYPE, _US.pack(WITH_DATASET)),
            (AFFECTED_SOP_INSTANCE_UID, _uid_value(sop_instance_uid)),
            (EVENT_TYPE_ID, _US.pack(event_type)),
        ]
    )


def store_request(
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    *,
    move_originator: tuple[str, int] | None = None,
) -> bytes:
    """A C-STORE-RQ command set (medium priority) announcing its data set; a
    C-MOVE's sub-operation names the move's originator (AE title, Message ID)."""
    elements = [
        (AFFECTED_SOP_CLASS_UID, _uid_value(sop_class_uid)),
        (COMMAND_FIELD, _US.pack(C_STORE_RQ)),
        (MESSAGE_ID, _US.pack(message_id)),
        (PRIORITY, _US.pack(0)),
        (COMMAND_DATA_SET_TYPE, _US.pack(WITH_DATASET)),
        (AFFECTED_SOP_INSTANCE_UID, _uid_value(sop_instance_uid)),
    ]
    if move_originator is not None:
        title, originator_id = move_originator
        title_bytes = title.encode("ascii", "replace")
        elements.append((MOVE_ORIGINATOR_AE_TITLE, title_bytes + b" " * (len(title_bytes) % 2)))
        elements.append((MOVE_ORIGINATOR_MESSAGE_ID, _US.pack(originator_id)))
    return encode_command(elements)


def response_field(request_field: int) -> int:
    """The Command Field of the response to a request (PS3.7 E.1: bit 15 set)."""
    return request_field | 0x8000
