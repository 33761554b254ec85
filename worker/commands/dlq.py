"""`license-worker dlq`: inspect the dead-letter topic and replay messages."""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

import click

from worker.cli_support import load_settings

if TYPE_CHECKING:
    from worker.ingest.dlq_tools import DeadLetterRecord


@click.group()
def dlq() -> None:
    """Inspect the dead-letter topic and replay messages after a fix."""


@dlq.command("inspect")
@click.option("--samples", default=3, show_default=True, help="Samples shown per reason.")
def dlq_inspect(samples: int) -> None:
    """Count dead letters by reason and source topic, with samples of each reason."""
    from worker.ingest.dlq_tools import inspect, read_dead_letters  # noqa: PLC0415

    settings = load_settings()

    async def collect() -> list[DeadLetterRecord]:
        return [record async for record in read_dead_letters(settings)]

    report = inspect(asyncio.run(collect()), samples)
    click.echo(f"{report.total} dead letters in {settings.dlq_topic}")
    for reason, count in report.by_reason.most_common():
        click.echo(f"\n{count:>8}  {reason}")
        for record in report.samples[reason]:
            click.echo(
                f"          {record.source_topic}[{record.headers.get('source.partition')}]"
                f"@{record.headers.get('source.offset')} at {record.headers.get('failed_at')}: "
                f"{record.headers.get('error.message', '')[:160]}"
            )
            click.echo(f"          value: {_preview(record.value)}")
            if record.truncated:
                click.echo(f"          {_truncation(record)}")
    if report.truncated:
        click.echo(
            f"\n{report.truncated} truncated (too large for the DLQ): the whole messages are "
            "at their source offsets; replay skips them"
        )
    if report.by_source:
        click.echo(
            "\nby source topic: " + ", ".join(f"{t} {n}" for t, n in report.by_source.most_common())
        )


@dlq.command("replay")
@click.option("--reason", "reasons", multiple=True, help="Only this reason (repeatable).")
@click.option("--source-topic", "source_topics", multiple=True, help="Only from this topic.")
@click.option("--dry-run", is_flag=True, help="Count what would be replayed; send nothing.")
def dlq_replay(reasons: tuple[str, ...], source_topics: tuple[str, ...], dry_run: bool) -> None:
    """Send dead letters back to their source topic, unchanged, once the cause is fixed.
    Ingestion is idempotent: replaying a message twice changes nothing the second time."""
    from worker.ingest.dlq_tools import (  # noqa: PLC0415
        read_dead_letters,
        replay,
        selected,
        split_truncated,
    )

    settings = load_settings()
    skipped: list[DeadLetterRecord] = []

    async def run_replay() -> int:
        chosen, truncated = split_truncated(
            [
                record
                async for record in read_dead_letters(settings)
                if selected(record, set(reasons), set(source_topics))
            ]
        )
        skipped.extend(truncated)
        if dry_run:
            return len(chosen)
        with click.progressbar(length=len(chosen), label="replaying", file=sys.stderr) as bar:
            return await replay(settings, chosen, on_sent=lambda _: bar.update(1))

    count = asyncio.run(run_replay())
    click.echo(f"{'would replay' if dry_run else 'replayed'} {count} messages")
    if skipped:
        click.echo(
            f"skipped {len(skipped)} truncated dead letters: their DLQ copy is cut, so it is "
            "not sent; the whole messages are in their source topics at"
        )
        for record in skipped:
            click.echo(f"  {_truncation(record)}")


def _truncation(record: DeadLetterRecord) -> str:
    return (
        f"truncated: the original is {record.source}, {record.headers.get('original_size')} "
        f"bytes, sha256 {record.headers.get('original_sha256')}"
    )


def _preview(value: bytes | None, limit: int = 120) -> str:
    if value is None:
        return "(no value)"
    text = value[:limit].decode("utf-8", "replace")
    return repr(text) + (f" ... ({len(value)} bytes)" if len(value) > limit else "")
