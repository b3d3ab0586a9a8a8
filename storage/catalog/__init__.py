"""The catalog: the index's only door.

Everything the rest of the program asks of the index (add an instance, record
a refusal or a conflict, mark a series, record a commitment, set availability,
delete, rebuild, migrate, and every read) is a call into this package. SQL,
the schema and its versions, the group commit and each engine's ingest
strategy stay inside it; the engine (SQLite or PostgreSQL) is chosen once, when
the catalog is opened.

Here: the door and the records it takes and gives. The exceptions are the
modules' that raise them (engines, health, ingest).
"""

from storage.catalog.engines import utc_now
from storage.catalog.index import Catalog, count_instances
from storage.catalog.ingest import IndexEntry, IndexOutcome, Provenance, StoredDigest
from storage.catalog.lifecycle import AVAILABILITIES

__all__ = [
    "AVAILABILITIES",
    "Catalog",
    "IndexEntry",
    "IndexOutcome",
    "Provenance",
    "StoredDigest",
    "count_instances",
    "utc_now",
]
