"""structlog configuration: JSON lines for machines, console rendering in a terminal."""

from __future__ import annotations

import logging
import sys
import traceback

import structlog


def configure_logging(level: str = "info", output_format: str = "auto") -> None:
    use_console = output_format == "console" or (output_format == "auto" and sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Library loggers (aiokafka) go through the standard library: keep them to warnings.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(message)s")


def error_fields(error: BaseException) -> dict[str, str]:
    """What a log line may say about an error: its class and, from Postgres, its SQLSTATE.
    Never its message: Postgres and driver messages quote values (`invalid input syntax for
    type uuid: "alice@contoso.example"`, or a trigger's text), and a value may be personal."""
    fields = {"error": type(error).__name__}
    sqlstate = getattr(error, "sqlstate", None)
    if isinstance(sqlstate, str):
        fields["sqlstate"] = sqlstate
    return fields


def crash_fields(error: BaseException, frames: int = 8) -> dict[str, object]:
    """`error_fields` and where the error was raised (innermost frames, file:line function),
    for a crash log that replaces Python's traceback, which prints the message."""
    stack = traceback.extract_tb(error.__traceback__)[-frames:]
    return {
        **error_fields(error),
        "raised_at": [f"{frame.filename}:{frame.lineno} {frame.name}" for frame in stack],
    }
