"""`license-worker reconcile --from D --to D`: the daily counts billing folds from the topic
against the usage snapshots and the as-of report (worker/licensing/reconcile_days.py).

Exit status: 0 no difference, 3 differences (counts, subjects whose events cannot be folded,
unreadable records), 1 the check could not run (database or Kafka unreachable, unknown
customer), 2 a bad argument."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING

import click

from worker.cli_support import connected, load_settings, parse_time
from worker.failures import ExitCode
from worker.report.safe_text import printable

if TYPE_CHECKING:
    # Imported when run: the module needs aiokafka, which `--help` should not load.
    from worker.licensing.reconcile_days import DailyReconciliation

DIFFERENCES_EXIT_STATUS = ExitCode.DIFFERENCES


def parse_day(text: str, param_hint: str) -> date:
    """A UTC day from `2026-12-01` or from a time with a zone (its UTC date)."""
    if "T" in text or " " in text:
        return parse_time(text, param_hint).astimezone(UTC).date()
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither a date nor an ISO 8601 time", param_hint=param_hint
        ) from None


def run_daily_reconciliation(
    customer_id: str | None, first: str, last: str, show: int, bill: bool
) -> None:
    from worker.licensing.reconcile_days import days_between, reconcile_days  # noqa: PLC0415
    from worker.report.build import UnknownCustomerError  # noqa: PLC0415

    try:
        days = days_between(parse_day(first, "--from"), parse_day(last, "--to"))
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--to") from None
    settings = load_settings()

    async def run_check() -> DailyReconciliation:
        async with connected(settings, for_reading=True) as repository:
            return await reconcile_days(settings, repository, days, customer_id)

    try:
        result = asyncio.run(run_check())
    except UnknownCustomerError as error:
        raise click.ClickException(str(error)) from None
    if bill:
        _print_bill(result)
    _print_differences(result, show)
    summary = (
        f"{days[0]}..{days[-1]}: {result.fold.subjects} license subjects "
        f"({result.fold.events} events, {result.fold.duplicates} duplicates skipped) "
        f"folded from {settings.license_events_topic}; {result.compared} customer instants "
        f"compared ({result.snapshots} snapshots), {result.pending} pending (license events "
        "not published yet)"
    )
    if result.unreadable:
        summary += f", {result.unreadable} unreadable records"
    if not result.agrees:
        click.echo(f"differences: {summary}", err=True)
        raise SystemExit(DIFFERENCES_EXIT_STATUS)
    click.echo(f"no difference: {summary}")


def _print_differences(result: DailyReconciliation, show: int) -> None:
    if result.differences:
        rows = [("customer", "day", "package", "at", "topic", "snapshot", "report")]
        rows += [
            (
                printable(d.customer_id),
                d.day.isoformat(),
                d.package,
                _time(d.at),
                str(d.topic),
                "-" if d.snapshot is None else str(d.snapshot),
                str(d.report),
            )
            for d in result.differences[:show]
        ]
        click.echo("licenses that differ (topic: events decided by `at`, folded as billing does)")
        _table(rows)
        if len(result.differences) > show:
            click.echo(f"... and {len(result.differences) - show} more")
    for anomaly in result.anomalies[:show]:
        click.echo(f"cannot fold: {printable(anomaly.describe())}")
    if len(result.anomalies) > show:
        click.echo(f"... and {len(result.anomalies) - show} more subjects that cannot be folded")


def _print_bill(result: DailyReconciliation) -> None:
    """Licenses held at the end of each day by effective time, in runs of equal days."""
    runs: dict[tuple[str, str], list[tuple[date, date, int]]] = defaultdict(list)
    for day, counts in sorted(result.bill().items()):
        for (customer_id, package), licenses in counts.items():
            series = runs[(customer_id, package)]
            if series and series[-1][2] == licenses and (day - series[-1][1]).days == 1:
                series[-1] = (series[-1][0], day, licenses)
            else:
                series.append((day, day, licenses))
    rows = [("customer", "package", "days", "licenses")]
    for (customer_id, package), series in sorted(runs.items()):
        rows += [
            (printable(customer_id), package, f"{first}..{last}", str(licenses))
            for first, last, licenses in series
        ]
    click.echo("the bill: licenses held at the end of each day (UTC), by effective_at")
    _table(rows)


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        click.echo("  ".join(cells).rstrip())


def _time(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")
