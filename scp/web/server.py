"""Run the web service: uvicorn serving scp.web.app, SIGHUP re-reading the tokens."""

import signal
from pathlib import Path

import structlog
import uvicorn

from scp.config import Config
from scp.web.access import BearerTokens, TokenFileError
from scp.web.app import web_app

log = structlog.get_logger("imaging_scp")

# A request head larger than this is refused (uvicorn's h11 limit), with 400;
# h11 is named, not left to "auto", which would take httptools if it were
# installed, and uvicorn sets that limit for h11 alone.
MAX_HEADER_BYTES = 16 * 1024


def serve(config: Config) -> int:
    tokens = BearerTokens(Path(config.web_tokens) if config.web_tokens else None)

    def reload_tokens(*_) -> None:
        try:
            log.info("web.tokens_reloaded", tokens=tokens.reload())
        except (OSError, TokenFileError) as exc:
            log.error("web.tokens_reload_failed", reason=str(exc), kept="the previous tokens")

    signal.signal(signal.SIGHUP, reload_tokens)
    server = uvicorn.Server(
        uvicorn.Config(
            web_app(config, tokens),
            host=config.web_host,
            port=config.web_port,
            loop="uvloop",
            http="h11",
            ssl_certfile=config.web_tls_certificate or None,
            ssl_keyfile=config.web_tls_private_key or None,
            log_config=None,  # ours (scp.logs): JSON lines under systemd
            access_log=False,
            server_header=False,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        )
    )
    log.info("web.listening", url=config.web_url, tokens_required=tokens.required)
    server.run()
    return 0
