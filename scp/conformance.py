"""The DICOM Conformance Statement (PS3.2 Annex A), docs/conformance-statement.md.

The prose is written here; every table is read from the code that does what
it says. What we accept is not copied from a list: every SOP class pynetdicom
knows is proposed to `scp.association.agree` (the acceptor's own decision, as
a live association gets it) in every transfer syntax pydicom knows, and what
it accepts, in which order of preference and with which roles, is the table.
A service added to the negotiation appears in the statement the next time
`imaging-scp conformance --output docs/conformance-statement.md` is run;
tests/test_conformance.py fails until it is. The statuses come from the
services' constants, the C-FIND keys from storage.catalog.find, the
configuration from scp.config.Config, what we propose as a requestor from the
proposals scp.echo and scp.reports send.

C-MOVE and C-GET have no prose of their own here: once the negotiation accepts
their SOP classes, their section is read from the service module whose ROOTS
names them (its information models and levels) and from its constants and its
parts' (the statuses PS3.4 lists for the operation, with PS3.4's meaning).
"""

import dataclasses
import importlib
import importlib.metadata
import inspect
import pkgutil
from dataclasses import dataclass
from functools import cache
from types import ModuleType

from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pynetdicom import presentation, sop_class, status
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import uid_to_service_class

import scp
from scp import (
    association,
    commitment_service,
    config,
    dimse,
    echo_service,
    find_service,
    store_service,
    upper_layer,
)
from scp.config import Config
from scp.echo import ECHO_PROPOSAL
from scp.reports import REPORT_PROPOSAL
from scp.sub_operations import proposals
from scp.upper_layer import APPLICATION_CONTEXT_NAME, REJECT_REASONS, REJECT_RESULTS, Proposal
from storage import attributes
from storage.catalog import commitments, find
from storage.files import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from storage.store import Outcome, Refusal

DOCUMENT = "docs/conformance-statement.md"
COMMAND = f"imaging-scp conformance --output {DOCUMENT}"
AE_TITLE = Config.aet


# --- what the negotiation accepts ---------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    """An abstract syntax the acceptor takes: the transfer syntaxes it accepts
    for it, most preferred first, and the roles it agrees to when a requestor
    proposes both (SCP/SCU role selection): ours, as SCU and as SCP."""

    sop_class: str
    transfer_syntaxes: tuple[str, ...]
    as_scu: bool
    as_scp: bool

    @property
    def service(self) -> str:
        return uid_to_service_class(self.sop_class).__name__

    @property
    def is_storage(self) -> bool:
        """A storage class, or one pynetdicom has no service for (retired storage
        classes): the negotiation takes both as storage."""
        return self.service in ("StorageServiceClass", "ServiceClass")


def known_sop_classes() -> list[str]:
    """Every SOP class pynetdicom has a presentation context list for (its
    `*PresentationContexts`: storage, query/retrieve, worklist, print...)."""
    found = {}
    for name in dir(presentation):
        if name.endswith("PresentationContexts"):
            for context in getattr(presentation, name):
                found.setdefault(context.abstract_syntax, None)
    return sorted(found, key=_uid_order)


def _uid_order(uid: str) -> tuple[int, ...]:
    return tuple(int(part) for part in uid.split("."))


def _negotiate(
    proposed: list[tuple[str, list[str]]], roles: dict[str, tuple[bool, bool]] | None = None
) -> list[PresentationContext]:
    """The contexts `scp.association.agree` accepts of `proposed` (abstract
    syntax, transfer syntaxes), in as many requests as it takes."""
    limit = association.MAX_PRESENTATION_CONTEXTS
    accepted = []
    for start in range(0, len(proposed), limit):
        contexts = [
            association.Proposed(2 * number + 1, UID(abstract_syntax), [UID(s) for s in syntaxes])
            for number, (abstract_syntax, syntaxes) in enumerate(proposed[start : start + limit])
        ]
        request = association.Request(
            calling_ae="CONFORMANCE",
            called_ae=AE_TITLE,
            application_context=APPLICATION_CONTEXT_NAME,
            contexts=contexts,
            max_pdu=0,
            roles=roles or {},
            async_ops=None,
        )
        accepted += association.agree(request, Config.max_pdu).contexts.values()
    return accepted


@cache
def accepted_contexts() -> tuple[Accepted, ...]:
    """What the acceptor takes of every known SOP class, in UID order."""
    syntaxes = [str(syntax) for syntax in AllTransferSyntaxes]
    classes = [
        cx.abstract_syntax for cx in _negotiate([(c, syntaxes) for c in known_sop_classes()])
    ]
    taken: dict[str, list[str]] = {uid: [] for uid in classes}
    for cx in _negotiate([(uid, [syntax]) for uid in classes for syntax in syntaxes]):
        taken[cx.abstract_syntax].append(cx.transfer_syntax[0])
    both = {uid: (True, True) for uid in classes}
    roles = {cx.abstract_syntax: (cx.as_scu, cx.as_scp) for cx in _negotiate(
        [(uid, syntaxes) for uid in classes], both
    )}  # fmt: skip
    return tuple(
        Accepted(
            uid,
            tuple(sorted(taken[uid], key=association.transfer_syntax_preference)),
            *roles[uid],
        )
        for uid in classes
    )


# --- Markdown -----------------------------------------------------------------------


def _table(header: tuple[str, ...], rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _name(uid: str) -> str:
    """pydicom's name of a UID, or pynetdicom's keyword where pydicom's
    dictionary is older than pynetdicom's list (it then names the UID by itself)."""
    name = UID(uid).name
    if name == uid:
        return _KEYWORDS.get(uid, name)
    return f"{name} (Retired)" if UID(uid).is_retired else name


_KEYWORDS = {
    str(value): keyword
    for keyword, value in vars(sop_class).items()
    if isinstance(value, sop_class.SOPClass)
}


def _hex(code: int) -> str:
    return f"`{code:04X}H`"


def _yes(flag: bool) -> str:
    return "Yes" if flag else "No"


# --- the tables ---------------------------------------------------------------------


def _network_services() -> str:
    accepted = accepted_contexts()
    ours = {p.abstract_syntax: p for p in _PROPOSALS.values()}
    rows = [
        (_name(a.sop_class), f"`{a.sop_class}`", _scu(ours.get(a.sop_class)), "Yes")
        for a in accepted
        if not a.is_storage
    ]
    storage = sum(1 for a in accepted if a.is_storage)
    rows.append(
        (f"Every storage SOP class ({storage}, Table 4.2-4), private and unknown ones too",
         "", _storage_scu(), "Yes")
    )  # fmt: skip
    return _table(("SOP Class", "UID", "User of Service (SCU)", "Provider of Service (SCP)"), rows)


def _storage_scu() -> str:
    """We send C-STOREs as the sub-operations of the retrieves we serve."""
    operations = sorted({_RETRIEVES[_retrieve_kind(a.sop_class)] for a in _retrieve_contexts()})
    return f"Yes: the sub-operations of {' and '.join(operations)}" if operations else "No"


def _scu(proposal: Proposal | None) -> str:
    if proposal is None:
        return "No"
    return "No (SCP role, on an association we open)" if proposal.scp_role else "Yes"


def _service_contexts() -> str:
    rows = [
        (_name(a.sop_class), "<br>".join(f"{_name(s)} `{s}`" for s in a.transfer_syntaxes),
         _role(a.as_scu, a.as_scp), "None")
        for a in accepted_contexts()
        if not a.is_storage
    ]  # fmt: skip
    return _table(("Abstract Syntax", "Transfer Syntaxes, in order of preference", "Role",
                   "Extended Negotiation"), rows)  # fmt: skip


def _role(as_scu: bool, as_scp: bool) -> str:
    if as_scu and as_scp:
        # A requestor's SCP/SCU role selection is answered as proposed; we never
        # send requests on such a context ourselves.
        return "SCP (role selection accepted as proposed)"
    return "SCP" if as_scp else "SCU"


def _storage_classes() -> str:
    storage = [a for a in accepted_contexts() if a.is_storage]
    rows = [(_name(a.sop_class), f"`{a.sop_class}`") for a in storage]
    return _table(("Storage SOP Class", "UID"), sorted(rows))


def _storage_syntaxes() -> str:
    storage = [a for a in accepted_contexts() if a.is_storage]
    every = {a.transfer_syntaxes for a in storage}
    if len(every) != 1:  # the statement says one table holds for every storage class
        raise ValueError("storage classes are accepted in different transfer syntaxes")
    (syntaxes,) = every
    rows = [
        (association.transfer_syntax_preference(s), _name(s), f"`{s}`",
         "compressed" if UID(s).is_compressed else "deflated" if UID(s).is_deflated
         else "uncompressed")
        for s in syntaxes
    ]  # fmt: skip
    return _table(("Rank", "Transfer Syntax", "UID", "Encoding"), rows)


def _storage_roles() -> str:
    roles = {(a.as_scu, a.as_scp) for a in accepted_contexts() if a.is_storage}
    return ", ".join(sorted(_role(*pair) for pair in roles))


def _proposed() -> str:
    rows = [
        (activity, _name(p.abstract_syntax),
         "<br>".join(f"{_name(s)} `{s}`" for s in p.transfer_syntaxes),
         "SCP (SCP/SCU role selection proposed: SCU no, SCP yes)" if p.scp_role else "SCU",
         "SCP/SCU Role Selection" if p.scp_role else "None")
        for activity, p in _PROPOSALS.items()
    ]  # fmt: skip
    rows.append((
        "Send a C-MOVE's objects to its Move Destination; push files (`imaging-scp send`)",
        "Each storage SOP class among the objects",
        "Each transfer syntax the objects are stored in, one context each; for uncompressed"
        f" ones also a context with {_name(ExplicitVRLittleEndian)} and"
        f" {_name(ImplicitVRLittleEndian)}",
        "SCU", "None",
    ))  # fmt: skip
    return _table(("Activity", "Abstract Syntax", "Transfer Syntaxes", "Role",
                   "Extended Negotiation"), rows)  # fmt: skip


def _storage_proposal_example() -> str:
    stored = [(CTImageStorage, JPEG2000Lossless), (CTImageStorage, ExplicitVRLittleEndian)]
    rows = [
        (_name(p.abstract_syntax), "<br>".join(f"{_name(s)} `{s}`" for s in p.transfer_syntaxes))
        for p in proposals(stored)
    ]
    objects = " and ".join(f"{_name(c)} in {_name(s)}" for c, s in stored)
    return f"Contexts proposed to send {objects}:\n\n" + _table(
        ("Abstract Syntax", "Transfer Syntaxes"), rows
    )


# What we propose as a requestor, by activity.
_PROPOSALS = {
    "Verify a peer (`imaging-scp echo`)": ECHO_PROPOSAL,
    "Deliver a storage commitment report": REPORT_PROPOSAL,
}


def _rejections() -> str:
    rows = [
        (*_codes(association.REJECT_NO_REASON),
         f"more than {association.MAX_PRESENTATION_CONTEXTS} presentation contexts, or two with"
         " one ID"),
        (*_codes(association.REJECT_APPLICATION_CONTEXT),
         f"an application context other than DICOM's (`{APPLICATION_CONTEXT_NAME}`)"),
        (*_codes(association.REJECT_CALLED_AE),
         "the called AE title is not ours (`require_called_aet`, on by default)"),
        (*_codes(association.REJECT_CALLING_AE),
         "the calling AE title is not in `allowed_callers`, or calls from a host not listed"
         " for it"),
        (*_codes(association.REJECT_BUSY),
         "`max_associations` associations in progress; the data filesystem below"
         " `min_free_space`; the index unavailable (an association proposing Verification"
         " only is still accepted, for its C-ECHO to say why)"),
    ]  # fmt: skip
    return _table(("Result", "Source", "Reason/Diag.", "When"), rows)


# A-ASSOCIATE-RJ Source (PS3.8 9.3.4)
_SOURCES = {
    1: "DICOM UL service-user",
    2: "DICOM UL service-provider (ACSE)",
    3: "DICOM UL service-provider (presentation)",
}


def _codes(rejection: tuple[int, int, int]) -> tuple[str, str, str]:
    result, source, diagnostic = rejection
    return (
        f"{result} {REJECT_RESULTS[result]}",
        f"{source} {_SOURCES[source]}",
        f"{diagnostic} {REJECT_REASONS[source, diagnostic]}",
    )


def _statuses(rows) -> str:
    return _table(
        ("Status", "Code", "Meaning"), [(kind, _hex(code), text) for code, kind, text in rows]
    )


# Success: what each outcome of a C-STORE is (storage.store.Outcome).
_OUTCOMES = {
    Outcome.STORED: "a new instance: its file written, fsynced and placed, its index row committed",
    Outcome.IDENTICAL_RESEND: "the same bytes again: nothing written",
    Outcome.KEPT_ASIDE: "different bytes under a stored UID, `duplicates = keep-first`: the"
    " first copy stays indexed, the new one is kept under `conflicts/`",
    Outcome.OVERWRITTEN: "different bytes under a stored UID, `duplicates = overwrite`: the"
    " new copy replaces the first",
    Outcome.RESTORED: "the same bytes as an instance whose file was gone or damaged: the"
    " resend takes its place",
}
# Why an instance is refused (storage.store.Refusal); the ErrorComment says it in words.
_REFUSALS = {
    Refusal.OUT_OF_SPACE: "the data filesystem is below `min_free_space`, or the disk is full",
    Refusal.WRITE_FAILED: "the file or the index could not be written (I/O error, the index"
    " unavailable for `index_timeout`): nothing was kept, send it again",
    Refusal.INDEX_CORRUPT: "the index is damaged: its admin must run `imaging-scp rebuild`",
    Refusal.MISMATCH: "the dataset's SOP Class or SOP Instance UID differs from the request's",
    Refusal.UNREADABLE: "the dataset does not decode in the context's transfer syntax",
    Refusal.MISSING_UID: "the request or the dataset lacks a SOP Class, SOP Instance, Study"
    " or Series Instance UID",
    Refusal.INVALID_UID: "one of those UIDs is not a valid UID (digits and dots, at most 64)",
    Refusal.SERIES_IN_OTHER_STUDY: "its series is already indexed under another study",
    Refusal.DUPLICATE: "different bytes under a stored UID, `duplicates = reject`",
    Refusal.OTHER_PATIENT: "the dataset names another patient than its study's (listed by"
    " `imaging-scp conflicts`)",
}


def _store_kind(code: int) -> str:
    if code >> 8 == 0xA7:
        return "Refused: Out of Resources"
    if code >> 8 == 0xA9:
        return "Error: Data Set Does Not Match SOP Class"
    return "Error: Cannot Understand"


def _store_statuses() -> str:
    outcomes = "; ".join(f"`{outcome}`: {_OUTCOMES[outcome]}" for outcome in Outcome)
    rows = [(store_service.SUCCESS, "Success", outcomes)]
    rows += [
        (code, _store_kind(code), _REFUSALS[refusal])
        for refusal, code in store_service.REFUSAL_STATUS.items()
    ]
    rows += [
        (store_service.NO_DATASET_STATUS, _store_kind(store_service.NO_DATASET_STATUS),
         "the C-STORE-RQ announces no data set"),
        (store_service.INTERNAL_ERROR_STATUS, _store_kind(store_service.INTERNAL_ERROR_STATUS),
         "an unexpected error (a bug: the log has its traceback); nothing was kept"),
    ]  # fmt: skip
    return _statuses(rows)


def _echo_statuses() -> str:
    return _statuses([
        (echo_service.SUCCESS, "Success", "this node can store: its index is available"),
        (echo_service.PROCESSING_FAILURE, "Failure: Processing Failure",
         "the index is unavailable; the ErrorComment says since when"),
    ])  # fmt: skip


def _find_statuses() -> str:
    s = find_service
    return _statuses([
        (s.PENDING, "Pending", "a match; every requested key it is supported for"),
        (s.PENDING_WITH_UNSUPPORTED_KEYS, "Pending",
         "a match; some requested keys are not supported and come back empty"),
        (s.SUCCESS, "Success", "every match was sent"),
        (s.CANCEL, "Cancel", "a C-CANCEL-RQ arrived: no more matches are sent"),
        (s.OUT_OF_RESOURCES, "Refused: Out of Resources",
         "more than `find_limit` matches (0: no limit)"),
        (s.IDENTIFIER_DOES_NOT_MATCH, "Failed: Identifier Does Not Match SOP Class",
         "no Query/Retrieve Level, PATIENT level in the Study Root model, a unique key missing"
         " above the level, a value that cannot be matched (the ErrorComment says which)"),
        (s.UNABLE_TO_PROCESS, "Failed: Unable to Process",
         "the identifier is missing, does not decode or is big endian; the index is damaged or"
         " the query failed"),
        (s.SOP_CLASS_NOT_SUPPORTED, "Failed: SOP Class Not Supported",
         "a C-FIND for a SOP class that is no FIND model"),
    ])  # fmt: skip


def _commitment_statuses() -> str:
    s = commitment_service
    return _statuses([
        (s.SUCCESS, "Success", "the request is recorded in the index (or is an exact repeat of"
         " a recorded one); its report follows"),
        (s.NO_SUCH_SOP_CLASS, "Failure: No Such SOP Class", "not the commitment SOP class"),
        (s.INVALID_OBJECT_INSTANCE, "Failure: Invalid SOP Instance",
         "not the well-known instance `1.2.840.10008.1.20.1.1`"),
        (s.NO_SUCH_ACTION, "Failure: No Such Action", "an Action Type ID other than 1"),
        (s.INVALID_ARGUMENT_VALUE, "Failure: Invalid Argument Value",
         "no valid Transaction UID, or an empty or invalid Referenced SOP Sequence"),
        (s.DUPLICATE_TRANSACTION_UID, "Failure: Duplicate Transaction UID",
         "a recorded Transaction UID with other references"),
        (s.RESOURCE_LIMITATION, "Failure: Resource Limitation",
         f"more than {s.MAX_ACTION_INFORMATION // 2**20} MiB of Action Information"),
        (s.PROCESSING_FAILURE, "Failure: Processing Failure", "the index could not record it"),
    ])  # fmt: skip


# Failure Reason (0008,1197) of a reference that is not committed.
_FAILURES = {
    commitments.NO_SUCH_OBJECT_INSTANCE: "not in the index",
    commitments.CLASS_INSTANCE_CONFLICT: "indexed under another SOP class",
    commitments.PROCESSING_FAILURE: "its file is missing, or its dataset's bytes no longer hash"
    " to the SHA-256 recorded when it arrived",
    commitments.SOP_CLASS_NOT_SUPPORTED: "the SOP class is one of another service"
    " (Verification, Query/Retrieve...), not a storage class",
}


def _failure_reasons() -> str:
    rows = []
    for code, when in _FAILURES.items():
        (shown_as,) = commitments.failures_by_name([code])
        rows.append((_hex(code), shown_as, when))
    return _table(("Failure Reason", "Shown as", "When"), rows)


def _models(roots: dict[str, str]) -> str:
    """Query/retrieve information models (SOP class UID: its root) and their levels."""
    rows = [(_name(uid), f"`{uid}`", ", ".join(_levels(root))) for uid, root in roots.items()]
    return _table(("Information Model", "UID", "Levels"), rows)


def _levels(root: str) -> list[str]:
    return [level for level in find.LEVELS if root == find.PATIENT_ROOT or level != find.PATIENT]


def _find_keys() -> str:
    keys = [*find.KEYS.values(), find.INSTANCE_AVAILABILITY, find.SOP_CLASSES_IN_STUDY]
    rows = []
    for key in keys:
        levels = [level for level in find.LEVELS if find.key_for(key.keyword, level) is key]
        rows.append(
            (key.keyword, f"({key.tag >> 16:04X},{key.tag & 0xFFFF:04X})", key.vr,
             ", ".join(levels), _matching(key))
        )  # fmt: skip
    return _table(("Attribute", "Tag", "VR", "Levels", "Matching"), rows)


def _matching(key: find.Key) -> str:
    if key.counts_patients:
        return "return only"
    if key is find.SOP_CLASSES_IN_STUDY:
        return "universal, list of UIDs: a study holding an instance of one of them"
    if key.vr == "UI":
        return "universal, single value, list of UIDs"
    if key.vr in ("DA", "TM"):
        paired = (
            key.keyword.replace("Date", "Time")
            if key.vr == "DA"
            else key.keyword.replace("Time", "Date")
        )
        if paired in find.KEYS:
            return f"universal, single value, range; with {paired}, one date-time range"
        return "universal, single value, range"
    if key.vr == "PN":
        return "universal, single value, wildcard; case-insensitive in every script"
    if key.keyword == "ModalitiesInStudy":
        return "universal, single value, wildcard, list: one of the study's modalities"
    return "universal, single value, wildcard, list"


# The configuration keys that matter to a peer.
_PEER_KEYS = (
    "aet", "host", "port", "tls_port", "require_called_aet", "allowed_callers", "max_associations",
    "max_pdu", "network_timeout", "duplicates", "min_free_space", "index_timeout", "find_limit",
    "peers", "report_retry_interval", "report_attempts", "tls_client_ca", "tls_handshake_timeout",
)  # fmt: skip


def _configuration() -> str:
    fields = {item.name: item for item in dataclasses.fields(Config)}
    rows = []
    for name in _PEER_KEYS:
        item = fields[name]
        default = (
            item.default if item.default is not dataclasses.MISSING else item.default_factory()
        )
        shown = default.text if hasattr(default, "text") else default
        rows.append((f"`{name}`", f"`{shown}`" if shown not in ("", {}) else "(none)",
                     item.metadata["help"]))  # fmt: skip
    return _table(("Key", "Default", "Meaning"), rows)


def _indexed_attributes() -> str:
    rows = [
        (a.keyword, f"({a.tag >> 16:04X},{a.tag & 0xFFFF:04X})", a.vr, a.level,
         _yes(a.key), a.fhir or "")
        for a in attributes.ATTRIBUTES
    ]  # fmt: skip
    return _table(("Attribute", "Tag", "VR", "Level", "C-FIND key", "ImagingStudy element"), rows)


# The retrieve operations, by the last word of their SOP classes' keywords: the
# DIMSE operation, and PS3.4's statuses for it (pynetdicom's tables).
_RETRIEVES = {"Move": "C-MOVE", "Get": "C-GET"}
_RETRIEVE_STATUSES = {
    "Move": status.QR_MOVE_SERVICE_CLASS_STATUS,
    "Get": status.QR_GET_SERVICE_CLASS_STATUS,
}


def _retrieve_kind(uid: str) -> str | None:
    """ "Move" or "Get" for a query/retrieve MOVE or GET SOP class, else None."""
    keyword = UID(uid).keyword
    return next((kind for kind in _RETRIEVES if keyword.endswith(f"InformationModel{kind}")), None)


def _retrieve_contexts() -> list[Accepted]:
    return [a for a in accepted_contexts() if _retrieve_kind(a.sop_class) is not None]


def service_modules() -> list[ModuleType]:
    """The DIMSE services, one module each: scp/*_service.py (scp.server's
    table routes each Command Field to one of them)."""
    names = [m.name for m in pkgutil.iter_modules(scp.__path__) if m.name.endswith("_service")]
    return [importlib.import_module(f"scp.{name}") for name in names]


def serving(sop_class_uid: str) -> ModuleType:
    """The service whose information models (its ROOTS: SOP class UID -> root) name the class."""
    (module,) = [m for m in service_modules() if sop_class_uid in getattr(m, "ROOTS", {})]
    return module


# The modules every service speaks through: their numbers (command fields, tags,
# PDU codes, defaults) are no statuses, though some equal one.
_PROTOCOL = {module.__name__ for module in (dimse, association, upper_layer, config)}
_CATEGORIES = ("Pending", "Success", "Warning", "Cancel", "Failure")


def service_statuses(modules: set[ModuleType], statuses: dict[int, tuple[str, str]]) -> list[int]:
    """The statuses services answer with: the public integer constants that
    `statuses` (PS3.4's for their operation) lists, of their modules and of the
    modules of scp they take their parts from; Pending first, failures last."""
    parts = {inspect.getmodule(value) for module in modules for value in vars(module).values()}
    modules = modules | {
        m
        for m in parts
        if m is not None and m.__name__.startswith("scp.") and m.__name__ not in _PROTOCOL
    }
    codes = {
        value
        for m in modules
        for name, value in vars(m).items()
        if not name.startswith("_") and name.isupper() and type(value) is int and value in statuses
    }
    return sorted(codes, key=lambda code: (_CATEGORIES.index(statuses[code][0]), code))


def _retrieve() -> str:
    retrieve = _retrieve_contexts()
    if not retrieve:
        return (
            "Not supported: no C-MOVE or C-GET SOP class is accepted (the negotiation's tables"
            " hold none): their presentation contexts are refused (abstract syntax not"
            " supported)."
        )
    roots = {a.sop_class: serving(a.sop_class).ROOTS[a.sop_class] for a in retrieve}
    parts = [
        "Accepted as SCP (Table 4.2-1), in these information models:",
        _models(roots),
    ]
    for kind, operation in _RETRIEVES.items():
        classes = [a.sop_class for a in retrieve if _retrieve_kind(a.sop_class) == kind]
        if not classes:
            continue
        statuses = _RETRIEVE_STATUSES[kind]
        codes = service_statuses({serving(uid) for uid in classes}, statuses)
        # PS3.4 gives Success and Cancel no meaning beyond their name.
        rows = [(code, statuses[code][0], statuses[code][1] or "—") for code in codes]
        parts += [f"{operation} response statuses:", _statuses(rows)]
    if any(_retrieve_kind(a.sop_class) == "Get" for a in retrieve):
        parts.append(
            "A C-GET's sub-operations go back on the requester's association, on the storage"
            " contexts for which it proposed the SCP role (SCP/SCU role selection, answered as"
            " 4.2.1.4.2 says)."
        )
    return "\n\n".join(parts)


# --- the statement ------------------------------------------------------------------


def statement() -> str:
    """The conformance statement, in Markdown."""
    version = importlib.metadata.version("imaging-scp")
    storage_count = sum(1 for a in accepted_contexts() if a.is_storage)
    max_pdu = Config.max_pdu
    parts = [
        f"# DICOM Conformance Statement: imaging-scp {version}",
        f"<!-- Generated by `{COMMAND}` (scp/conformance.py): the tables are read from the"
        " code, the prose is written there. Do not edit this file; change the code or the"
        " prose and run the command again. -->",
        # 1
        "## 1 Conformance Statement Overview",
        "imaging-scp is a DICOM receiver: it accepts associations, stores every object it is"
        " sent exactly as received (the dataset's bytes are never decoded and re-encoded), keeps"
        " an index of them shaped like a FHIR ImagingStudy, answers C-FIND queries over that"
        " index, sends what it holds back with C-MOVE and C-GET (each object as it was received),"
        " and answers storage commitment requests with a check of each file against the"
        " SHA-256 recorded when it arrived. It is one Application Entity, as SCP of the services"
        " below; as SCU it verifies peers (`imaging-scp echo`), sends a retrieve's objects"
        f" (C-STORE sub-operations) and pushes with `imaging-scp send`. It accepts {storage_count}"
        " storage SOP classes by name, every one in every transfer syntax, and any private or"
        " unknown storage SOP class as well. It creates no SOP instances and supports no media.",
        "Table 1-1: Network services",
        _network_services(),
        # 2
        "## 2 Table of Contents",
        "1 Overview · 2 Contents · 3 Introduction · 4 Networking (4.1 Implementation model, 4.2"
        " AE specification, 4.3 Network interfaces, 4.4 Configuration) · 5 Media interchange ·"
        " 6 Character sets · 7 Security · 8 Annexes",
        # 3
        "## 3 Introduction",
        "### 3.1 Revision History",
        f"| Version | Notes |\n|---|---|\n| {version} | First statement: generated from the code"
        " (`imaging-scp conformance`) and tested against the live engine"
        " (tests/test_conformance.py). |",
        "### 3.2 Audience and Remarks",
        "Written for the people who connect a modality, a PACS or a workstation to imaging-scp:"
        " the hospital's integration staff and the vendor's field engineer. It assumes PS3.2,"
        " PS3.4, PS3.7 and PS3.8. A conformance statement does not guarantee interoperation;"
        " test the connection (`imaging-scp echo`, one study sent and queried back).",
        "### 3.3 Definitions and Abbreviations",
        "AE: Application Entity. SCU/SCP: Service Class User/Provider. SOP: Service-Object Pair."
        " PDU: Protocol Data Unit. TLS: Transport Layer Security. *The index*: imaging-scp's"
        " catalog of what it stores (SQLite in the data directory, or PostgreSQL). *Committed*"
        " (of a C-STORE): see 4.2.1.4.2.",
        "### 3.4 References",
        "NEMA PS3 (DICOM), parts 2, 4, 7, 8 and 15; BCP 195 (RFC 9325); the project's README.",
        # 4
        "## 4 Networking",
        "### 4.1 Implementation Model",
        "#### 4.1.1 Application Data Flow",
        "```\n"
        "  modality / PACS                  imaging-scp (AE " + AE_TITLE + ")\n"
        "  C-ECHO         ------------>   Verify           -> answers while it can store\n"
        "  C-STORE        ------------>   Receive & store  -> file fsynced + index row\n"
        "  N-ACTION       ------------>   Commit           -> request recorded, files checked\n"
        "  N-EVENT-REPORT <------------   Report           -> same or new association\n"
        "  C-FIND         ------------>   Query            -> matches from the index\n"
        "  C-MOVE         ------------>   Retrieve         -> C-STORE on a new association\n"
        "                                                     to the Move Destination (`peers`)\n"
        "  C-GET          ------------>   Retrieve         -> C-STORE on the same association\n"
        "                                 Send             -> `imaging-scp send` (C-STORE SCU)\n"
        "                                 Verify a peer    -> `imaging-scp echo` (C-ECHO SCU)\n"
        "```",
        "#### 4.1.2 Functional Definitions of AE Activities",
        "- **Receive and store** (Storage SCP): each object is written to a temporary file as its"
        " P-DATA arrives, checked as it goes (the element walk, the UIDs), fsynced, renamed into"
        " `<Study>/<Series>/<SOP Instance>.dcm`, and its index row committed; only then is the"
        " C-STORE answered Success.\n"
        "- **Query** (Q/R FIND SCP): a C-FIND is answered from the index's columns, one Pending"
        " response per match, streamed; a C-CANCEL ends it.\n"
        "- **Commit** (Storage Commitment Push Model SCP): the N-ACTION's request is recorded in"
        " the index before its response, then every referenced instance is checked on disk.\n"
        "- **Report** (Storage Commitment Push Model SCP, N-EVENT-REPORT): on the requester's"
        " association when it is still open, else on a new association to the address `peers`"
        " gives for its AE title, retried until `report_attempts` are spent; pending reports"
        " survive a restart.\n"
        "- **Verify** (Verification SCP): C-ECHO is answered Success while the node can store,"
        " a failure saying why when its index is unavailable.\n"
        "- **Verify a peer** (Verification SCU): `imaging-scp echo HOST PORT`.\n"
        "- **Retrieve** (Q/R MOVE and GET SCP, Storage SCU): the matches stream from the index;"
        " each file is checked against the size and SHA-256 the index holds, then its data set"
        " is sent as stored, on a new association to the Move Destination's address in `peers`"
        " (C-MOVE) or back on the requester's association (C-GET); see 4.2.1.4.5.\n"
        "- **Send** (Storage SCU): `imaging-scp send --study|--series` pushes what the index"
        " holds to a peer with the same sub-operations.",
        "#### 4.1.3 Sequencing of Real-World Activities",
        "An instance must be stored (its C-STORE answered Success) before a commitment request"
        " naming it can succeed and before a C-FIND can return it: the index row a query reads"
        " and a commitment checks is committed before the C-STORE response. Commitment is"
        " checked when it is requested, not assumed from the C-STORE.",
        "### 4.2 AE Specifications",
        f"#### 4.2.1 {AE_TITLE} AE",
        "##### 4.2.1.1 SOP Classes",
        "The non-storage SOP classes accepted, with the transfer syntaxes and roles the"
        " negotiation accepts them in (Table 4.2-1); storage SOP classes in 4.2.1.4.2.",
        "Table 4.2-1: Presentation contexts accepted, other than storage",
        _service_contexts(),
        "##### 4.2.1.2 Association Policies",
        "- **General**: the application context name is"
        f" `{APPLICATION_CONTEXT_NAME}`. The largest PDU we receive is `max_pdu`"
        f" ({max_pdu} bytes by default), announced in the A-ASSOCIATE-AC; the PDUs we send are"
        " no larger than the requestor announces. A request may carry up to"
        f" {association.MAX_PRESENTATION_CONTEXTS} presentation contexts.\n"
        f"- **Number of associations**: `max_associations` ({Config.max_associations} by"
        " default) at once; more are rejected as transient (Table 4.2-3). Each association has"
        " its own thread.\n"
        "- **Asynchronous nature**: an Asynchronous Operations Window proposal is answered 1/1:"
        " one operation at a time, each way. Without one, the default (1/1) holds.\n"
        f"- **Implementation identifying information**: Implementation Class UID"
        f" `{IMPLEMENTATION_CLASS_UID}`, Implementation Version Name"
        f" `{IMPLEMENTATION_VERSION_NAME}`, in every A-ASSOCIATE-AC and A-ASSOCIATE-RQ we send"
        " and in the File Meta Information of every file we write, with the caller's AE title as"
        " Sending Application Entity Title (0002,0017) and ours as Receiving (0002,0018).\n"
        f"- **Timeouts**: a connection silent for `network_timeout` ({Config.network_timeout:g} s"
        " by default) is closed; on SIGTERM associations in flight get `drain_timeout`"
        f" ({Config.drain_timeout:g} s) to finish.",
        "##### 4.2.1.3 Association Initiation Policy",
        "We open associations for four activities, with these presentation contexts"
        " (Table 4.2-2); no other extended negotiation is proposed, and the Asynchronous"
        " Operations Window is not proposed (1/1). A report's association carries one"
        " N-EVENT-REPORT and is released. A C-MOVE's association to its Move Destination"
        " (the AE title's address in `peers`) lives within the requester's association, so"
        " `max_associations` bounds those too; it carries the move's C-STORE sub-operations,"
        " one at a time, each with the Move Originator AE Title and Message ID, and is"
        " released when the move ends. When the destination aborts it (or it breaks) while a"
        " sub-operation is sent, that sub-operation fails and the next goes on a new"
        " association; when the destination stops answering, or cannot be associated with"
        " again, every remaining sub-operation fails. `imaging-scp send` does the same.",
        "Table 4.2-2: Presentation contexts proposed",
        _proposed(),
        "The storage contexts are proposed for what the objects need, as in this example of"
        " objects stored in two syntaxes:",
        _storage_proposal_example(),
        "##### 4.2.1.4 Association Acceptance Policy",
        "An association is accepted unless one of these holds (checked in this order); then it"
        " is rejected with the A-ASSOCIATE-RJ below, and the log's `association.rejected` says"
        " why.",
        "Table 4.2-3: Association rejection",
        _rejections(),
        "Each presentation context is accepted or refused on its own: an abstract syntax we do"
        " not serve is refused (abstract syntax not supported), one proposed with no transfer"
        " syntax we accept is refused (transfer syntaxes not supported). SCP/SCU role selection"
        " is answered as Table 4.2-1 and 4.2.1.4.2 say; other extended negotiation (relational"
        " queries, fuzzy matching, SOP class common extended negotiation) is not answered, that"
        " is, not supported. A DIMSE request on an accepted context that its service does not"
        f" serve is answered {_hex(dimse.UNRECOGNIZED_OPERATION)} (unrecognized operation) and"
        " the association goes on.",
        "###### 4.2.1.4.1 Verification",
        _echo_statuses(),
        "###### 4.2.1.4.2 Storage",
        f"Every storage SOP class of Table 4.2-4 ({storage_count} classes) is accepted, and so is"
        " any other abstract syntax that is a private UID or that no DICOM service claims (a"
        " storage class newer than this statement): an object is stored as it is, whatever its"
        f" class. Each is accepted in every transfer syntax of Table 4.2-5, as {_storage_roles()}."
        " A transfer syntax not in the table (a private one) is accepted too, ranked last: DICOM"
        " requires its dataset to be explicit VR little endian.",
        "**Transfer syntax selection.** When a context proposes several transfer syntaxes, the"
        " one of lowest rank in Table 4.2-5 is accepted, the first proposed among equals: a"
        " compressed object is never decompressed on the way (and a sender that cannot convert"
        " does not fail). Among uncompressed syntaxes, explicit VR little endian, then implicit,"
        " then big endian: a sender that proposes big endian beside implicit VR for every object"
        " (dcmtk's `storescu`, with `-R` too) converts a big-endian object to little endian; it"
        " keeps it as it is by proposing big endian alone (`storescu -xb`). A class whose"
        " SCP role alone the requester takes (the contexts a C-GET's objects come back on) is"
        " one we only send on: there explicit VR little endian, then implicit, come first,"
        " since every uncompressed stored object can be sent in them; the others fit only the"
        " objects stored in them.",
        "Table 4.2-4: Storage SOP classes accepted",
        _storage_classes(),
        "Table 4.2-5: Transfer syntaxes accepted for storage, in order of preference",
        _storage_syntaxes(),
        "**What Success means.** A C-STORE is answered Success only once the object is"
        " *committed*: its file (the 128-byte preamble, `DICM`, a File Meta Information group,"
        " then the dataset bytes exactly as received) is written, fsynced, renamed into place"
        " with its directory fsynced, and its index row committed (`synchronous=FULL` on SQLite,"
        " a committed transaction on PostgreSQL). After a crash the next start re-indexes"
        " exactly the files that may lack their row. Storage level: 2 (full); no element is"
        " coerced, removed or added in the dataset; objects are kept until an admin deletes"
        " them (`imaging-scp delete`). Digital signatures are kept as received and not checked.",
        "**Duplicates.** A SOP Instance UID that is already stored: identical bytes are Success"
        " and nothing is written; different bytes follow `duplicates` (`keep-first` by default:"
        " the new copy is kept aside under `conflicts/`; `overwrite`; `reject`).",
        "Table 4.2-6: C-STORE response statuses",
        _store_statuses(),
        "###### 4.2.1.4.3 Storage Commitment Push Model",
        "A commitment here means: the object is in the index, of the SOP class the requester"
        " names, and its file is on disk with the dataset's bytes still hashing to the SHA-256"
        " recorded when it arrived. Each reference is checked when the request comes. The"
        " N-ACTION-RQ (Action Type 1) is recorded in the index before its N-ACTION-RSP; a"
        " repeated Transaction UID with the same references is answered Success and its"
        " recorded result reported again. Objects committed are kept until an admin deletes"
        " them; there is no time limit on a commitment.",
        "Table 4.2-7: N-ACTION response statuses",
        _commitment_statuses(),
        "**The report** (N-EVENT-REPORT-RQ): Event Type 1 when every reference is committed, 2"
        " when not, with the Transaction UID, our Retrieve AE Title, the Referenced SOP Sequence"
        " of the committed and the Failed SOP Sequence, each with its Failure Reason (Table"
        " 4.2-8). It goes on the requester's association unless the requester releases it within"
        f" {commitment_service.RELEASE_GRACE:g} s of the check; otherwise, or when it is not"
        " answered there, on a new association to the address `peers` gives for the"
        " requester's AE title (Table 4.2-2), retried from `report_retry_interval`, doubling, for"
        " `report_attempts` attempts. A requester with no address in `peers` gets its report on"
        " its own association only.",
        "Table 4.2-8: Failure Reasons in a report",
        _failure_reasons(),
        "###### 4.2.1.4.4 Query/Retrieve FIND",
        _models(find_service.ROOTS),
        "Hierarchical queries only: below its root, a query gives the unique key of every level"
        " above its own with a single value (no wildcard). Relational queries are not supported."
        " Keys not listed are returned empty, with the Pending status that says so. Matches come"
        " in the index's order (studies by date and time, series and instances by number).",
        "Table 4.2-9: C-FIND keys, the levels they are supported at, and their matching",
        _find_keys(),
        "Date and time values are matched against the values as normalised at ingest (a"
        " `2026-11-22` sent by an older modality matches `20261122`); a time range's upper end"
        " includes its whole unit. Person names are matched case-insensitively in every script,"
        " both sides case folded (`ß` is `ss`).",
        "Table 4.2-10: C-FIND response statuses",
        _find_statuses(),
        "###### 4.2.1.4.5 Query/Retrieve MOVE and GET",
        _retrieve(),
        "### 4.3 Network Interfaces",
        "TCP/IP: `host` is the address listened on (`0.0.0.0` by default: every IPv4"
        " address). DICOM's upper layer directly over TCP on `port`, and"
        " over TLS on `tls_port` when set (both may listen at once). TCP_NODELAY is set on"
        " every connection. No other protocol (DHCP, DNS-based AE lookup, LDAP) is used; host"
        " names in `allowed_callers` and `peers` are resolved by the system's resolver.",
        "### 4.4 Configuration",
        "A TOML file and command-line flags (`imaging-scp serve --config FILE`; flags win); the"
        " file's `allowed_callers` are reloaded on SIGHUP. AE title to presentation address"
        " mapping: ours is `aet` on `host`:`port` (and `tls_port`); a peer's, for commitment"
        ' reports, is in `peers` (AE = "HOST:PORT"). The keys a peer\'s administrator needs:',
        "Table 4.4-1: Configuration parameters",
        _configuration(),
        # 5
        "## 5 Media Interchange",
        "None: imaging-scp reads and writes no DICOM media (its files are Part 10 files, but no"
        " DICOMDIR is written).",
        # 6
        "## 6 Support of Character Sets",
        "Storage: every Specific Character Set is accepted and the dataset kept as sent. The"
        " indexed attributes (Annex 8.1) are decoded in the dataset's character set (those"
        " pydicom supports: the single-byte ISO 8859 sets, ISO 2022 with its extensions for"
        " Japanese, Korean and Chinese, GB18030, GBK, UTF-8), and kept as Unicode. C-FIND: the"
        " identifier is decoded in its own Specific Character Set; responses are in the default"
        " repertoire, or in UTF-8 (`ISO_IR 192`, stated in the response) when a value needs it."
        " Matching is on Unicode text, person names case folded.",
        # 7
        "## 7 Security",
        "### 7.1 Security Profiles",
        "The BCP 195 TLS Secure Transport Connection Profile, non-downgrading (PS3.15 B.9): on"
        " `tls_port`, TLS 1.2 or newer, forward-secret AEAD cipher suites only, no compression,"
        " no renegotiation. With `tls_client_ca`, every sender must present a certificate"
        " chaining to one of its CAs (and only those: the system's trust store is not loaded);"
        " without it, the server authenticates itself only. The handshake must finish within"
        " `tls_handshake_timeout`.",
        "### 7.2 Association Level Security",
        "`require_called_aet` (on by default) rejects associations addressed to another AE"
        " title; `allowed_callers`, when set, lets in only the calling AE titles it lists, each"
        " from the hosts or networks listed for it (Table 4.2-3).",
        "### 7.3 Application Level Security",
        "No user identity negotiation; no ATNA audit messages are sent. Every association"
        " (accepted, rejected and why, released, aborted), every object stored or refused (with"
        " its UIDs, the caller's AE title and address) and every commitment is one structured"
        " log event (JSON lines), which is the audit trail. Files and index are protected by the"
        " filesystem's permissions of the service's user.",
        # 8
        "## 8 Annexes",
        "### 8.1 IOD Contents",
        "No SOP instance is created. Of the objects received, these attributes are read into the"
        " index (the C-FIND keys, the ImagingStudy elements, the admin commands); nothing is"
        " coerced or changed in the stored object.",
        "Table 8.1-1: Attributes read from received objects",
        _indexed_attributes(),
        "### 8.2 Data Dictionary of Private Attributes",
        "None are defined. Private attributes received are stored as they are.",
        "### 8.3 Coded Terminology and Templates",
        "None used.",
        "### 8.4 Standard Extended, Specialized and Private SOP Classes",
        "None defined; private storage SOP classes are stored as any other (4.2.1.4.2).",
        "### 8.5 Private Transfer Syntaxes",
        "None defined; a private transfer syntax proposed for storage is accepted, ranked last.",
    ]
    return "\n\n".join(parts) + "\n"
