"""structlog configuration: JSON lines for machines, console rendering in a terminal. The
libraries' logs (the standard library's `logging`: asyncpg's pool, aiokafka) and asyncio's
unhandled errors come out the same way, one line each."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import structlog


def configure_logging(
    level: str = "info",
    output_format: str = "auto",
    replica: str | None = None,
    *,
    library_level: str = "warning",
) -> None:
    """JSON lines, or console rendering (`auto`: in a terminal), coloured only in a
    terminal. Every line names the service's version and the replica that wrote it
    (`replica`, the REPLICA_ID setting: the host name by default). The libraries' lines
    from `library_level` up."""
    terminal = sys.stderr.isatty()
    use_console = output_format == "console" or (output_format == "auto" and terminal)
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=terminal)
        if use_console
        else structlog.processors.JSONRenderer()
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    identity = _identity(replica or socket.gethostname())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            identity,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _route_library_logs(renderer, [timestamper, identity], library_level)
    # Python's warnings and the errors it can only print ("Exception ignored in ...") are
    # lines of the same stream, not text in the middle of it.
    logging.captureWarnings(False)  # forgets a capture that a caller undid since
    logging.captureWarnings(True)
    sys.unraisablehook = log_unraisable_error


def service_version() -> str:
    try:
        return version("license-telemetry")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _identity(replica: str) -> structlog.types.Processor:
    fields = {"version": service_version(), "replica": replica}

    def add_identity(
        _: Any, __: str, event_dict: structlog.types.EventDict
    ) -> structlog.types.EventDict:
        for name, value in fields.items():
            event_dict.setdefault(name, value)
        return event_dict

    return add_identity


class _LibraryLogHandler(logging.Handler):
    """Writes to sys.stderr as it is when a record comes (as structlog's logger does)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


class _TransientCoordinatorWait(logging.Filter):
    """aiokafka logs "Group Coordinator Request failed: ... GroupCoordinatorNotAvailableError"
    at error level while a fresh broker creates its offsets topic, and retries by itself
    until the coordinator answers: a normal wait, told as one, at info level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.levelno >= logging.ERROR
            and "GroupCoordinatorNotAvailable" in record.getMessage()
        ):
            record.levelno, record.levelname = logging.INFO, "INFO"
            return logging.getLogger().isEnabledFor(logging.INFO)
        return True


def _route_library_logs(
    renderer: structlog.types.Processor,
    stamps: list[structlog.types.Processor],
    library_level: str = "warning",
) -> None:
    """Library loggers go through the standard library: warnings and up, rendered like the
    worker's own lines (`logger` names the library), an error by its class and never with
    a traceback, which would print its message (see `exception_fields`)."""
    handler = _LibraryLogHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                *stamps,
                _exception_as_fields,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for previous in [h for h in root.handlers if isinstance(h, _LibraryLogHandler)]:
        root.removeHandler(previous)
    handler.addFilter(_TransientCoordinatorWait())
    root.addHandler(handler)
    root.setLevel(logging.getLevelName(library_level.upper()))


def _exception_as_fields(
    _: Any, __: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    exc_info = event_dict.pop("exc_info", None)
    error = exc_info[1] if isinstance(exc_info, tuple) else exc_info
    if isinstance(error, BaseException):
        event_dict.update(exception_fields(error))
    return event_dict


def exception_fields(error: BaseException) -> dict[str, object]:
    """An error in a log line: an expected outage (Postgres or a broker away) by its class
    and SQLSTATE (`error_fields`); anything else also by where it was raised (`crash_fields`)."""
    from worker.db.errors import is_transient_database_error  # noqa: PLC0415 (asyncpg)

    if is_transient_database_error(error):
        return dict(error_fields(error))
    return crash_fields(error)


def log_unhandled_asyncio_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's handler for an error nobody awaited (a failed callback, "Task exception was
    never retrieved"): one structured line instead of asyncio's traceback."""
    error = context.get("exception")
    fields = exception_fields(error) if isinstance(error, BaseException) else {}
    structlog.get_logger("asyncio").error(
        "asyncio.unhandled_error", message=str(context.get("message", "")), **fields
    )


def log_unraisable_error(unraisable: Any) -> None:
    """Python's handler for an error it cannot raise (in a finaliser, a generator closed
    by the collector): one structured line instead of "Exception ignored in" and a
    traceback."""
    error = unraisable.exc_value
    fields = (
        exception_fields(error)
        if isinstance(error, BaseException)
        else {"error": getattr(unraisable.exc_type, "__name__", "unknown")}
    )
    structlog.get_logger("python").error(
        "python.unraisable_error", message=str(unraisable.err_msg or ""), **fields
    )


def install_asyncio_error_logging() -> None:
    asyncio.get_running_loop().set_exception_handler(log_unhandled_asyncio_error)


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
