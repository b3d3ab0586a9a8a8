"""The Verification service as SCP: C-ECHO.

A C-ECHO answers Success while this node can store; while its index is
unavailable, a processing failure saying since when (the reason is in the
log), which `imaging-scp echo` prints.
"""

from scp import dimse
from scp.association import Conversation, Outbox, Session, Unserved
from storage.catalog.health import IndexHealth

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110  # a C-ECHO while this node cannot store


class EchoService:
    def __init__(self, health: IndexHealth):
        self.health = health

    def join(self, session: Session) -> "EchoConversation":
        return EchoConversation(self.health, session)


class EchoConversation(Conversation):
    def __init__(self, health: IndexHealth, session: Session):
        self.health = health
        self.session = session

    def request(self, command: dimse.Command, outbox: Outbox) -> Unserved | None:
        if command.has_dataset:  # a C-ECHO has none: not a request we know
            return Unserved(self.session, command, outbox)
        health = self.health
        if health.available:
            self.session.log.info("echo")
            status, comment = SUCCESS, None
        else:
            self.session.log.warning("echo.failed", reason=health.describe())
            status, comment = PROCESSING_FAILURE, health.error_comment()
        outbox.send(
            dimse.response(
                dimse.C_ECHO_RSP,
                command.message_id,
                status,
                sop_class_uid=command.uid(dimse.AFFECTED_SOP_CLASS_UID),
                error_comment=comment,
            )
        )
        return None
