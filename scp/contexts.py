"""Presentation contexts: what the receiver accepts, and in which transfer syntax.

Every storage SOP class is accepted, private and unknown ones included, in
whatever transfer syntax the sender proposes. When a sender proposes several
syntaxes for one context, we pick the one that lets it send its object as it
is: compressed before uncompressed, so a JPEG 2000 image is never decompressed
on the way (and so dcmtk's storescu, which cannot convert, does not fail).
"""

from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import _config, acse
from pynetdicom.presentation import PresentationContext, negotiate_unrestricted
from pynetdicom.sop_class import Verification

_pynetdicom_negotiate_unrestricted = negotiate_unrestricted


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


def negotiate_compressed_first(rq_contexts, ac_contexts, roles=None):
    """pynetdicom's unrestricted negotiation, but choosing each accepted storage
    context's transfer syntax by `transfer_syntax_preference` rather than taking
    the first one proposed."""
    result, reply_roles = _pynetdicom_negotiate_unrestricted(rq_contexts, ac_contexts, roles)
    proposed = {cx.context_id: cx.transfer_syntax for cx in rq_contexts}
    for cx in result:
        if cx.result == 0x00 and cx.abstract_syntax != Verification and proposed.get(cx.context_id):
            cx.transfer_syntax = [min(proposed[cx.context_id], key=transfer_syntax_preference)]
    return result, reply_roles


def install_storage_negotiation() -> None:
    """Make pynetdicom accept every storage SOP class, with our syntax preference.

    pynetdicom has no hook for this: its ACSE module calls
    `negotiate_unrestricted` by name, so we replace that name.
    """
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    acse.negotiate_unrestricted = negotiate_compressed_first


def supported_contexts() -> list[PresentationContext]:
    """Contexts negotiated the ordinary way: Verification (C-ECHO). Storage
    contexts are accepted by the unrestricted negotiation."""
    context = PresentationContext()
    context.abstract_syntax = Verification
    context.transfer_syntax = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
    return [context]
