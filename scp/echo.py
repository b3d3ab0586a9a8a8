"""One C-ECHO, for `imaging-scp echo`: associate (Verification, Implicit VR
Little Endian) through our requestor (scp.upper_layer), C-ECHO-RQ, release —
each step within `timeout`, with a reason for every way it can fail."""

import time
from dataclasses import dataclass

from scp import dimse
from scp.upper_layer import AssociationError, NoAnswer, NotAccepted, Proposal, Requestor

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
# What `imaging-scp echo` proposes (the conformance statement lists it).
ECHO_PROPOSAL = Proposal(VERIFICATION, (IMPLICIT_LE,))


class EchoFailed(Exception):
    """The peer could not be reached, said no, or answered something else."""


@dataclass(frozen=True)
class EchoTimes:
    association_ms: float
    echo_ms: float


def echo(host: str, port: int, *, calling: str, called: str, timeout: float) -> EchoTimes:
    """One C-ECHO to `called`@`host`:`port`; EchoFailed with the reason unless
    it is answered Success."""
    peer = f"{called}@{host}:{port}"
    started = time.perf_counter()
    try:
        with Requestor(calling, timeout=timeout).associate(
            host, port, called, [ECHO_PROPOSAL]
        ) as association:
            associated = time.perf_counter()
            try:
                context = association.context(VERIFICATION)
            except NotAccepted as exc:
                raise EchoFailed(f"{exc} (C-ECHO)") from exc
            association.send(context, dimse.echo_request(1))
            try:
                response = association.receive().command
            except NoAnswer as exc:
                raise EchoFailed(f"{peer} did not answer the C-ECHO within {timeout:g} s") from exc
            answered = time.perf_counter()
    except AssociationError as exc:
        raise EchoFailed(str(exc)) from exc
    if response.status is None:
        raise EchoFailed(f"{peer} answered the C-ECHO without a status")
    if response.status != 0x0000:
        comment = response.text(dimse.ERROR_COMMENT)
        said = f": {comment}" if comment else ""
        raise EchoFailed(f"{peer} answered the C-ECHO with status 0x{response.status:04X}{said}")
    return EchoTimes((associated - started) * 1000, (answered - associated) * 1000)
