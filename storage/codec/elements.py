"""Encoding one data element (PS3.5 7.1), little endian."""

import struct

# Explicit VRs with 2 reserved bytes and a 4-byte length (PS3.5 table 7.1-1);
# every other VR has a 2-byte length.
LONG_LENGTH_VRS = frozenset(
    ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV")
)
_TAG = struct.Struct("<HH").pack
_SHORT_LENGTH = struct.Struct("<H").pack
_LONG_LENGTH = struct.Struct("<I").pack


def encode_element(tag: int, vr: str, value: bytes, *, explicit: bool = True) -> bytes:
    """The element (tag, VR, value) in explicit or implicit VR Little Endian; `value`
    is already of even length (see `pad`)."""
    head = _TAG(tag >> 16, tag & 0xFFFF)
    if not explicit:
        return head + _LONG_LENGTH(len(value)) + value
    if vr in LONG_LENGTH_VRS:
        return head + vr.encode() + b"\0\0" + _LONG_LENGTH(len(value)) + value
    return head + vr.encode() + _SHORT_LENGTH(len(value)) + value


def pad(value: bytes, padding: bytes = b" ") -> bytes:
    """`value` made even in length: UIDs take a NUL, text a space."""
    return value + padding if len(value) % 2 else value
