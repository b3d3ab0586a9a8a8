"""DICOM UID validation: the gate a UID passes before it may become part of a path."""

import re

MAX_UID_LENGTH = 64

# Digits and dots, no empty component. Leading zeros inside a component are
# formally invalid DICOM but common in the field; they are harmless in a path.
_UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_valid_uid(value: object) -> bool:
    """Return True when `value` is a UID that is safe to use as a file name."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_UID_LENGTH
        and _UID_PATTERN.fullmatch(value) is not None
    )
