"""The web's way to the index: readers that wait at most `index_timeout`, a 503
with the reason while the index is unavailable, and `GET /health` for a load
balancer."""

import sqlite3

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from scp.config import Config
from storage.catalog.engines import IndexUnreachable
from storage.catalog.reads import CatalogReader

log = structlog.get_logger("imaging_scp")

HEALTH_PATH = "/health"
# What a client is told to wait before trying again.
RETRY_AFTER = 10


def reader(config: Config) -> CatalogReader:
    """A reader lent by the pool within `index_timeout` (IndexUnreachable after)."""
    return CatalogReader.open(config.index_location, pooled=True, timeout=config.index_timeout)


def unavailable_errors() -> tuple[type[BaseException], ...]:
    """What a read raises while the index cannot answer: no connection within
    the timeout, the engine's operational errors (a server gone mid-query), or
    no tables yet (SQLite's "no such table" is an OperationalError)."""
    import psycopg

    return (
        IndexUnreachable,
        psycopg.OperationalError,
        psycopg.errors.UndefinedTable,
        sqlite3.OperationalError,
    )


def routes(config: Config) -> list[Route]:
    def health(request: Request) -> Response:
        try:
            with reader(config) as index:
                index.answers()
        except unavailable_errors() as exc:
            return _unavailable(request, exc)
        return JSONResponse({"index": "available"})

    return [Route(HEALTH_PATH, health, methods=["GET"])]


def handlers() -> dict:
    """Starlette's exception handlers: a 503 for the index being unavailable."""
    return {kind: _unavailable for kind in unavailable_errors()}


def _unavailable(request: Request, exc: BaseException) -> Response:
    reason = f"index unavailable: {exc}".strip()
    if type(exc).__name__ == "UndefinedTable" or "no such table" in reason:
        reason += " (no `imaging-scp serve` has set this index up yet: start it once)"
    log.warning("web.index_unavailable", path=request.url.path, reason=reason)
    headers = {"Retry-After": str(RETRY_AFTER)}
    if request.url.path.startswith("/fhir/"):
        from scp.web.fhir_api import outcome  # here: fhir_api reads through this module

        return outcome(503, "transient", reason, headers=headers)
    return JSONResponse({"index": "unavailable", "error": reason}, 503, headers=headers)
