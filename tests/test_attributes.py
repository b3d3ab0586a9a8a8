"""The list of indexed attributes: each line as the DICOM dictionary has it."""

from pydicom.datadict import dictionary_VR, keyword_for_tag

from storage.attributes import ATTRIBUTES, PATIENT, STUDY, columns
from storage.catalog.schema import TABLES


def test_each_attribute_is_named_as_the_dicom_dictionary_names_its_tag():
    for attribute in ATTRIBUTES:
        assert keyword_for_tag(attribute.tag) == attribute.keyword
        assert dictionary_VR(attribute.tag) == attribute.vr, attribute.keyword


def test_the_elements_that_fill_one_column_are_of_one_level_and_type():
    by_column: dict[tuple[str, str], set] = {}
    for attribute in ATTRIBUTES:
        table = STUDY if attribute.level == PATIENT else attribute.level
        by_column.setdefault((table, attribute.column), set()).add(attribute.python_type)
    assert all(len(types) == 1 for types in by_column.values())


def test_every_column_the_list_fills_is_in_the_index():
    for table, levels in [("studies", (PATIENT, STUDY)), ("series", ("series",)),
                          ("instances", ("instance",))]:  # fmt: skip
        assert set(columns(*levels)) <= set(TABLES[table][0])
