"""`license-worker report`: reports on license usage."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path

import click

from worker.cli_support import connected, load_settings, parse_time


@click.group()
def report() -> None:
    """Reports on license usage."""


@report.command("usage")
@click.option("--customer", "customer_id", metavar="ID", help="One customer (default: all).")
@click.option(
    "--as-of",
    "as_of_text",
    metavar="TIME",
    help="As the licenses stood at this ISO 8601 time, replayed from the license history.",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json", "csv", "xlsx"]),
    default="table",
    show_default=True,
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write to this file (required for xlsx; default: standard output).",
)
def report_usage(
    customer_id: str | None, as_of_text: str | None, output_format: str, output: Path | None
) -> None:
    """Licenses consumed per customer, with totals and every user and device: licensed or
    not, and why. Large reports are streamed."""
    from worker.report.build import (  # noqa: PLC0415
        ReportRequest,
        UnknownCustomerError,
        open_writer,
        write_usage_report,
    )

    if output_format == "xlsx" and output is None:
        raise click.UsageError("--format xlsx writes a workbook: give --output PATH")
    now = datetime.now(UTC)
    as_of = parse_time(as_of_text, "--as-of") if as_of_text else None
    if as_of is not None and as_of > now:
        raise click.BadParameter(
            "is in the future; leave it out for the live report", param_hint="--as-of"
        )
    settings = load_settings()
    request = ReportRequest(customer_id, as_of, now, settings.release_window)

    async def produce() -> None:
        async with connected(settings, for_reading=True) as repository:
            with open_writer(output_format, output, sys.stdout) as writer:
                await write_usage_report(repository, writer, request)

    try:
        asyncio.run(produce())
    except UnknownCustomerError as error:
        raise click.ClickException(str(error)) from None
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as Unix tools do.
        sys.stderr.close()
        raise SystemExit(0) from None
    except OSError as error:
        if output is None or error.filename is None:
            raise  # not the file: told by the command group
        # The path the user gave, not the `.partial` file it is written to first.
        raise click.ClickException(
            f"cannot write the report to {output}: {error.strerror}"
        ) from None
    if output is not None:
        click.echo(f"wrote {output}", err=True)
