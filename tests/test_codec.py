"""storage.codec: importing the project leaves pydicom's settings alone, and the
server still reads a sender's odd values without a word in its log."""

import subprocess
import sys
import warnings
from pathlib import Path

from pydicom.uid import generate_uid

from tests.conftest import make_instance, send_files, start_server
from tests.test_find import findscu
from tests.test_hostile import RawAssociation

REPO = Path(__file__).resolve().parent.parent


def test_importing_the_receiver_changes_no_pydicom_setting():
    # A program that embeds the header reader (or the benchmarks, or a test)
    # keeps pydicom's validation of what it reads itself, also after reading a
    # header with odd values (the reader's leniency ends with its reading).
    probe = (
        "import io, pydicom.config as c\n"
        "before = c.settings.reading_validation_mode\n"
        "import storage.header, storage.files, storage.fhir, storage.store\n"
        "import scp.find_service, scp.commitment_service, scp.server, scp.cli\n"
        "from storage.codec.elements import encode_element\n"
        "data = encode_element(0x00080020, 'DA', b'1997.04.24') + encode_element(\n"
        "    0x00200013, 'IS', b'abc ')\n"
        "storage.header.read_header(io.BytesIO(data), '1.2.840.10008.1.2.1')\n"
        "walk = storage.header.DatasetWalk('1.2.840.10008.1.2.1')\n"
        "walk.feed(data)\n"
        "walk.finish()\n"
        "print(before, c.settings.reading_validation_mode)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    before, after = result.stdout.split()
    assert after == before, f"importing the receiver set reading_validation_mode {before}->{after}"


def test_odd_values_are_stored_and_found_without_pydicom_warnings_in_the_log(tmp_path):
    server = start_server(tmp_path / "data")
    try:
        study_uid = generate_uid()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about what we build on purpose
            path = make_instance(
                tmp_path / "sources",
                study_uid=study_uid,
                series_uid=generate_uid(),
                StudyDate="1997.04.24",
                StudyTime="14:04:38",
                PatientID="odd",
                InstitutionName="I" * 80,  # LO holds 64
                AccessionNumber="A" * 20,  # SH holds 16
            )
        assert [status.status for status in send_files(server.port, [path])] == [0]
        responses, _ = findscu(
            server.port, "STUDY", "PatientID=odd", "StudyDate=19970101-19971231", "StudyInstanceUID"
        )
        assert [str(r.StudyInstanceUID) for r in responses] == [study_uid]
        # A private SOP class whose UID has a leading zero (pydicom names it while
        # negotiating): accepted, as before.
        with RawAssociation(server.port, [(1, "1.2.03.4", ["1.2.840.10008.1.2.1"])]) as assoc:
            assert assoc.accepted
            assoc.release()
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "Invalid value" not in log, log
