"""DICOM dates (DA) and times (TM) as senders write them, read one way for the
index and for FHIR alike."""

import re
from datetime import date, time

# The separators: ACR-NEMA's 1997.04.24, and the 1997-04-24 of some older senders.
_DATE = re.compile(r"(\d{4})[.\-/]?(\d{2})[.\-/]?(\d{2})")
# HH, HHMM, HHMMSS.FFFFFF, and ACR-NEMA's HH:MM:SS.
_TIME = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(\.\d{1,6})?)?)?")


def normal_date(value: str | None) -> str | None:
    """A DA value as YYYYMMDD: the ACR-NEMA 1997.04.24 (and 1997-04-24) of older
    senders read as 19970424; None when it is no date at all."""
    match = _DATE.fullmatch(value or "")
    if match is None:
        return None
    year, month, day = match.groups()
    return f"{year}{month}{day}" if 1 <= int(month) <= 12 and 1 <= int(day) <= 31 else None


def normal_time(value: str | None) -> str | None:
    """A TM value as HHMMSS.ffffff (as precise as sent): 14:04:38 read as 140438."""
    match = _TIME.fullmatch(value or "")
    if match is None:
        return None
    hours, minutes, seconds, fraction = match.groups()
    if int(hours) > 23 or int(minutes or 0) > 59 or int(seconds or 0) > 60:
        return None
    return hours + (minutes or "") + (seconds or "") + (fraction or "")


def calendar_date(value: str | None) -> date | None:
    """A DA value as a date of the calendar; None when it is none (20230231)."""
    match = _DATE.fullmatch(value or "")
    if match is None:
        return None
    try:
        return date(*map(int, match.groups()))
    except ValueError:
        return None


def time_of_day(value: str | None) -> tuple[time, str] | None:
    """A TM value as a time of day padded to seconds, and its fraction as
    written (".70", or ""); None when it is none (a leap second included)."""
    match = _TIME.fullmatch(value or "")
    if match is None:
        return None
    hour, minute, second, fraction = match.groups()
    try:
        moment = time(int(hour), int(minute or 0), int(second or 0))
    except ValueError:
        return None
    return moment, fraction or ""
