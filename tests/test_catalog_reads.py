"""The catalog's reader: what retrieve and the web read an instance's file by."""

import hashlib

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from storage.catalog import Catalog, Provenance
from storage.catalog.engines import IndexLocation, IndexUnreachable
from storage.catalog.reads import CatalogReader
from storage.catalog.schema import SCHEMA_VERSION
from storage.catalog.series import mark_incomplete
from storage.files import prepare_data_dir
from storage.store import DuplicatePolicy, InstanceStore
from tests.conftest import both_indexes, dataset_bytes, index_url_for, make_instance, receive_file

pytestmark = both_indexes


@pytest.fixture
def location(tmp_path):
    data_dir = tmp_path / "data"
    prepare_data_dir(data_dir, "test")
    return IndexLocation(data_dir, index_url_for(data_dir))


def receive(location: IndexLocation, sources, **attributes) -> str:
    """Store one made instance as the receiver does; its SOP Instance UID."""
    path = make_instance(sources, **attributes)
    catalog = Catalog.open(location)
    try:
        store = InstanceStore(location.data_dir, catalog, DuplicatePolicy.KEEP_FIRST, node="test")
        receive_file(store, path, Provenance("TEST"))
    finally:
        catalog.close()
    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


def test_instances_give_each_file_as_the_index_holds_it(location, tmp_path):
    study, first, second = generate_uid(), generate_uid(), generate_uid()
    sources = tmp_path / "sources"
    sent = [
        receive(location, sources, study_uid=study, series_uid=second, SeriesNumber=2,
                InstanceNumber=1),
        receive(location, sources, study_uid=study, series_uid=first, SeriesNumber=1,
                InstanceNumber=2, transfer_syntax=ImplicitVRLittleEndian),
        receive(location, sources, study_uid=study, series_uid=first, SeriesNumber=1,
                InstanceNumber=1),
    ]  # fmt: skip
    with CatalogReader.open(location) as reader:
        in_study = list(reader.instances(study_uid=study))
        in_series = list(reader.instances(series_uid=first))
        assert reader.instance_count(study_uid=study) == 3
        assert reader.instance_count(series_uid=first) == 2
        assert list(reader.instances(study_uid=generate_uid())) == []
    # Series by series in their order, instances in theirs.
    assert [i["sop_instance_uid"] for i in in_study] == [sent[2], sent[1], sent[0]]
    assert in_series == in_study[:2]
    for instance in in_study:
        path = location.data_dir / instance["path"]
        assert instance["size"] == path.stat().st_size
        # Of the dataset as it came off the wire: the file without its meta group.
        assert instance["sha256"] == hashlib.sha256(dataset_bytes(path)).hexdigest()
    assert [i["transfer_syntax"] for i in in_study] == [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
    ]


def test_a_reader_never_creates_a_missing_index(tmp_path):
    if index_url_for(tmp_path):
        pytest.skip("a SQLite index only")
    with pytest.raises(IndexUnreachable):
        CatalogReader.open(IndexLocation(tmp_path))
    assert not IndexLocation(tmp_path).sqlite_path.exists()


def test_an_index_of_schema_version_3_dates_its_studies_last_changes(location, tmp_path):
    """Version 4 keeps when a study last changed (FHIR meta.lastUpdated); an
    index upgraded to it takes that from the marks its series hold."""
    study, series = generate_uid(), generate_uid()
    receive(location, tmp_path / "sources", study_uid=study, series_uid=series)
    untouched = generate_uid()
    receive(location, tmp_path / "sources", study_uid=untouched, series_uid=generate_uid())
    catalog = Catalog.open(location)
    try:
        mark_incomplete(catalog, [series], "association aborted")
        db = catalog.conn
        (marked,) = db.execute(
            "SELECT incomplete_since FROM series WHERE series_uid = ?", (series,)
        ).fetchone()
        assert marked is not None
        # Take the index back to what version 3 held: no changed_at.
        db.execute("DROP INDEX idx_studies_changed_at")
        db.execute("ALTER TABLE studies DROP COLUMN changed_at")
        db.set_schema_version(3)
        db.commit()
    finally:
        catalog.close()
    catalog = Catalog.open(location)
    try:
        db = catalog.conn
        assert db.schema_version() == SCHEMA_VERSION
        dated = dict(db.execute("SELECT study_uid, changed_at FROM studies").fetchall())
    finally:
        catalog.close()
    assert dated == {study: marked, untouched: None}
