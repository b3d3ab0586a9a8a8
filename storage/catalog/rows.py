"""Copying an index's tables from one database to another (rebuild, migrate-index)."""

from collections.abc import Callable

from storage.attributes import index_text
from storage.catalog.engines import Database
from storage.catalog.schema import TABLES


def replace_rows(
    source: Database,
    target: Database,
    tables: list[str],
    progress: Callable[[int], None] = lambda _: None,
) -> dict[str, int]:
    """Make `tables` of `target` hold exactly the rows of `source` (inside the
    caller's transaction on `target`); returns the rows copied per table.
    `progress(n)` after each n instance rows."""
    copied = {}
    for table in tables:
        columns, pk = TABLES[table]
        names = list(columns)
        target.execute(f"DELETE FROM {table}")
        rows = _without_nul(source.execute(f"SELECT {', '.join(names)} FROM {table}"))
        if table == "instances":
            rows = _counted(rows, progress)
        copied[table] = target.insert_rows(table, names, rows)
        if pk == "id":
            target.reset_identity(table, "id")
    return copied


def _without_nul(rows):
    """The rows, each text value as the index holds it now (`index_text`): an
    index written before may hold a NUL, and PostgreSQL's text none."""
    for row in rows:
        if any(type(value) is str and "\0" in value for value in row):
            row = tuple(index_text(value) if type(value) is str else value for value in row)
        yield row


def _counted(rows, progress: Callable[[int], None], every: int = 1000):
    number = 0
    for number, row in enumerate(rows, 1):
        yield row
        if number % every == 0:
            progress(every)
    progress(number % every)  # the last, partial batch
