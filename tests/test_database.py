"""The index's database interface, on both engines."""

import time

import pytest

from storage.catalog import Catalog
from storage.catalog.engines import IndexLocation
from tests.conftest import both_indexes, index_url_for

pytestmark = both_indexes

# A hundred million rows, made one by one: no engine holds them all in time.
ENDLESS = (
    "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 100000000)"
    " SELECT x FROM n"
)


@pytest.fixture
def db(tmp_path):
    location = IndexLocation(tmp_path, index_url_for(tmp_path))
    Catalog.open(location).close()
    db = location.open_reader()
    yield db
    db.close()


def test_a_stream_gives_its_first_rows_before_the_result_is_complete(db):
    """An export or a universal C-FIND over a large index starts answering at once."""
    started = time.monotonic()
    rows = db.stream(ENDLESS)
    first = [next(rows)[0] for _ in range(1000)]
    assert first == list(range(1, 1001))
    assert time.monotonic() - started < 5
    rows.close()
    # The connection serves on after a stream left unfinished.
    assert db.execute("SELECT count(*) FROM studies").fetchone()[0] == 0


def test_statements_run_on_the_connection_while_a_stream_is_open(db):
    rows = db.stream(ENDLESS.replace("100000000", "3"))
    seen = []
    for (x,) in rows:
        seen.append((x, db.execute("SELECT ? + 1", (x,)).fetchone()[0]))
    assert seen == [(1, 2), (2, 3), (3, 4)]
