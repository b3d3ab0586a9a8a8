"""Encoding one data element (PS3.5 7.1), little endian."""

import struct

# Explicit VRs with 2 reserved bytes and a 4-byte length (PS3.5 table 7.1-1);
# every other VR has a 2-byte length.
LONG_LENGTH_VRS = frozenset(
    ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV")
)
_IMPLICIT_HEADER = struct.Struct("<HHI").pack  # tag, 4-byte length
_SHORT_HEADER = struct.Struct("<HH2sH").pack  # tag, VR, 2-byte length
_LONG_HEADER = struct.Struct("<HH2s2xI").pack  # tag, VR, 2 reserved bytes, 4-byte length


def encode_element(tag: int, vr: str, value: bytes, *, explicit: bool = True) -> bytes:
    """The element (tag, VR, value) in explicit or implicit VR Little Endian; `value`
    is already of even length (see `pad`)."""
    group, element = tag >> 16, tag & 0xFFFF
    if not explicit:
        return _IMPLICIT_HEADER(group, element, len(value)) + value
    if vr in LONG_LENGTH_VRS:
        return _LONG_HEADER(group, element, vr.encode(), len(value)) + value
    return _SHORT_HEADER(group, element, vr.encode(), len(value)) + value


def pad(value: bytes, padding: bytes = b" ") -> bytes:
    """`value` made even in length: UIDs take a NUL, text a space."""
    return value + padding if len(value) % 2 else value
