"""Logging configuration, in one place.

structlog renders JSON lines when stdout is not a terminal (journald, files,
pipes) and readable columns on a terminal. Records from the standard library's
logging (pynetdicom's warnings and errors) go through the same pipeline, so the
output is one format whatever emitted it.
"""

import logging
import sys

import structlog

_SHARED_PROCESSORS = [
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def error_line(message: str) -> str:
    """The one form of an error for people, on stderr, of every command."""
    return f"imaging-scp: error: {message}"


def configure_logging(level: str = "info", json_lines: bool | None = None) -> None:
    """Configure structlog and the standard library's root logger."""
    if json_lines is None:
        json_lines = not sys.stdout.isatty()
    renderer = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            *_SHARED_PROCESSORS,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        # One write per line (print() writes the newline separately): lines from
        # several worker processes sharing stdout never interleave.
        logger_factory=structlog.WriteLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
            foreign_pre_chain=[*_SHARED_PROCESSORS, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # pynetdicom narrates every PDU at INFO; its warnings and errors are what an
    # admin needs, and our own events already tell the story of each association.
    logging.getLogger("pynetdicom").setLevel(max(numeric_level, logging.WARNING))
