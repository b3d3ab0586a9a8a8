"""DatasetWalk (the incremental header walk) and read_header (the same walk given
all the bytes) against pydicom's reading (read_header_with_pydicom): the same
InstanceHeader, or HeaderError from both with the same kind of message, whatever
the fragments the bytes arrive in."""

import io
import random
import subprocess
import sys
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.filereader import read_file_meta_info

from storage.codec.walk import HeaderError
from storage.header import (
    DatasetWalk,
    normal_date,
    normal_time,
    read_header,
    read_header_with_pydicom,
    walkable,
)
from tests.conftest import bundled_test_files, dataset_bytes
from tests.test_hostile import (
    CHARSETS,
    TRUNCATED,
    UNREADABLE,
    _nested_sequences,
    _text,
    encode,
    instance_elements,
    random_instances,
)

_PREFIXES = ("dataset is truncated", "dataset does not parse")


def _outcome(call):
    """The header, or ("HeaderError", prefix) for a refusal."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return call()
        except HeaderError as error:
            message = str(error)
            prefix = next((p for p in _PREFIXES if message.startswith(p)), message)
            return ("HeaderError", prefix)


def walk(data: bytes, syntax: str, cuts=()) -> object:
    """DatasetWalk fed `data` cut at `cuts`, through one reused buffer (as the
    receiver's is), so that a walk keeping a reference to it would fail."""
    walker = DatasetWalk(syntax)
    scratch = bytearray(len(data))
    previous = 0
    for cut in [*sorted(cuts), len(data)]:
        size = cut - previous
        scratch[:size] = data[previous:cut]
        with memoryview(scratch)[:size] as view:
            walker.feed(view)
        scratch[:size] = b"\xa5" * size  # what a kept reference would then see
        previous = cut
    return walker.finish()


def assert_same(data: bytes, syntax: str, cuts=()) -> None:
    expected = _outcome(lambda: read_header_with_pydicom(io.BytesIO(data), syntax))
    got = _outcome(lambda: walk(data, syntax, cuts))
    assert got == expected, (len(data), sorted(cuts)[:20])
    assert _outcome(lambda: read_header(io.BytesIO(data), syntax)) == expected


def _walkable_files():
    files = []
    for path in bundled_test_files():
        syntax = read_file_meta_info(path).TransferSyntaxUID
        if walkable(syntax):
            files.append(pytest.param(path, syntax, id=path.name))
    return files


@pytest.mark.parametrize(("path", "syntax"), _walkable_files())
def test_bundled_files_read_as_read_header_reads_them(path, syntax):
    data = dataset_bytes(path)
    assert_same(data, syntax)
    rng = random.Random(path.name)
    for count in (1, 2, 7, 50):
        assert_same(data, syntax, rng.sample(range(len(data) + 1), min(count, len(data) + 1)))
    if len(data) <= 20000:
        assert_same(data, syntax, range(1, len(data)))  # one byte at a time
    for cut in sorted(rng.sample(range(len(data)), min(5, len(data)))):  # cut short
        assert_same(data[:cut], syntax, rng.sample(range(cut + 1), min(3, cut + 1)))


def test_walkable():
    assert walkable("1.2.840.10008.1.2")
    assert walkable("1.2.840.10008.1.2.1")
    assert walkable("1.2.840.10008.1.2.4.50")
    assert walkable("1.2.3.4.5.6")  # private: explicit VR little endian
    assert not walkable("1.2.840.10008.1.2.2")
    assert not walkable("1.2.840.10008.1.2.1.99")
    with pytest.raises(ValueError):
        DatasetWalk("1.2.840.10008.1.2.2")


@pytest.mark.parametrize("case", [c for c in TRUNCATED if walkable(TRUNCATED[c][0])])
def test_truncated_datasets_are_refused_as_truncated(case):
    syntax, make = TRUNCATED[case]
    data = make("1.2.3.4")
    for cuts in ((), (len(data) // 3, len(data) // 2), range(0, len(data), 97)):
        with pytest.raises(HeaderError, match="^dataset is truncated"):
            walk(data, syntax, cuts)
        assert_same(data, syntax, cuts)


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_unreadable_datasets_are_refused(case):
    data = UNREADABLE[case]()
    for cuts in ((), range(0, len(data), 61)):
        with pytest.raises(HeaderError, match="^dataset (does not parse|is truncated)"):
            walk(data, "1.2.840.10008.1.2.1", cuts)


@pytest.mark.parametrize("depth", [1, 10, 100])
def test_nesting_pydicom_reads_is_read(depth):
    data = _nested_sequences(depth)
    assert_same(data, "1.2.840.10008.1.2.1", range(0, len(data), 5))
    assert not isinstance(walk(data, "1.2.840.10008.1.2.1"), tuple)


@pytest.mark.parametrize("case", list(CHARSETS))
@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
def test_odd_character_sets_decode_as_pydicom_decodes_them(case, syntax):
    charset, name, expected = CHARSETS[case]
    elements = instance_elements(
        **{
            "00080005": ("CS", _text(charset)),
            "00100010": ("PN", _text(name)),
            "00080090": ("PN", _text(name + b"\\" + name)),  # multi-valued
            "00081030": ("LO", _text(name.replace(b"^", b" "))),
        }
    )
    data, _ = encode(elements, implicit=syntax == "1.2.840.10008.1.2")
    assert_same(data, syntax)
    assert_same(data, syntax, range(0, len(data), 3))
    header = walk(data, syntax)
    if expected is not None:
        assert header.study["patient_name"] == expected


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=random_instances(), data=st.data())
def test_random_datasets_in_random_fragments(case, data):
    dataset, _, syntax, _, _ = case
    cuts = data.draw(st.lists(st.integers(0, len(dataset)), max_size=12))
    assert_same(dataset, syntax, cuts)


@pytest.mark.parametrize(
    "value, expected",
    [("20261122", "20261122"), ("1997.04.24", "19970424"), ("1997-04-24", "19970424"),
     ("2026-13-01", None), ("UNKNOWN", None), ("2026112", None), ("", None)],
)  # fmt: skip
def test_dates_are_read_in_one_form(value, expected):
    assert normal_date(value) == expected


@pytest.mark.parametrize(
    "value, expected",
    [("140438", "140438"), ("14:04:38", "140438"), ("14:04:38.125", "140438.125"),
     ("1015", "1015"), ("10", "10"), ("101500.123456", "101500.123456"), ("2500", None),
     ("10:15 AM", None)],
)  # fmt: skip
def test_times_are_read_in_one_form(value, expected):
    assert normal_time(value) == expected


@pytest.mark.parametrize(
    "data",
    [TRUNCATED["header-inside-patient-name"][1]("1.2.3.4"), UNREADABLE["nested-2000-deep"]()],
    ids=["truncated", "unreadable"],
)
def test_a_stored_file_that_fails_is_refused_and_let_go(tmp_path, data):
    # rebuild and verify read a file mapped: a walk that fails must let go of the
    # mapping, or its HeaderError would turn into "cannot close exported pointers".
    path = tmp_path / "stored.dcm"
    path.write_bytes(b"\0" * 132 + data)
    with open(path, "rb") as handle:
        handle.seek(132)
        with pytest.raises(HeaderError, match="^dataset (is truncated|does not parse)"):
            read_header(handle, "1.2.840.10008.1.2.1")


def test_a_character_set_naming_another_python_codec_reads_as_pydicom_does():
    # Found by test_random_datasets_in_random_fragments: a Specific Character Set
    # of "Uu" (Python's uu codec) fails pydicom's Patient Name; the walk's ASCII
    # shortcut read it anyway.
    dataset = (
        b"\x08\x00\x05\x00\x02\x00\x00\x00Uu"
        b"\x08\x00\x16\x00\x1a\x00\x00\x001.2.840.10008.5.1.4.1.1.2\x00"
        b"\x08\x00\x18\x00\x06\x00\x00\x002.25.1\x08\x00`\x00\x02\x00\x00\x00CT"
        b"\x10\x00\x10\x00\x0c\x00\x00\x00Hostile^Test\x10\x00 \x00\n\x00\x00\x00HOSTILE-1 "
        b" \x00\r\x00\x06\x00\x00\x002.25.1 \x00\x0e\x00\x06\x00\x00\x002.25.1"
    )
    assert_same(dataset, "1.2.840.10008.1.2")


def test_a_dataset_without_a_character_set_is_read_with_no_warning():
    # A fresh process, as serve and rebuild are: the walk's check of its ASCII
    # shortcut once took the default encoding "iso8859" for the characters
    # "i", "s", "o"... and printed pydicom's "Unknown encoding" on the way.
    dataset = (
        b"\x08\x00\x16\x00\x1a\x00\x00\x001.2.840.10008.5.1.4.1.1.2\x00"
        b"\x08\x00\x18\x00\x06\x00\x00\x002.25.1\x10\x00\x10\x00\x0c\x00\x00\x00Hostile^Test"
    )
    code = (
        "import io, sys; from storage.header import read_header;"
        f" print(read_header(io.BytesIO({dataset!r}), '1.2.840.10008.1.2').study['patient_name'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "Hostile^Test\n", "")
