"""C-FIND matching over the index (PS3.4 C.2.2.2, C.4.1): the reads behind a
DICOM query, as SQL on the index's maintained columns. Nothing is recounted:
the counts and the modalities in a study are the index's own.

A query is a level and a list of keys, each a DICOM keyword with the value the
requester sent ("" for a return key). `matches` yields one dict per match,
keyword -> value (str, int or list of str), straight from the SQL cursor: the
caller streams them, and memory does not grow with the number of matches.

Matching, per VR of the key:
- empty: universal, every value matches (the key is only returned);
- UI: a single UID or a backslash-separated list of UIDs;
- DA, TM, DT: a single value or a range (``A-B``, ``A-``, ``-B``); StudyDate with
  StudyTime (or SeriesDate with SeriesTime) match as one date-time when both
  are given (``20261101-20261130`` with ``0800-1200``: from 1 Nov 08:00 to
  30 Nov 12:00);
- PN: ``*`` and ``?`` wildcards, and case-insensitive in every script
  (``doe^j*`` finds ``DOE^JOHN``, ``test-ÉÜ*`` finds ``Test-éü``, ``σίσυφος*``
  finds ``ΣΊΣΥΦΟΣ``), as most archives do: names are typed by people at
  modalities. Both sides are case folded (storage.names.fold_name), the index's
  side at ingest (studies.*_folded): the same on both engines, and a prefix
  (``DOE*``) is looked up in an index. A ``?`` stands for one character of the
  folded name (``ß`` is folded to ``ss``, two);
- every other text VR (CS, SH, LO, AE, IS): exact, case-sensitive, with ``*``
  and ``?``; a backslash gives several values, any of which may match;
- ModalitiesInStudy: matches when one of the study's modalities matches;
- SOPClassesInStudy (STUDY level only): the distinct SOP classes of the study's
  instances, read when the key is asked for (through the series' and the
  instances' indexes: a study's instances, no more); a UID or a list of UIDs
  matches a study that holds an instance of one of them.
"""

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

from storage import attributes
from storage.catalog.engines import Database
from storage.names import fold_name

PATIENT, STUDY, SERIES, IMAGE = "PATIENT", "STUDY", "SERIES", "IMAGE"
LEVELS = (PATIENT, STUDY, SERIES, IMAGE)
PATIENT_ROOT, STUDY_ROOT = "patient", "study"


class QueryError(ValueError):
    """A query that cannot be answered: no level, a missing unique key, a value
    that cannot be matched. The message says which key and why."""


@dataclass(frozen=True)
class Key:
    keyword: str
    tag: int
    vr: str
    level: str  # the level whose rows hold it
    column: str  # SQL expression over the FROM clause of `matches`
    # PN: the column holding the name case folded, which matching reads.
    folded: str | None = None

    @property
    def counts_patients(self) -> bool:
        """An aggregate over a patient's studies (PATIENT level only)."""
        return self.column.startswith(("count(", "CAST(sum("))


_A = "s"  # studies
_X = "x"  # series
_I = "i"  # instances

# The level of each attribute, and the table (its alias in `_FROM`) that holds
# it: patient attributes live in the studies table (first value wins per study).
_LEVELS = {attributes.PATIENT: (PATIENT, _A), attributes.STUDY: (STUDY, _A),
           attributes.SERIES: (SERIES, _X), attributes.INSTANCE: (IMAGE, _I)}  # fmt: skip


def _indexed(attribute: attributes.Attribute) -> Key:
    level, table = _LEVELS[attribute.level]
    column = f"{table}.{attribute.column}"
    folded = f"{column}_folded" if attribute.folded else None
    return Key(attribute.keyword, attribute.tag, attribute.vr, level, column, folded)


KEYS = {
    key.keyword: key
    for key in [
        *(_indexed(attribute) for attribute in attributes.ATTRIBUTES if attribute.key),
        # What the index maintains itself: counts, and the study's modalities.
        Key("NumberOfPatientRelatedStudies", 0x00201200, "IS", PATIENT, "count(*)"),
        Key("NumberOfPatientRelatedSeries", 0x00201202, "IS", PATIENT,
            f"CAST(sum({_A}.number_of_series) AS BIGINT)"),
        Key("NumberOfPatientRelatedInstances", 0x00201204, "IS", PATIENT,
            f"CAST(sum({_A}.number_of_instances) AS BIGINT)"),
        Key("ModalitiesInStudy", 0x00080061, "CS", STUDY, f"{_A}.modalities"),
        Key("NumberOfStudyRelatedSeries", 0x00201206, "IS", STUDY, f"{_A}.number_of_series"),
        Key("NumberOfStudyRelatedInstances", 0x00201208, "IS", STUDY,
            f"{_A}.number_of_instances"),
        Key("NumberOfSeriesRelatedInstances", 0x00201209, "IS", SERIES,
            f"{_X}.number_of_instances"),
    ]
}  # fmt: skip
# Instance Availability (0008,0056) exists at every level but PATIENT: the study's
# availability at STUDY, the series' at SERIES and IMAGE.
INSTANCE_AVAILABILITY = Key("InstanceAvailability", 0x00080056, "CS", STUDY, "")
_AVAILABILITY = {STUDY: f"{_A}.availability", SERIES: f"{_X}.availability",
                 IMAGE: f"{_X}.availability"}  # fmt: skip
# SOP Classes in Study (0008,0062): not a column, the classes of the study's
# instances, at STUDY level only (below it, it would be read again for each row).
SOP_CLASSES_IN_STUDY = Key("SOPClassesInStudy", 0x00080062, "UI", STUDY, "")
_STUDY_INSTANCES = (
    f"series x2 JOIN instances i2 ON i2.series_uid = x2.series_uid"
    f" WHERE x2.study_uid = {_A}.study_uid"
)

# What each level's rows come from, and the order they come in.
_FROM = {
    PATIENT: f"studies {_A}",
    STUDY: f"studies {_A}",
    SERIES: f"series {_X} JOIN studies {_A} ON {_A}.study_uid = {_X}.study_uid",
    IMAGE: f"instances {_I} JOIN series {_X} ON {_X}.series_uid = {_I}.series_uid"
    f" JOIN studies {_A} ON {_A}.study_uid = {_I}.study_uid",
}
_ORDER = {
    PATIENT: f"{_A}.patient_id",
    STUDY: f"{_A}.study_date, {_A}.study_time, {_A}.study_uid",
    SERIES: f"{_X}.number IS NULL, {_X}.number, {_X}.first_received",
    IMAGE: f"{_I}.number IS NULL, {_I}.number, {_I}.received_at",
}
# Unique keys a hierarchical query must give for the levels above its own.
_UNIQUE_ABOVE = {
    (PATIENT_ROOT, STUDY): ["PatientID"],
    (PATIENT_ROOT, SERIES): ["PatientID", "StudyInstanceUID"],
    (PATIENT_ROOT, IMAGE): ["PatientID", "StudyInstanceUID", "SeriesInstanceUID"],
    (STUDY_ROOT, SERIES): ["StudyInstanceUID"],
    (STUDY_ROOT, IMAGE): ["StudyInstanceUID", "SeriesInstanceUID"],
}
_DATE_TIME_PAIRS = (("StudyDate", "StudyTime"), ("SeriesDate", "SeriesTime"))


def key_for(keyword: str, level: str) -> Key | None:
    """The key `keyword` can be answered with at `level`, or None (unsupported)."""
    if keyword == "InstanceAvailability":
        return INSTANCE_AVAILABILITY if level != PATIENT else None
    if keyword == "SOPClassesInStudy":
        return SOP_CLASSES_IN_STUDY if level == STUDY else None
    key = KEYS.get(keyword)
    if key is None or LEVELS.index(key.level) > LEVELS.index(level):
        return None
    if key.counts_patients and level != PATIENT:
        return None  # the patient's counts only at PATIENT level
    return key


@dataclass(frozen=True)
class Query:
    root: str  # PATIENT_ROOT or STUDY_ROOT
    level: str
    keys: dict[str, str]  # keyword -> requested value ("" universal), supported keys only


def check_level(level: str) -> None:
    """QueryError unless `level` is a QueryRetrieveLevel (the keys depend on it)."""
    if not level:
        raise QueryError("the identifier has no QueryRetrieveLevel")
    if level not in LEVELS:
        raise QueryError(f"QueryRetrieveLevel {level!r} is not PATIENT, STUDY, SERIES or IMAGE")


def check_query(query: Query) -> None:
    """Raise QueryError for a query that breaks the model's rules (PS3.4 C.4.1.2)."""
    check_level(query.level)
    if query.level == PATIENT and query.root != PATIENT_ROOT:
        raise QueryError("QueryRetrieveLevel PATIENT exists only in the Patient Root model")
    for keyword in _UNIQUE_ABOVE.get((query.root, query.level), []):
        value = query.keys.get(keyword, "")
        if not value or any(c in value for c in "*?"):
            raise QueryError(
                f"{keyword} is required, with a value, at {query.level} level (hierarchical query)"
            )


def matches(conn: Database, query: Query) -> Iterator[dict]:
    """The matches of a checked query, one dict per row as the cursor yields it
    (`CatalogReader.find` is its door)."""
    level = query.level
    keys = {keyword: key_for(keyword, level) for keyword in query.keys}
    keys = {keyword: key for keyword, key in keys.items() if key is not None}
    columns = [(keyword, _column(conn, key, level)) for keyword, key in keys.items()]
    where, params = _conditions(conn, query, keys, level)
    sql = f"SELECT {', '.join(c for _, c in columns) or '1'} FROM {_FROM[level]}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if level == PATIENT:
        sql += f" GROUP BY {_A}.patient_id, {_A}.issuer_of_patient_id"
    sql += f" ORDER BY {_ORDER[level]}"
    for row in conn.stream(sql, params):
        match = {}
        for (keyword, _), value in zip(columns, row, strict=True):
            if keyword == "ModalitiesInStudy":
                value = _json_list(value)
            elif keyword == "SOPClassesInStudy":
                value = sorted(_json_list(value))
            match[keyword] = value
        yield match


def _column(db: Database, key: Key, level: str) -> str:
    if key is INSTANCE_AVAILABILITY:
        return _AVAILABILITY[level]
    if key is SOP_CLASSES_IN_STUDY:
        classes = db.json_array_of_distinct("i2.sop_class_uid")
        return f"(SELECT {classes} FROM {_STUDY_INSTANCES})"
    if level == PATIENT and not key.counts_patients:
        return f"max({key.column})"  # one value per patient: the first study's, mostly
    return key.column


def _conditions(
    db: Database, query: Query, keys: dict[str, Key], level: str
) -> tuple[list[str], list]:
    where, params = [], []
    values = query.keys
    combined = set()
    for date_keyword, time_keyword in _DATE_TIME_PAIRS:
        if values.get(date_keyword) and values.get(time_keyword) and date_keyword in keys:
            condition, args = _date_time_range(
                keys[date_keyword], keys[time_keyword], values[date_keyword], values[time_keyword]
            )
            where.append(condition)
            params += args
            combined |= {date_keyword, time_keyword}
    for keyword, key in keys.items():
        value = values[keyword]
        if not value or keyword in combined or key.counts_patients:
            continue
        if "\0" in value:  # PostgreSQL refuses it in a parameter; no index value holds one
            raise QueryError(f"{keyword}: a NUL character is part of no value")
        if key is INSTANCE_AVAILABILITY:
            column = _column(db, key, level)
        else:
            column = key.folded or key.column
        condition, args = _match(db, keyword, key.vr, column, value)
        where.append(condition)
        params += args
    return where, params


def _match(db: Database, keyword: str, vr: str, column: str, value: str) -> tuple[str, list]:
    if vr == "UI":
        uids = [uid.strip() for uid in value.split("\\") if uid.strip()]
        if uids in (["*"], []):  # a list of only empty items is no value either
            return "1 = 1", []
        listed = f"IN ({','.join('?' * len(uids))})"
        if keyword == "SOPClassesInStudy":
            return f"EXISTS (SELECT 1 FROM {_STUDY_INSTANCES} AND i2.sop_class_uid {listed})", uids
        return f"{column} {listed}", uids
    if vr in ("DA", "TM", "DT"):
        return _range(column, value, keyword)
    values = value.split("\\") if vr != "PN" else [value]
    parts, args = [], []
    for one in values:
        if keyword == "ModalitiesInStudy":
            condition, arg = _text_match(db, "value", vr, one)
            parts.append(f"EXISTS (SELECT 1 FROM {db.json_elements(column)} WHERE {condition})")
        else:
            condition, arg = _text_match(db, column, vr, one)
            parts.append(condition)
        args.append(arg)
    return "(" + " OR ".join(parts) + ")", args


def _text_match(db: Database, column: str, vr: str, value: str) -> tuple[str, str | int]:
    if vr == "PN":  # `column` is the folded name
        return db.wildcard(column, fold_name(value))
    if "*" in value or "?" in value:
        if vr == "IS":  # its digits: PostgreSQL has no LIKE on a number
            column = f"CAST({column} AS TEXT)"
        return db.wildcard(column, value)
    if vr == "IS":
        try:
            number = int(value)
        except ValueError as exc:
            raise QueryError(f"{value!r} is not an integer string (IS)") from exc
        if number not in attributes.INDEX_INTEGERS:  # the engine would raise, not match none
            raise QueryError(f"{value!r} is beyond any integer the index holds (IS)")
        return f"{column} = ?", number
    return f"{column} = ?", value


def _range(column: str, value: str, keyword: str) -> tuple[str, list]:
    low, dash, high = value.partition("-")
    low, high = _normal(low, keyword), _normal(high, keyword)
    if not dash:
        return f"{column} = ?", [low]
    if not low and not high:
        raise QueryError(f"{keyword}: a range needs one end at least, got {value!r}")
    clauses, args = [], []
    if low:
        clauses.append(f"{column} >= ?")
        args.append(low)
    if high:
        # A time range's upper end includes its whole unit: -1200 is up to 12:00:59.999.
        clauses.append(f"{column} <= ?")
        args.append(high + ("\uffff" if keyword.endswith("Time") else ""))
    return " AND ".join(clauses), args


def _date_time_range(date_key: Key, time_key: Key, dates: str, times: str) -> tuple[str, list]:
    """StudyDate with StudyTime as one date-time range (PS3.4 C.2.2.2.5)."""
    d_low, d_dash, d_high = dates.partition("-")
    t_low, t_dash, t_high = times.partition("-")
    if not d_dash:
        d_high = d_low
    if not t_dash:
        t_high = t_low
    d_low, d_high = _normal(d_low, date_key.keyword), _normal(d_high, date_key.keyword)
    t_low, t_high = _normal(t_low, time_key.keyword), _normal(t_high, time_key.keyword)
    moment = f"{date_key.column} || coalesce({time_key.column}, '')"
    clauses, args = [], []
    if d_low:
        clauses.append(f"{moment} >= ?")
        args.append(d_low + t_low)
    if d_high:
        clauses.append(f"{moment} <= ?")
        args.append(d_high + (t_high or "") + "\uffff")
    return ("(" + " AND ".join(clauses) + ")") if clauses else "1 = 1", args


_DIGITS = re.compile(r"[0-9.]*")


def _normal(value: str, keyword: str) -> str:
    """A date or time as the index holds it: digits only (2026-11-22 and 10:15
    from older senders are read as 20261122 and 1015)."""
    value = value.strip()
    text = value.replace(":", "") if keyword.endswith("Time") else value.replace(".", "")
    if not _DIGITS.fullmatch(text):
        raise QueryError(f"{keyword}: {value!r} is not a DICOM date/time or range")
    return text


def _json_list(value: str | None) -> list[str]:
    return json.loads(value or "[]")


# -- retrieve (C-MOVE, C-GET, `imaging-scp send`) ---------------------------------------
# A retrieve's identifier holds unique keys only (PS3.4 C.4.2.2.1): the ones of
# the levels above its own, and a UID, or a list of them, at its own.
_RETRIEVE_KEYS = {
    PATIENT: ("PatientID",),
    STUDY: ("PatientID", "StudyInstanceUID"),
    SERIES: ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"),
    IMAGE: ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}
_RETRIEVED = (
    f"{_I}.path, {_I}.size, {_I}.sha256, {_I}.transfer_syntax, {_I}.sop_class_uid,"
    f" {_I}.sop_instance_uid, {_X}.availability"
)


@dataclass(frozen=True)
class StoredInstance:
    """What a retrieve needs of one matching instance."""

    path: str  # relative to the data directory
    size: int
    sha256: str  # of the dataset (the bytes after the file meta group)
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    series_availability: str


def check_retrieve(query: Query) -> None:
    """Raise QueryError for a retrieve identifier that breaks the model's rules:
    the hierarchical ones, and a value for the unique key of its level."""
    check_query(query)
    unique = _RETRIEVE_KEYS[query.level][-1]
    value = query.keys.get(unique, "")
    if not value or any(c in value for c in "*?"):
        raise QueryError(f"{unique} is required, with a value, at {query.level} level (retrieve)")


def retrieve_keywords(level: str) -> tuple[str, ...]:
    """The keys a retrieve identifier may hold at `level`."""
    return _RETRIEVE_KEYS[level]


def retrieve_contents(conn: Database, query: Query) -> dict[tuple[str, str], int]:
    """How many instances a checked retrieve matches, by (SOP class, stored
    transfer syntax): what the sub-operations' presentation contexts must carry
    (`CatalogReader.retrieve_contents` is its door)."""
    where, params = _retrieve_conditions(conn, query)
    rows = conn.execute(
        f"SELECT {_I}.sop_class_uid, {_I}.transfer_syntax, count(*) FROM {_FROM[IMAGE]}{where}"
        f" GROUP BY {_I}.sop_class_uid, {_I}.transfer_syntax",
        params,
    )
    return {(sop_class, syntax): count for sop_class, syntax, count in rows}


def retrieve(conn: Database, query: Query) -> Iterator[StoredInstance]:
    """The instances a checked retrieve matches, as the cursor yields them, in
    series and instance order (`CatalogReader.retrieve` is its door)."""
    where, params = _retrieve_conditions(conn, query)
    sql = (
        f"SELECT {_RETRIEVED} FROM {_FROM[IMAGE]}{where}"
        f" ORDER BY {_X}.study_uid, {_X}.first_received, {_X}.series_uid, {_ORDER[IMAGE]}"
    )
    for row in conn.stream(sql, params):
        yield StoredInstance(*row)


def _retrieve_conditions(conn: Database, query: Query) -> tuple[str, list]:
    keys = {keyword: KEYS[keyword] for keyword in _RETRIEVE_KEYS[query.level]}
    values = {keyword: query.keys.get(keyword, "") for keyword in keys}
    where, params = _conditions(conn, Query(query.root, IMAGE, values), keys, IMAGE)
    return (" WHERE " + " AND ".join(where) if where else ""), params
