"""What the index records of the files, as verify (storage.maintenance.verify)
compares it with the data directory."""

from collections.abc import Iterator

from storage.catalog.index import Catalog


class RecordedFiles:
    """The index's records of the files, read on a connection of its own beside
    the catalog's writer: the checks of the files that follow take long, and
    never hold the writer up."""

    def __init__(self, catalog: Catalog):
        self._db = catalog.conn.another()

    def instances(self) -> Iterator[tuple[str, int, str, str, str, str]]:
        """(path, size, SHA-256, SOP Instance UID, series, study) of every indexed instance."""
        return self._db.execute(
            "SELECT path, size, sha256, sop_instance_uid, series_uid, study_uid FROM instances"
        )

    def kept_aside(self) -> Iterator[tuple[str, int, str]]:
        """(path, size, SHA-256) of every copy kept aside."""
        return self._db.execute(
            "SELECT path, size, sha256 FROM conflicts WHERE action = 'kept-aside'"
        )

    def marked_by_verify(self) -> dict[str, str]:
        """The series an earlier verify marked UNAVAILABLE, and their studies."""
        return dict(
            self._db.execute(
                "SELECT series_uid, study_uid FROM series WHERE unavailable_by_verify IS NOT NULL"
            ).fetchall()
        )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "RecordedFiles":
        return self

    def __exit__(self, *_) -> None:
        self.close()
