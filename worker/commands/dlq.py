"""`license-worker dlq`: inspect the dead-letter topic and replay messages."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import click

from worker.cli_support import load_settings

if TYPE_CHECKING:
    from worker.ingest.dlq_tools import DeadLetterRecord

# Acknowledged sends between two progress lines on stderr.
PROGRESS_EVERY = 1000


@click.group()
def dlq() -> None:
    """Inspect the dead-letter topic and replay messages after a fix."""


@dlq.command("inspect")
@click.option(
    "--samples",
    default=3,
    show_default=True,
    type=click.IntRange(min=0),
    help="Samples shown per reason.",
)
def dlq_inspect(samples: int) -> None:
    """Count dead letters by reason and source topic, with samples of each reason."""
    from worker.ingest.dlq_tools import inspect_dead_letters, truncation_note  # noqa: PLC0415

    settings = load_settings()
    report = asyncio.run(inspect_dead_letters(settings, samples))
    click.echo(f"{report.total} dead letters in {settings.dlq_topic}")
    for reason, count in report.by_reason.most_common():
        click.echo(f"\n{count:>8}  {_shown(reason)}")
        for record in report.samples[reason]:
            click.echo(
                f"          {_shown(record.source)} at {_shown(record.headers.get('failed_at'))}: "
                f"{_shown(record.headers.get('error.message', ''), 160)}"
            )
            click.echo(f"          value: {_preview(record.value, record.size)}")
            if record.truncated:
                click.echo(f"          {_shown(truncation_note(record))}")
    if report.truncated:
        click.echo(
            f"\n{report.truncated} truncated (too large for the DLQ): the whole messages are "
            "at their source offsets; replay skips them"
        )
    if report.by_source:
        click.echo(
            "\nby source topic: "
            + ", ".join(f"{_shown(t)} {n}" for t, n in report.by_source.most_common())
        )


@dlq.command("replay")
@click.option("--reason", "reasons", multiple=True, help="Only this reason (repeatable).")
@click.option("--source-topic", "source_topics", multiple=True, help="Only from this topic.")
@click.option("--dry-run", is_flag=True, help="Count what would be replayed; send nothing.")
def dlq_replay(reasons: tuple[str, ...], source_topics: tuple[str, ...], dry_run: bool) -> None:
    """Send dead letters back to their source topic, unchanged, once the cause is fixed.
    Only the agent and console topics are written to; a dead letter naming any other topic
    is skipped and reported. Ingestion is idempotent: replaying a message twice changes
    nothing the second time."""
    from worker.ingest.dlq_tools import replay_dead_letters, replay_topics  # noqa: PLC0415

    settings = load_settings()

    def progress(record: DeadLetterRecord) -> None:
        sent[0] += 1
        if sent[0] % PROGRESS_EVERY == 0:
            click.echo(f"replaying: {sent[0]} sent", err=True)

    sent = [0]
    report = asyncio.run(
        replay_dead_letters(settings, reasons, source_topics, dry_run=dry_run, on_sent=progress)
    )
    click.echo(f"{'would replay' if dry_run else 'replayed'} {report.sent} messages")
    if report.truncated:
        click.echo(
            f"skipped {report.truncated} truncated dead letters: their DLQ copy is cut, so it "
            "is not sent; the whole messages are in their source topics at"
        )
        for note in report.truncated_sources:
            click.echo(f"  {_shown(note)}")
        if report.truncated > len(report.truncated_sources):
            click.echo(f"  ... and {report.truncated - len(report.truncated_sources)} more")
    if report.foreign:
        allowed = ", ".join(sorted(replay_topics(settings)))
        click.echo(
            f"skipped {report.foreign} dead letters naming a topic replay never writes to "
            f"(only {allowed}):"
        )
        for topic, count in report.foreign_topics.most_common():
            click.echo(f"  {topic[:200]!r} {count}")


def _shown(text: str | None, limit: int = 200) -> str:
    """A header value for the terminal: its repr (no control or escape characters reach
    the terminal raw), cut to `limit`. Headers are whatever was written to the DLQ."""
    if text is None:
        return "None"
    shown = repr(text[:limit])[1:-1]
    return shown + ("..." if len(text) > limit else "")


def _preview(value: bytes | None, size: int, limit: int = 120) -> str:
    if value is None:
        return "(no value)"
    text = value[:limit].decode("utf-8", "replace")
    return repr(text) + (f" ... ({size} bytes)" if size > limit else "")
