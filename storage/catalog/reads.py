"""The catalog's reads: every question the rest of the program asks the index
(the admin commands, C-FIND, the retrieves, FHIR rendering; read-only:
changes are in storage.changes), as methods of `CatalogReader`.

A reader holds a connection of its own that never blocks ingest: SQLite's
index is in WAL mode, PostgreSQL's readers see committed rows without locks.
Its callers hold the reader, never the connection.

Rows come back as dicts whose keys are the index's column names, plus:
- ``state`` (`lifecycle.state_of`): ``receiving`` until `stable_after` seconds pass with no new
  instance, then ``stable``; ``complete`` once a storage commitment request
  covered the series and every instance it referenced there was committed
  (until a new instance arrives); ``incomplete`` when an association that
  delivered into the series ended in an abort, or a commitment request found
  instances missing or damaged (until a new instance arrives, a later
  commitment succeeds, or an admin marks it complete). A study is incomplete
  when one of its series is, complete when all of them are.
- ``incomplete_reason``: why, when incomplete.
"""

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from storage.catalog.engines import Database, IndexLocation, moment_of, stored_moment, utc_now
from storage.catalog.find import Query, StoredInstance, matches, retrieve, retrieve_contents
from storage.catalog.lifecycle import state_of
from storage.catalog.schema import TABLES
from storage.names import fold_name


class FilterError(ValueError):
    """A filter value an admin typed that cannot be understood."""


@dataclass(frozen=True)
class StudyFilter:
    """The filters of `studies` and `export`; None means "any"."""

    patient_id: str | None = None
    patient_name: str | None = None  # DICOM wildcards * and ?, case-insensitive (folded)
    date_from: str | None = None  # study date, YYYYMMDD or YYYY-MM-DD
    date_to: str | None = None
    modality: str | None = None
    accession: str | None = None
    received_since: str | None = None  # ISO date/time, or an age: 30m, 2h, 7d
    limit: int | None = None
    # The web's FHIR search parameters (scp.web.fhir_search).
    study_uids: tuple[str, ...] | None = None
    other_identifier: str | None = None  # an accession number or a Study ID
    series_uid: str | None = None  # studies holding this series
    availabilities: tuple[str, ...] | None = None
    # FHIR _lastUpdated, ISO date/times (the upper one exclusive): a study's last
    # update is the latest of its last instance's arrival, its changed_at and,
    # once `stable_after` seconds have passed since that arrival, that moment
    # (it is rendered `stable` from then on). `study_updated` says the same.
    updated_since: str | None = None
    updated_before: str | None = None
    stable_after: float = 0.0

    def where(self, db: Database) -> tuple[str, list]:
        """The SQL condition on `studies` and its parameters."""
        clauses, params = [], []
        if self.patient_id is not None:
            clauses.append("patient_id = ?")
            params.append(self.patient_id)
        if self.patient_name is not None:
            condition, pattern = db.wildcard("patient_name_folded", fold_name(self.patient_name))
            clauses.append(condition)
            params.append(pattern)
        if self.date_from is not None:
            clauses.append("study_date >= ?")
            params.append(_dicom_date(self.date_from, "--from"))
        if self.date_to is not None:
            clauses.append("study_date <= ?")
            params.append(_dicom_date(self.date_to, "--to"))
        if self.modality is not None:
            # modalities is a JSON array of codes: match one element exactly.
            clauses.append(f"modalities {db.like_ignoring_case} ?")
            params.append(f'%"{self.modality.upper()}"%')
        if self.accession is not None:
            clauses.append("accession = ?")
            params.append(self.accession)
        if self.received_since is not None:
            clauses.append("last_received >= ?")
            params.append(_since(self.received_since))
        if self.updated_since is not None or self.updated_before is not None:
            # When the last instance made the study stable, for a given moment
            # of becoming stable: that moment minus stable_after, up to now's.
            stable_now = _shifted(utc_now(), self.stable_after)
            became_stable = "(last_received >= ? AND last_received <= ?)"
        if self.updated_since is not None:
            since = _since(self.updated_since)
            clauses.append(f"(last_received >= ? OR changed_at >= ? OR {became_stable})")
            params += [since, since, _shifted(since, self.stable_after), stable_now]
        if self.updated_before is not None:
            before = _since(self.updated_before)
            clauses.append(
                f"last_received < ? AND (changed_at IS NULL OR changed_at < ?)"
                f" AND NOT {became_stable}"
            )
            params += [before, before, _shifted(before, self.stable_after), stable_now]
        for column, values in (
            ("study_uid", self.study_uids),
            ("availability", self.availabilities),
        ):
            if values is not None:
                clauses.append(f"{column} IN ({','.join('?' * len(values))})" if values else "0=1")
                params.extend(values)
        if self.other_identifier is not None:
            clauses.append("(accession = ? OR study_id = ?)")
            params += [self.other_identifier, self.other_identifier]
        if self.series_uid is not None:
            clauses.append("study_uid IN (SELECT study_uid FROM series WHERE series_uid = ?)")
            params.append(self.series_uid)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _dicom_date(value: str, option: str) -> str:
    digits = value.replace("-", "")
    try:
        datetime.strptime(digits, "%Y%m%d")
    except ValueError as exc:
        raise FilterError(f"{option}: expected a date like 2026-11-22, got {value!r}") from exc
    return digits


_AGE = re.compile(r"(\d+)([smhd])")


def _since(value: str) -> str:
    match = _AGE.fullmatch(value.strip())
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        moment = datetime.now(UTC) - timedelta(**{unit: int(match.group(1))})
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError as exc:
            raise FilterError(
                f"--received-since: expected an ISO date/time or an age like 2h, got {value!r}"
            ) from exc
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    return stored_moment(moment)


def _shifted(moment: str, seconds: float) -> str:
    """A stored moment `seconds` earlier."""
    return stored_moment(moment_of(moment) - timedelta(seconds=seconds))


def study_updated(study: dict, stable_after: float) -> str:
    """A study's last update (`StudyFilter.updated_since`): from a study row."""
    last = study["last_received"]
    marks = [last, study.get("changed_at")]
    if last:
        stable = _shifted(last, -stable_after)
        if stable <= utc_now():
            marks.append(stable)
    return max(mark for mark in marks if mark)


_STUDY_COLUMNS = (
    "s.*, (SELECT x.incomplete_reason FROM series x WHERE x.study_uid = s.study_uid"
    " AND x.incomplete_reason IS NOT NULL LIMIT 1) AS incomplete_reason,"
    " NOT EXISTS (SELECT 1 FROM series x WHERE x.study_uid = s.study_uid"
    " AND x.committed_at IS NULL) AS committed"
)


def _study_dict(row, stable_after: float) -> dict:
    study = dict(row)
    study["state"] = state_of(
        study["last_received"], study["incomplete_reason"], bool(study["committed"]), stable_after
    )
    return study


def _series_dict(row, stable_after: float) -> dict:
    series = dict(row)
    series["state"] = state_of(
        series["last_received"],
        series["incomplete_reason"],
        series["committed_at"] is not None,
        stable_after,
    )
    return series


# A conflict's study and series: a refused instance's own (it has no instance
# row), else those of the indexed instance it resent.
_CONFLICTS = (
    "FROM conflicts c LEFT JOIN instances i ON i.sop_instance_uid = c.sop_instance_uid"
    " WHERE coalesce(c.study_uid, i.study_uid) = ? OR CAST(? AS TEXT) IS NULL"
)
_CONFLICT_COLUMNS = ", ".join(
    f"coalesce(c.{name}, i.{name}) AS {name}"
    if name in ("study_uid", "series_uid")
    else f"c.{name}"
    for name in TABLES["conflicts"][0]
)


_INSTANCE_ORDER = "i.number IS NULL, i.number, i.received_at"


class CatalogReader:
    """The index as its readers see it: one connection, the reads as methods.
    Rows that stream (studies, instances, C-FIND's matches) come from the
    cursor one at a time. The reads that give a state (see above) take
    `stable_after`, the seconds without a new instance after which a series is
    stable."""

    def __init__(self, db: Database):
        self._db = db

    @classmethod
    def open(
        cls, location: IndexLocation, *, pooled: bool = False, timeout: float = 30
    ) -> "CatalogReader":
        """A reader of the index at `location`. `pooled`: its connection lent by
        this process's pool (PostgreSQL; the listener's and the web's queries)
        within `timeout` seconds, else one of its own (one admin command, one
        connection). IndexUnreachable when the index is not there: a reader
        never creates a SQLite index."""
        return cls(location.open_reader(timeout) if pooled else location.open())

    def close(self) -> None:
        self._db.close()

    def answers(self) -> None:
        """One round trip that reads a table: raises when the index cannot."""
        self._db.execute("SELECT 1 FROM studies LIMIT 1").fetchall()

    def __enter__(self) -> "CatalogReader":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def studies(self, filters: StudyFilter, stable_after: float) -> Iterator[dict]:
        """The studies `filters` selects, most recently received first."""
        where, params = filters.where(self._db)
        sql = f"SELECT {_STUDY_COLUMNS} FROM studies s{where} ORDER BY s.last_received DESC"
        if filters.limit is not None:
            sql += " LIMIT ?"
            params.append(filters.limit)
        for row in self._db.stream(sql, params):
            yield _study_dict(row, stable_after)

    def study_page(
        self,
        filters: StudyFilter,
        stable_after: float,
        *,
        order: str,
        descending: bool,
        after: tuple[str, str] | None,
        count: int,
    ) -> list[dict]:
        """One page of the studies `filters` selects, each with its `series`
        (no instances), ordered by `order` (study_uid, study_date or
        last_received; a missing value as "") then by study UID. `after`: the
        (order value, study UID) of the row before the page: a keyset, so a
        page stays right while studies arrive."""
        if order not in ("study_uid", "study_date", "last_received"):
            raise ValueError(f"cannot order studies by {order!r}")
        where, params = filters.where(self._db)
        key = f"coalesce(s.{order}, '')"
        direction = "DESC" if descending else "ASC"
        if after is not None:
            comparison = "<" if descending else ">"
            where += " AND " if where else " WHERE "
            where += f"({key}, s.study_uid) {comparison} (?, ?)"
            params += list(after)
        rows = self._db.execute(
            f"SELECT {_STUDY_COLUMNS} FROM studies s{where}"
            f" ORDER BY {key} {direction}, s.study_uid {direction} LIMIT ?",
            [*params, count],
        ).fetchall()
        studies = [_study_dict(row, stable_after) for row in rows]
        all_series = self.series_of([s["study_uid"] for s in studies], stable_after)
        for study in studies:
            study["series"] = all_series[study["study_uid"]]
        return studies

    def count_studies(self, filters: StudyFilter) -> int:
        where, params = filters.where(self._db)
        count = self._db.execute(f"SELECT count(*) FROM studies s{where}", params).fetchone()[0]
        return min(count, filters.limit) if filters.limit is not None else count

    def study(
        self, study_uid: str, stable_after: float, *, with_instances: bool = False
    ) -> dict | None:
        """One study with its `series` (ordered by series number), each with its
        `instances` when asked; None when the index does not know the study."""
        row = self._db.execute(
            f"SELECT {_STUDY_COLUMNS} FROM studies s WHERE s.study_uid = ?", (study_uid,)
        ).fetchone()
        if row is None:
            return None
        study = _study_dict(row, stable_after)
        study["series"] = self.series_of([study_uid], stable_after, with_instances=with_instances)[
            study_uid
        ]
        return study

    def series_of(
        self, study_uids: list[str], stable_after: float, *, with_instances: bool = False
    ) -> dict[str, list[dict]]:
        """The series of several studies at once: study UID → series dicts."""
        result: dict[str, list[dict]] = {uid: [] for uid in study_uids}
        if not study_uids:
            return result
        marks = ",".join("?" * len(study_uids))
        rows = self._db.execute(
            f"SELECT * FROM series WHERE study_uid IN ({marks})"
            " ORDER BY number IS NULL, number, first_received",
            study_uids,
        ).fetchall()
        by_uid = {}
        for row in rows:
            series = _series_dict(row, stable_after)
            result[series["study_uid"]].append(series)
            by_uid[series["series_uid"]] = series
            if with_instances:
                series["instances"] = []
        if with_instances and by_uid:
            # By series UID: instances are indexed by series, not by study.
            for row in self._db.rows_in(
                f"SELECT i.* FROM instances i WHERE i.series_uid IN (?) ORDER BY {_INSTANCE_ORDER}",
                list(by_uid),
            ):
                by_uid[row["series_uid"]]["instances"].append(dict(row))
        return result

    def instances(
        self, *, study_uid: str | None = None, series_uid: str | None = None
    ) -> Iterator[dict]:
        """The instances of a series, or of a study (series by series, in the
        series' order), each as the index holds it: `path` (under the data dir),
        `size` (the file's), `sha256` (of its dataset, as received),
        `transfer_syntax`, and how it was received: what a retrieve sends and
        the web serves."""
        if series_uid is not None:
            sql = f"SELECT i.* FROM instances i WHERE i.series_uid = ? ORDER BY {_INSTANCE_ORDER}"
            uid = series_uid
        else:
            # Through the series: instances are indexed by series, not by study.
            sql = (
                "SELECT i.* FROM series x JOIN instances i ON i.series_uid = x.series_uid"
                " WHERE x.study_uid = ? ORDER BY x.number IS NULL, x.number,"
                f" x.first_received, x.series_uid, {_INSTANCE_ORDER}"
            )
            uid = study_uid
        for row in self._db.stream(sql, (uid,)):
            yield dict(row)

    def instance(self, sop_instance_uid: str) -> dict | None:
        """One instance's row, as `instances` gives it; None when not indexed."""
        row = self._db.execute(
            "SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
        ).fetchone()
        return dict(row) if row else None

    def instance_count(
        self, *, study_uid: str | None = None, series_uid: str | None = None
    ) -> int | None:
        """How many instances a study or a series holds; None when it is not indexed."""
        table, column, uid = (
            ("series", "series_uid", series_uid)
            if series_uid is not None
            else ("studies", "study_uid", study_uid)
        )
        row = self._db.execute(
            f"SELECT number_of_instances FROM {table} WHERE {column} = ?", (uid,)
        ).fetchone()
        return row[0] if row else None

    def stats(self) -> dict:
        """Totals over the whole index, and per modality."""
        db = self._db
        totals = db.execute(
            "SELECT count(DISTINCT patient_id) AS patients, count(*) AS studies,"
            " CAST(coalesce(sum(number_of_series), 0) AS BIGINT) AS series,"
            " CAST(coalesce(sum(number_of_instances), 0) AS BIGINT) AS instances,"
            " CAST(coalesce(sum(bytes), 0) AS BIGINT) AS bytes,"
            " max(last_received) AS last_received FROM studies"
        ).fetchone()
        per_modality = db.execute(
            "SELECT coalesce(modality, '') AS modality, count(DISTINCT study_uid) AS studies,"
            " count(*) AS series, CAST(sum(number_of_instances) AS BIGINT) AS instances,"
            " CAST(sum(bytes) AS BIGINT) AS bytes"
            " FROM series GROUP BY 1 ORDER BY instances DESC"
        ).fetchall()
        states = db.execute(
            "SELECT count(CASE WHEN committed_at IS NOT NULL AND incomplete_reason IS NULL"
            " THEN 1 END), count(incomplete_reason) FROM series"
        ).fetchone()
        return {
            **dict(totals),
            **dict(
                db.execute(
                    "SELECT count(*) AS conflicts, count(CASE WHEN action = 'refused' THEN 1 END)"
                    " AS refused FROM conflicts"
                ).fetchone()
            ),
            "complete_series": states[0] or 0,
            "incomplete_series": states[1] or 0,
            "commitments": self.commitment_states(),
            "modalities": [dict(row) for row in per_modality],
        }

    def size(self) -> dict:
        """Studies, series, instances and bytes: the studies' maintained counts
        summed, the instances table never counted."""
        return dict(
            self._db.execute(
                "SELECT count(*) AS studies,"
                " CAST(coalesce(sum(number_of_series), 0) AS BIGINT) AS series,"
                " CAST(coalesce(sum(number_of_instances), 0) AS BIGINT) AS instances,"
                " CAST(coalesce(sum(bytes), 0) AS BIGINT) AS bytes FROM studies"
            ).fetchone()
        )

    def commitment_states(self) -> dict[str, int]:
        """How many commitment requests are in each delivery state (storage.commitment)."""
        rows = self._db.execute("SELECT delivery_state, count(*) FROM commitments GROUP BY 1")
        return {state: count for state, count in rows}

    def conflicts(self, *, study_uid: str | None = None) -> Iterator[dict]:
        """Instances that conflicted with the index, newest first, and what was done:
        a resend with other bytes kept aside under conflicts/ or that overwrote the
        indexed copy; an instance refused, nothing of it kept (`reason`: whom it
        named as its patient, and whom its study names)."""
        for row in self._db.execute(
            f"SELECT {_CONFLICT_COLUMNS} {_CONFLICTS} ORDER BY c.received_at DESC",
            (study_uid, study_uid),
        ):
            yield dict(row)

    def count_conflicts(self, study_uid: str) -> int:
        return self._db.execute(f"SELECT count(*) {_CONFLICTS}", (study_uid, study_uid)).fetchone()[
            0
        ]

    def commitments(self, *, pending: bool = False, study_uid: str | None = None) -> Iterator[dict]:
        """Storage commitment transactions, newest first, each with the studies its
        instances were found in (`studies`). `pending`: report not yet delivered."""
        clauses, params = [], []
        if pending:
            clauses.append("c.delivery_state IN ('checking', 'pending', 'delivering')")
        if study_uid is not None:
            clauses.append(
                "EXISTS (SELECT 1 FROM commitment_items i"
                " WHERE i.transaction_uid = c.transaction_uid AND i.study_uid = ?)"
            )
            params.append(study_uid)
        where = " WHERE " + " AND ".join(clauses) if clauses else ""
        for row in self._db.execute(
            f"SELECT c.* FROM commitments c{where} ORDER BY c.requested_at DESC", params
        ):
            found = dict(row)
            found["studies"] = [
                uid
                for (uid,) in self._db.execute(
                    "SELECT DISTINCT study_uid FROM commitment_items WHERE transaction_uid = ?"
                    " AND study_uid IS NOT NULL ORDER BY study_uid",
                    (found["transaction_uid"],),
                )
            ]
            yield found

    def find(self, query: Query) -> Iterator[dict]:
        """C-FIND: the matches of a checked query (storage.catalog.find), one dict
        per row as the cursor yields it."""
        return matches(self._db, query)

    def retrieve_contents(self, query: Query) -> dict[tuple[str, str], int]:
        """C-MOVE, C-GET, `send`: how many instances a checked retrieve matches,
        by (SOP class, stored transfer syntax)."""
        return retrieve_contents(self._db, query)

    def retrieve(self, query: Query) -> Iterator[StoredInstance]:
        """C-MOVE, C-GET, `send`: the instances a checked retrieve matches, each
        with its file as indexed (path, size, sha256, transfer syntax) and its
        series' availability, as the cursor yields them."""
        return retrieve(self._db, query)
