"""Rebuild's side in the catalog: the scratch index that storage.maintenance.rebuild
fills from the files, and what becomes of the live index then — its rows
replaced under exclusion of the writers, or a damaged SQLite file's readable
rows carried over — with what the files cannot tell (availability, marks,
when a study last changed, the overwrite history, storage commitments) taken
from the old index."""

import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path

from storage.catalog.engines import (
    MAX_PARAMETERS,
    Database,
    IndexCorrupt,
    IndexLocation,
    SQLiteDatabase,
    is_corrupt,
)
from storage.catalog.index import Catalog
from storage.catalog.lifecycle import MARKS, ONLINE
from storage.catalog.rows import replace_rows
from storage.catalog.schema import TABLES
from storage.catalog.series import refresh_study_availability

_TABLES = ["studies", "series", "instances", "conflicts"]


def file_to_replace(location: IndexLocation, damage: IndexCorrupt | None) -> Path | None:
    """The SQLite file that a rebuild replaces whole (a damaged one, or none
    yet): None when the live index's rows are replaced instead."""
    if location.url or (damage is None and location.sqlite_path.exists()):
        return None
    return location.sqlite_path


def scratch_catalog(path: Path) -> Catalog:
    """A new index at `path` to rebuild into: a SQLite file whatever the live index is."""
    return Catalog(SQLiteDatabase(path))


def replace_live_rows(
    location: IndexLocation,
    scratch: Catalog,
    carried: dict[str, int],
    index_again: Callable[[Catalog, str], None],
) -> None:
    """Put the scratch index's rows in place of the live index's, in one
    transaction that ingest waits for, with what the files cannot tell carried
    over (rows per table into `carried`). `index_again(live, path)` indexes,
    inside that transaction, an instance the live index received after the
    scan of the files passed its place."""
    live = Catalog.open(location)
    try:
        with live.writing():
            # Ingest waits from here to the COMMIT, so every instance answered
            # Success before it is in the live rows read now.
            live.conn.exclude_writers(_TABLES)
            indexed_meanwhile = _indexed_since_scan(live.conn, scratch.conn)

            def rows(table: str, columns: list[str]):
                return live.conn.execute(f"SELECT {', '.join(columns)} FROM {table}")

            with scratch.writing():
                _carry_over(rows, scratch, Path(location.data_dir), carried, commitments=False)
            replace_rows(scratch.conn, live.conn, _TABLES)
            for relpath in indexed_meanwhile:
                index_again(live, relpath)
    finally:
        live.close()


def _indexed_since_scan(live: Database, scratch: Database) -> list[str]:
    """The paths of the instances the live index holds and the scratch one
    lacks, in the order they arrived: stored after the scan of the files passed
    their place (or in flight when it began)."""
    missing: list[tuple[str, str]] = []

    def look_up(batch: list) -> None:
        known = {
            row[0]
            for row in scratch.rows_in(
                "SELECT sop_instance_uid FROM instances WHERE sop_instance_uid IN (?)",
                [uid for uid, _, _ in batch],
            )
        }
        missing.extend((received, path) for uid, path, received in batch if uid not in known)

    batch = []
    for row in live.stream("SELECT sop_instance_uid, path, received_at FROM instances"):
        batch.append(tuple(row))
        if len(batch) == MAX_PARAMETERS:
            look_up(batch)
            batch = []
    look_up(batch)
    return [path for _, path in sorted(missing)]


def _carry_over(
    rows: Callable[[str, list[str]], Iterable],
    scratch: Catalog,
    data_dir: Path,
    carried: dict[str, int],
    *,
    commitments: bool,
) -> None:
    """Into the scratch index (inside its `writing()`), from the old index's
    rows (`rows(table, columns)`): what the files cannot tell (rows per table
    into `carried`)."""
    db = scratch.conn
    states = [(*row[1:], row[0]) for row in rows("series", ["series_uid", *MARKS])]
    db.executemany(
        f"UPDATE series SET {', '.join(f'{c} = ?' for c in MARKS)} WHERE series_uid = ?",
        states,
    )
    carried["series"] = len(states)
    changes = [(row[1], row[0]) for row in rows("studies", ["study_uid", "changed_at"]) if row[1]]
    db.executemany("UPDATE studies SET changed_at = ? WHERE study_uid = ?", changes)
    carried["studies"] = len(changes)
    for (study_uid,) in db.execute(
        "SELECT DISTINCT study_uid FROM series WHERE availability != ?", (ONLINE,)
    ).fetchall():
        refresh_study_availability(scratch, study_uid)
    # The overwrite history is in the index only; a copy kept aside while the
    # files were scanned has its file, but not yet its row.
    columns = [c for c in TABLES["conflicts"][0] if c != "id"]
    kept = {row[0] for row in db.execute("SELECT path FROM conflicts")}
    history = [
        row
        for row in rows("conflicts", columns)
        if row[1] != "kept-aside" or (row[2] not in kept and (data_dir / row[2]).exists())
    ]
    carried["conflicts"] = db.insert_rows("conflicts", columns, history)
    if commitments:
        for table in ("commitments", "commitment_items"):
            carried[table] = db.insert_rows(
                table, list(TABLES[table][0]), rows(table, list(TABLES[table][0]))
            )


def carry_over_damaged(
    path: Path, scratch: Catalog, data_dir: Path, carried: dict[str, int]
) -> list[str]:
    """What the files cannot tell, into the scratch index, from a damaged SQLite
    file: every row that can still be read (rows per table into `carried`);
    returns what could not be, and why."""
    unreadable: dict[str, str] = {}
    old = SQLiteDatabase(path, read_only=True)
    try:

        def rows(table: str, columns: list[str]):
            return _readable_rows(old, table, columns, unreadable)

        with scratch.writing():
            _carry_over(rows, scratch, data_dir, carried, commitments=True)
            carried_series = {row[0] for row in _readable_rows(old, "series", ["series_uid"], {})}
            unknown = [
                uid
                for (uid,) in scratch.conn.execute("SELECT series_uid FROM series")
                if uid not in carried_series
            ]
    finally:
        old.close()
    what = {
        "series": "availability set by an admin or by verify, incomplete and complete marks",
        "studies": "when each study last changed other than by an instance (FHIR lastUpdated)",
        "conflicts": "the history of overwrite resends",
        "commitments": "storage commitment requests and their results",
        "commitment_items": "the instances of storage commitment requests",
    }
    not_carried_over = []
    for table, problem in unreadable.items():
        lost = what.get(table, table)
        if table == "series" and unknown:
            lost += f" of {len(unknown)} series (now ONLINE, unmarked), e.g. {unknown[0]}"
        not_carried_over.append(f"{table}: {lost}: partly unreadable ({problem})")
    return not_carried_over


def _readable_rows(db: Database, table: str, columns: list[str], unreadable: dict[str, str]):
    """The rows of `table` that a damaged SQLite file still gives, in rowid
    order: past a damaged page, reading goes on at a rowid further on (twice as
    far at each failure), so the rows of the pages after it come back too.
    `unreadable[table]` says why rows were skipped."""
    sql = f"SELECT rowid, {', '.join(columns)} FROM {table} WHERE rowid > ? ORDER BY rowid"
    after, skip = 0, 1
    while skip < 1 << 40:
        try:
            for row in db.execute(sql, (after,)):
                after, skip = row[0], 1
                yield tuple(row[1:])
            return
        except sqlite3.DatabaseError as exc:
            unreadable.setdefault(table, str(exc))
            if not is_corrupt(exc):  # not there at all (an index of an older version)
                return
            after, skip = after + skip, skip * 2
