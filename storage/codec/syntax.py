"""Transfer syntaxes: how a dataset in each is encoded, one table."""

from dataclasses import dataclass

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"


@dataclass(frozen=True)
class TransferSyntax:
    """What a transfer syntax UID says about the dataset's bytes."""

    uid: str
    implicit: bool  # implicit VR (else explicit)
    little_endian: bool
    deflated: bool  # the whole dataset is a raw deflate stream
    encapsulated: bool  # pixel data in fragments (a compressed syntax)


_NATIVE = {
    syntax.uid: syntax
    for syntax in (
        TransferSyntax(IMPLICIT_VR_LITTLE_ENDIAN, True, True, False, False),
        TransferSyntax(EXPLICIT_VR_LITTLE_ENDIAN, False, True, False, False),
        TransferSyntax(DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, False, True, True, False),
        TransferSyntax(EXPLICIT_VR_BIG_ENDIAN, False, False, False, False),
    )
}


def transfer_syntax(uid: str) -> TransferSyntax:
    """The properties of `uid`. Every syntax not in the table is one of PS3.5's
    encapsulated ones: Explicit VR Little Endian with pixel data in fragments."""
    syntax = _NATIVE.get(uid)
    if syntax is None:
        return TransferSyntax(uid, False, True, False, True)
    return syntax
