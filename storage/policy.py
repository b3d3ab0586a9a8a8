"""The duplicate policy: what to do with a resent SOP Instance UID whose bytes differ."""

import enum


class DuplicatePolicy(enum.StrEnum):
    KEEP_FIRST = "keep-first"  # the first stays; the new copy is kept under conflicts/
    OVERWRITE = "overwrite"  # the new copy replaces the first
    REJECT = "reject"  # the new copy is refused with an error status
