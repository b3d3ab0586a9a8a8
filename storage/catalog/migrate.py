"""migrate-index: the SQLite index of a data directory copied into PostgreSQL."""

from collections.abc import Callable
from pathlib import Path

from storage.catalog.engines import IndexLocation
from storage.catalog.index import Catalog
from storage.catalog.rows import replace_rows
from storage.catalog.schema import TABLES


class MigrationRefused(Exception):
    """migrate-index would lose or mix rows; the message says which and why."""


def migrate_index(
    data_dir: Path, target_url: str, *, progress: Callable[[int], None] = lambda _: None
) -> dict[str, int]:
    """Copy the SQLite index of `data_dir` into the index at `target_url`, in one
    transaction there: afterwards every table of the target holds exactly the
    source's rows (run it again and nothing changes). Refused when the target
    holds instances the source does not (another archive's). Returns the rows
    per table, checked against the source's counts."""
    source_location = IndexLocation(Path(data_dir))
    target_location = IndexLocation(Path(data_dir), target_url)
    # An index of an older schema version is brought to this one first (as
    # `serve` does at start): the copy reads every column of this version.
    Catalog(source_location.open()).close()
    source = source_location.open()
    target = Catalog.open(target_location)
    try:
        source.execute("BEGIN")  # one snapshot of the source, even while serve writes
        _refuse_foreign_rows(source, target, source_location, target_location)
        with target.writing():
            copied = replace_rows(source, target.conn, list(TABLES), progress)
        for table, count in copied.items():
            expected = source.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            found = target.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            if not expected == found == count:
                raise MigrationRefused(
                    f"{table}: {expected} rows in {source_location.describe()},"
                    f" {found} in {target_location.describe()} after the copy: run it again"
                )
        source.execute("COMMIT")
        return copied
    finally:
        source.close()
        target.close()


def _refuse_foreign_rows(
    source, target: Catalog, source_location: IndexLocation, target_location: IndexLocation
) -> None:
    uids = [row[0] for row in target.conn.execute("SELECT sop_instance_uid FROM instances")]
    known = {
        row[0]
        for row in source.rows_in(
            "SELECT sop_instance_uid FROM instances WHERE sop_instance_uid IN (?)", uids
        )
    }
    foreign = [uid for uid in uids if uid not in known]
    if foreign:
        raise MigrationRefused(
            f"{target_location.describe()} already holds instances that"
            f" {source_location.describe()} does not (SOP Instance UID {foreign[0]}):"
            " migrate-index fills an empty index, or one it filled from this one before"
        )
