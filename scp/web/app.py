"""The web service's ASGI application: its routes behind the token check."""

import structlog
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from scp.config import Config
from scp.web import dicomweb, fhir_api, index
from scp.web.access import BearerTokens

log = structlog.get_logger("imaging_scp")


def web_app(config: Config, tokens: BearerTokens) -> Starlette:
    app = Starlette(
        routes=[*fhir_api.routes(config), *dicomweb.routes(config), *index.routes(config)],
        exception_handlers=index.handlers(),
    )
    app.add_middleware(_RequireToken, tokens=tokens)
    return app


class _RequireToken:
    """401 and no data for a request without a valid bearer token, when tokens
    are required (but /health: a load balancer has none, and it tells only
    whether the index answers); the token's name goes into the request's scope
    for the logs."""

    def __init__(self, app: ASGIApp, tokens: BearerTokens):
        self._app = app
        self._tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self._tokens.required
            or scope["path"] == index.HEALTH_PATH
        ):
            await self._app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        name = self._tokens.name_of(authorization)
        if name is None:
            client = scope.get("client")
            log.warning(
                "web.unauthorized",
                peer=client[0] if client else None,
                path=scope["path"],
                reason="no token" if not authorization else "unknown token",
            )
            response = fhir_api.outcome(
                401,
                "login",
                "a valid bearer token is required",
                headers={"WWW-Authenticate": 'Bearer realm="imaging-scp"'},
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["token_name"] = name
        await self._app(scope, receive, send)
