"""Association negotiation as acceptor: what we accept, in which transfer syntax.

pynetdicom decodes the A-ASSOCIATE-RQ, negotiates the presentation contexts
(with SCP/SCU role selection) and encodes the A-ASSOCIATE-AC; this module
decides. Every storage SOP class is accepted, private and unknown ones
included (in both roles: a C-GET's requester takes the SCP role for them),
with Verification, Storage Commitment Push Model and Patient/Study Root FIND,
MOVE and GET beside them.
When a sender proposes several syntaxes for a storage context, we take the one
that lets it send its object as it is: compressed before uncompressed, so a
JPEG 2000 image is never decompressed on the way (and dcmtk's storescu, which
cannot convert, does not fail). Among the uncompressed ones the proposal says
nothing about the object: dcmtk's storescu proposes [explicit LE] and [big
endian, implicit LE] for every object (with -R too), dcmsend all three in one
context. Implicit VR before big endian, then, so that what is common (implicit
VR) goes as it is and what is retired (big endian) is converted; a sender keeps
a big-endian object as it is by proposing big endian alone (storescu -xb).
"""

from dataclasses import dataclass, field

from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import sop_class
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from storage.files import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
MAX_PRESENTATION_CONTEXTS = 128  # PS3.8 9.3.2.2: odd IDs 1 to 255

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_NO_REASON = (0x01, 0x01, 0x01)
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_BUSY = (0x02, 0x03, 0x02)  # transient: local limit exceeded


class RequestError(ValueError):
    """An A-ASSOCIATE-RQ that does not decode."""


@dataclass(frozen=True)
class Request:
    """What an A-ASSOCIATE-RQ asks."""

    calling_ae: str
    called_ae: str
    application_context: str
    contexts: list[PresentationContext]
    max_pdu: int  # what the requestor receives: 0 = no limit
    roles: dict[str, tuple[bool, bool]]  # SOP class: (SCU role, SCP role)
    async_ops: tuple[int, int] | None


@dataclass
class Agreement:
    """The accepted contexts, by ID, and the A-ASSOCIATE-AC that says so."""

    pdu: bytes
    contexts: dict[int, PresentationContext] = field(default_factory=dict)
    rejected: int = 0


def read_request(pdu: bytes) -> Request:
    """Decode an A-ASSOCIATE-RQ PDU; RequestError for one pynetdicom cannot take
    apart or whose contents make no sense (an even context ID, say)."""
    try:
        rq = A_ASSOCIATE_RQ()
        rq.decode(pdu)
        primitive = rq.to_primitive()
        contexts = list(primitive.presentation_context_definition_list)
        roles, async_ops, max_pdu = {}, None, 0
        for item in primitive.user_information:
            if isinstance(item, MaximumLengthNotification):
                max_pdu = item.maximum_length_received or 0
            elif isinstance(item, SCP_SCU_RoleSelectionNegotiation):
                roles[str(item.sop_class_uid)] = (bool(item.scu_role), bool(item.scp_role))
            elif isinstance(item, AsynchronousOperationsWindowNegotiation):
                async_ops = (
                    item.maximum_number_operations_invoked,
                    item.maximum_number_operations_performed,
                )
        request = Request(
            calling_ae=str(primitive.calling_ae_title).strip(),
            called_ae=str(primitive.called_ae_title).strip(),
            application_context=str(primitive.application_context_name or ""),
            contexts=contexts,
            max_pdu=max_pdu,
            roles=roles,
            async_ops=async_ops,
        )
    except Exception as exc:  # pynetdicom raises many kinds on malformed input
        raise RequestError(f"A-ASSOCIATE-RQ does not decode: {type(exc).__name__}: {exc}") from exc
    for cx in contexts:
        if cx.context_id is None or cx.context_id % 2 == 0:
            raise RequestError(f"even presentation context ID {cx.context_id}")
    return request


def transfer_syntax_preference(uid: str) -> int:
    """Rank of a proposed transfer syntax, lowest preferred."""
    syntax = UID(uid)
    if not syntax.is_transfer_syntax:
        # A private syntax: DICOM requires it to encode the dataset in explicit
        # VR little endian, which we can read; but a known syntax is safer.
        return 5
    if syntax.is_compressed:
        return 0
    if syntax.is_deflated:
        return 1
    return {ExplicitVRLittleEndian: 2, ImplicitVRLittleEndian: 3, ExplicitVRBigEndian: 4}.get(
        syntax, 5
    )


def _service_context(abstract_syntax: str) -> PresentationContext:
    """A non-storage service we serve, in the uncompressed syntaxes (little
    endian only for queries: their responses are encoded by hand)."""
    context = PresentationContext()
    context.abstract_syntax = abstract_syntax
    context.transfer_syntax = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    if abstract_syntax not in _QUERY_RETRIEVE:
        context.transfer_syntax.append(ExplicitVRBigEndian)
    return context


def _storage_contexts(proposed: list[PresentationContext]) -> list[PresentationContext]:
    """Acceptor contexts for the proposed storage-like abstract syntaxes (a
    storage SOP class, a private one, or one pynetdicom does not know): each in
    every transfer syntax proposed for it, as SCU and SCP, in the order of
    `transfer_syntax_preference` — the acceptor's order is the one
    `negotiate_as_acceptor` chooses by."""
    syntaxes: dict[str, list[str]] = {}
    for cx in proposed:
        uid = UID(cx.abstract_syntax)
        service = sop_class.uid_to_service_class(uid)
        # Not by keyword alone: pynetdicom names some classes unlike pydicom
        # (Modality Worklist FIND), and those are not storage.
        storage_like = (
            uid.is_private
            or service is StorageServiceClass
            or (service is ServiceClass and not hasattr(sop_class, uid.keyword))
        )
        if storage_like and uid not in _SERVICES:
            offered = syntaxes.setdefault(uid, [])
            offered += [ts for ts in cx.transfer_syntax if ts not in offered]
    contexts = []
    for uid, offered in syntaxes.items():
        context = PresentationContext()
        context.abstract_syntax = uid
        context.transfer_syntax = sorted(offered, key=transfer_syntax_preference)
        context.scu_role = context.scp_role = True
        contexts.append(context)
    return contexts


_QUERY_RETRIEVE = (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)
# Verification, Storage Commitment Push Model (scp.commitment_service), the
# FIND models (scp.find_service) and the MOVE and GET ones
# (scp.retrieve_service), as SCP.
_SERVICES = (Verification, StorageCommitmentPushModel, *_QUERY_RETRIEVE)


def our_user_information(max_pdu: int) -> list:
    """The User Information items we send either way: the largest PDU we take,
    and who we are."""
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return [length, implementation, version]


def agree(request: Request, max_pdu: int) -> Agreement:
    """Negotiate the proposed contexts and encode the A-ASSOCIATE-AC."""
    proposed = [cx for cx in request.contexts if cx.transfer_syntax]
    supported = [_service_context(uid) for uid in _SERVICES] + _storage_contexts(proposed)
    results, roles = negotiate_as_acceptor(proposed, supported, request.roles)
    for rq in request.contexts:
        if not rq.transfer_syntax:  # nothing to choose from
            empty = PresentationContext()
            empty.context_id = rq.context_id
            empty.abstract_syntax = rq.abstract_syntax
            empty.transfer_syntax = [ImplicitVRLittleEndian]
            empty.result = 0x04  # transfer syntaxes not supported
            results.append(empty)
    results.sort(key=lambda cx: cx.context_id)

    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT_NAME
    primitive.calling_ae_title = request.calling_ae or "UNKNOWN"
    primitive.called_ae_title = request.called_ae
    primitive.result = 0x00
    primitive.result_source = 0x01
    primitive.presentation_context_definition_results_list = results
    information = our_user_information(max_pdu)
    if request.async_ops is not None:
        # One operation at a time, each way: what we serve (PS3.7 D.3.3.3).
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = 1
        window.maximum_number_operations_performed = 1
        information.append(window)
    information.extend(roles)
    primitive.user_information = information
    ac = A_ASSOCIATE_AC()
    ac.from_primitive(primitive)
    accepted = {cx.context_id: cx for cx in results if cx.result == 0x00}
    return Agreement(ac.encode(), accepted, len(results) - len(accepted))
