"""The DICOM Conformance Statement: the committed document is what the code
generates, and what it lists is what the live engine negotiates, asked by
pynetdicom and by dcmtk's storescu, echoscu and findscu."""

import difflib
import re
import subprocess
from pathlib import Path

from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, build_context, status

from scp import association, conformance, echo_service, find_service
from tests.conftest import ECHOSCU, IMAGING_SCP, STORESCU, make_instance, requires_dcmtk
from tests.test_find import findscu, requires_findscu

ROOT = Path(__file__).resolve().parent.parent
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.8.498.1.7"  # under pydicom's root: no DICOM service's


def test_the_committed_statement_is_the_one_the_code_generates():
    committed = (ROOT / conformance.DOCUMENT).read_text(encoding="utf-8")
    generated = conformance.statement()
    if committed != generated:
        diff = difflib.unified_diff(
            committed.splitlines(), generated.splitlines(), "committed", "generated", lineterm=""
        )
        raise AssertionError(
            f"{conformance.DOCUMENT} and the code disagree: run `{conformance.COMMAND}`"
            " and commit the result.\n" + "\n".join(list(diff)[:40])
        )


def test_the_command_prints_it_or_writes_it(tmp_path):
    printed = subprocess.run(
        [IMAGING_SCP, "conformance"], capture_output=True, text=True, check=True, timeout=60
    )
    assert printed.stdout == conformance.statement()
    written = tmp_path / "statement.md"
    subprocess.run([IMAGING_SCP, "conformance", "--output", str(written)], check=True, timeout=60)
    assert written.read_text(encoding="utf-8") == printed.stdout


def test_a_services_statuses_are_read_from_its_constants_as_its_table_lists_them():
    # The read retrieve's section is made of (no C-MOVE or C-GET is served yet):
    # for FIND and Verification, it finds what their written tables list.
    for module, statuses, table in (
        (find_service, status.QR_FIND_SERVICE_CLASS_STATUS, conformance._find_statuses()),
        (echo_service, status.VERIFICATION_SERVICE_CLASS_STATUS, conformance._echo_statuses()),
    ):
        listed = {int(code, 16) for code in re.findall(r"`([0-9A-F]{4})H`", table)}
        found = conformance.service_statuses({module}, statuses)
        assert sorted(found) == sorted(listed), module.__name__
    found = conformance.service_statuses({find_service}, status.QR_FIND_SERVICE_CLASS_STATUS)
    order = [find_service.PENDING, find_service.SUCCESS, find_service.CANCEL]
    assert [code for code in found if code in order] == order  # failures come last
    assert found[-1] == find_service.UNABLE_TO_PROCESS


def test_services_are_found_by_the_information_models_they_serve():
    for uid in find_service.ROOTS:
        assert conformance.serving(uid) is find_service
    assert {m.__name__ for m in conformance.service_modules()} >= {
        "scp.echo_service", "scp.store_service", "scp.find_service", "scp.commitment_service"
    }  # fmt: skip


def _listed() -> dict[str, tuple[str, ...]]:
    return {a.sop_class: a.transfer_syntaxes for a in conformance.accepted_contexts()}


def _negotiated(port: int, proposed: list[tuple[str, list[str]]]) -> list[tuple[str, str]]:
    """(abstract syntax, transfer syntax) of every context the server accepts
    of `proposed`, proposed by pynetdicom in associations of at most 128 contexts."""
    accepted = []
    limit = association.MAX_PRESENTATION_CONTEXTS
    for start in range(0, len(proposed), limit):
        contexts = [
            build_context(uid, syntaxes) for uid, syntaxes in proposed[start : start + limit]
        ]
        assoc = AE("CONFORMANCE").associate(
            "127.0.0.1", port, contexts=contexts, ae_title="IMAGING_SCP"
        )
        assert assoc.is_established
        accepted += [(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts]
        assoc.release()
    return accepted


def test_pynetdicom_is_accepted_exactly_the_contexts_listed(server):
    """Every listed (SOP class, transfer syntax) pair, each in its own context,
    every other SOP class pynetdicom knows, and a private one: what is accepted
    is what is listed, and a private storage class besides (as the statement says)."""
    listed = _listed()
    pairs = [(uid, [syntax]) for uid, syntaxes in listed.items() for syntax in syntaxes]
    others = [
        (uid, [ExplicitVRLittleEndian])
        for uid in conformance.known_sop_classes()
        if uid not in listed
    ]
    assert others, "some known SOP classes (worklist, print...) are not ours"
    accepted = _negotiated(
        server.port, [*pairs, *others, (PRIVATE_SOP_CLASS, [ExplicitVRLittleEndian])]
    )
    assert len(accepted) == len(set(accepted))
    expected = {(uid, syntaxes[0]) for uid, syntaxes in pairs}
    assert set(accepted) == expected | {(PRIVATE_SOP_CLASS, ExplicitVRLittleEndian)}


def test_the_listed_order_of_preference_is_the_one_negotiated(server):
    """Each listed SOP class with its listed syntaxes proposed in reverse order in
    one context: the accepted one is the lowest rank, the first proposed among equals."""
    listed = _listed()
    proposed = [(uid, list(reversed(syntaxes))) for uid, syntaxes in listed.items()]
    accepted = dict(_negotiated(server.port, proposed))
    assert accepted.keys() == listed.keys()
    for uid, syntaxes in proposed:
        assert accepted[uid] == min(syntaxes, key=association.transfer_syntax_preference), uid


def _storescu_profile(path: Path, sop_classes: list[str], syntaxes: tuple[str, ...]) -> Path:
    """A storescu association configuration (`-xf FILE Listed`) proposing each
    of `sop_classes` in `syntaxes`: storescu proposes only the storage classes
    dcmtk knows unless told so (3.6.7 knows fewer than pynetdicom)."""
    lines = ["[[TransferSyntaxes]]", "[Listed]"]
    lines += [f"TransferSyntax{n} = {syntax}" for n, syntax in enumerate(syntaxes, 1)]
    lines += ["", "[[PresentationContexts]]", "[Listed]"]
    lines += [f"PresentationContext{n} = {uid}\\Listed" for n, uid in enumerate(sop_classes, 1)]
    lines += ["", "[[Profiles]]", "[Listed]", "PresentationContexts = Listed", ""]
    path.write_text("\n".join(lines))
    return path


def _storescu(port: int, options: list[str], files: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [STORESCU, "-v", *options, "-aec", "IMAGING_SCP", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _assert_stored_each(result: subprocess.CompletedProcess, files: list[Path]) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("Received Store Response (Success)") == len(files), output


@requires_dcmtk()
def test_storescu_sends_an_object_of_every_listed_storage_class(server, tmp_path):
    """One object per listed storage SOP class, sent by `storescu -R` (it proposes
    each file's class in the uncompressed syntaxes, two contexts a class); the
    classes dcmtk does not know (3.6.7 knows fewer than pynetdicom) are proposed
    through an association configuration (`-xf`, which -R does not combine
    with), in the uncompressed syntaxes listed for them. Every one is accepted
    and stored."""
    listed = _listed()
    storage = [a.sop_class for a in conformance.accepted_contexts() if a.is_storage]
    study = generate_uid()
    files = {
        make_instance(
            tmp_path / "in", study_uid=study, series_uid=generate_uid(), sop_class_uid=uid
        ): uid
        for uid in storage
    }
    known, unknown = list(files), []
    for start in range(0, len(known), 60):
        batch = known[start : start + 60]
        while (result := _storescu(server.port, ["-R"], batch)).returncode != 0:
            refused = re.search(r"unknown storage SOP class in file: (\S+):", result.stderr)
            assert refused, result.stdout + result.stderr
            batch.remove(Path(refused.group(1)))
            unknown.append(Path(refused.group(1)))
        _assert_stored_each(result, batch)
    uncompressed = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
    assert all(set(uncompressed) <= set(listed[files[path]]) for path in unknown)
    lines = ["[[TransferSyntaxes]]", "[Uncompressed]"]
    lines += [f"TransferSyntax{n} = {syntax}" for n, syntax in enumerate(uncompressed, 1)]
    lines += ["[[PresentationContexts]]", "[Unknown]"]
    lines += [f"PresentationContext{n} = {files[path]}\\Uncompressed"
              for n, path in enumerate(unknown, 1)]  # fmt: skip
    lines += ["[[Profiles]]", "[Unknown]", "PresentationContexts = Unknown"]
    profile = tmp_path / "unknown.cfg"
    profile.write_text("\n".join(lines) + "\n")
    _assert_stored_each(_storescu(server.port, ["-xf", str(profile), "Unknown"], unknown), unknown)
    assert len(list(server.data_dir.glob(f"{study}/*/*.dcm"))) == len(storage)


@requires_dcmtk(ECHOSCU)
def test_echoscu_is_answered(server):
    subprocess.run(
        [ECHOSCU, "-aec", "IMAGING_SCP", "127.0.0.1", str(server.port)], check=True, timeout=30
    )


@requires_findscu
def test_findscu_is_answered_in_both_listed_models(server):
    for root, level, key in (("-P", "PATIENT", "PatientID"), ("-S", "STUDY", "StudyInstanceUID")):
        responses, result = findscu(server.port, level, key, root=root)
        assert responses == [], result.stderr
