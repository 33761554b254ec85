"""The `license-worker` command."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import click
import orjson
import structlog

from worker.cli_support import (
    DifferencesFound,
    command_failure,
    connected,
    load_settings,
    parse_time,
)
from worker.commands.dlq import dlq
from worker.commands.erasure import erase, hold, release_hold
from worker.commands.license_events import license_events
from worker.commands.report import report
from worker.ops.logs import crash_fields, install_asyncio_error_logging

if TYPE_CHECKING:
    from worker.licensing.reconcile import Reconciliation

log = structlog.get_logger(__name__)


class _Commands(click.Group):
    """Every failure of every command ends as one line on standard error and a documented
    exit status (worker/failures.py, ExitCode), never as a traceback: Python's would print
    the error's message, which can quote a personal value."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as error:
            raise command_failure(error) from None


@click.group(cls=_Commands)
@click.version_option(package_name="license-telemetry", prog_name="license-worker")
def main() -> None:
    """License telemetry worker: agent signals from Kafka into license accounting in Postgres.

    Configuration comes from environment variables; see the README."""


@main.command()
def migrate() -> None:
    """Apply the database migrations not applied yet (safe to run twice, or concurrently)."""
    # Imported here, as in every command: keeps `--help` fast.
    import asyncpg  # noqa: PLC0415

    from worker.db.migrations import (  # noqa: PLC0415
        MigrationChangedError,
        MigrationNotPermittedError,
        MigrationTimedOutError,
        MigrationTimeouts,
    )
    from worker.db.sql_files import load_migrations  # noqa: PLC0415

    settings = load_settings()

    key = settings.pseudonym_key
    key_hash = hashlib.sha256(key.get_secret_value().encode()).hexdigest() if key else ""

    async def apply() -> None:
        async with connected(settings, require_migrated=False) as repository:
            applied = await repository.apply_migrations(
                load_migrations(),
                key_hash,
                MigrationTimeouts(
                    settings.migration_lock_timeout_seconds,
                    settings.migration_statement_timeout_seconds,
                ),
            )
        log.info("migration.finished", applied=[migration.version for migration in applied])

    try:
        asyncio.run(apply())
    except (MigrationChangedError, MigrationNotPermittedError, MigrationTimedOutError) as error:
        raise click.ClickException(str(error)) from None
    except asyncpg.RaiseError as error:  # a migration's own refusal (RAISE EXCEPTION)
        raise click.ClickException(f"migration refused: {error}") from None


@main.command("create-roles")
@click.option(
    "--owner",
    default="license_owner",
    show_default=True,
    help="Owns the tables; `migrate` runs as it.",
)
@click.option(
    "--worker",
    default="license_worker",
    show_default=True,
    help="`run` and the other commands run as it.",
)
@click.option(
    "--reporter",
    default="license_reporter",
    show_default=True,
    help="Reads what `report usage` reads, nothing else; writes nothing.",
)
@click.option(
    "--owner-password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Sets the owner's password to this file's content (else left as it is).",
)
@click.option(
    "--worker-password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Sets the worker's password to this file's content (else left as it is).",
)
@click.option(
    "--reporter-password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Sets the reporter's password to this file's content (else left as it is).",
)
def create_roles(
    *,
    owner: str,
    worker: str,
    reporter: str,
    owner_password_file: Path | None,
    worker_password_file: Path | None,
    reporter_password_file: Path | None,
) -> None:
    """Create the service's database roles and grant them what they need, no more.

    Run by a DBA with DATABASE_URL naming a superuser and the service's database, before the
    first `migrate`; safe to run again (after migrations, to change a password). Only the
    SCRAM verifiers of the passwords are sent, never the passwords."""
    from worker.db.roles import (  # noqa: PLC0415
        DatabaseRoles,
        RoleSetupRefusedError,
        scram_sha256_verifier,
    )
    from worker.settings import read_secret_file  # noqa: PLC0415

    settings = load_settings()
    try:
        roles = DatabaseRoles(owner, worker, reporter)
        verifiers = [
            scram_sha256_verifier(read_secret_file(option, path)) if path else ""
            for option, path in (
                ("--owner-password-file", owner_password_file),
                ("--worker-password-file", worker_password_file),
                ("--reporter-password-file", reporter_password_file),
            )
        ]
    except ValueError as error:
        raise click.UsageError(str(error)) from None

    async def set_up() -> None:
        async with connected(settings, require_migrated=False) as repository:
            await repository.set_up_roles(roles, *verifiers)

    try:
        asyncio.run(set_up())
    except RoleSetupRefusedError as error:
        raise click.ClickException(f"create-roles refused: {error}") from None
    click.echo(
        f"roles ready: migrate as {roles.owner}, run the worker as {roles.worker}, "
        f"report as {roles.reporter}"
        + "".join(
            f"; {role}'s password left unchanged"
            for role, verifier in zip(
                (roles.owner, roles.worker, roles.reporter), verifiers, strict=True
            )
            if not verifier
        )
    )


@main.command()
def run() -> None:
    """Consume agent events until SIGTERM or SIGINT."""
    from worker.service import Worker, install_signal_handlers  # noqa: PLC0415

    settings = load_settings(needs_pseudonym_key=True, long_running=True)

    async def serve() -> None:
        install_asyncio_error_logging()
        worker = Worker(settings)
        install_signal_handlers(worker)
        await worker.run()

    from worker.db.errors import DatabaseAccessRefused  # noqa: PLC0415
    from worker.failures import OperatorError  # noqa: PLC0415
    from worker.kafka.refusals import KafkaAccessRefused  # noqa: PLC0415
    from worker.weak_settings import WeakSettingsRefused  # noqa: PLC0415

    try:
        asyncio.run(serve())
    except (KafkaAccessRefused, DatabaseAccessRefused, WeakSettingsRefused, OperatorError):
        raise  # for the operator to fix, told as such by the command group
    except Exception as error:
        # Python's traceback would print the error's message, which can quote a personal
        # value (a row Postgres refused, say): the crash is logged by class and place instead.
        log.critical("worker.crashed", **crash_fields(error))
        raise SystemExit(1) from None


@main.command()
@click.option("--once", is_flag=True, help="Run one pass and exit (default: every interval).")
@click.option(
    "--now",
    "now_text",
    metavar="TIME",
    help="Decide as of this ISO 8601 time instead of the clock (tests, backfills).",
)
@click.option("--dry-run", is_flag=True, help="Report what a pass would do; change nothing.")
def sweep(once: bool, now_text: str | None, dry_run: bool) -> None:
    """Release licenses silent past the window and purge personal data past the retention."""
    from worker.clock import FixedClock, SystemClock  # noqa: PLC0415
    from worker.kafka.clients import PartitionEnds, start_once  # noqa: PLC0415
    from worker.licensing.sweeper import Sweeper  # noqa: PLC0415

    clock = FixedClock(parse_time(now_text)) if now_text else SystemClock()
    settings = load_settings(needs_pseudonym_key=True, long_running=not (once or dry_run))

    async def run_sweeps() -> dict[str, object] | None:
        async with connected(settings, pool_size=2) as repository:
            partition_ends = PartitionEnds(settings)
            try:
                await start_once("kafka-lag-reader", partition_ends.start, settings)
                sweeper = Sweeper(settings, repository, partition_ends, clock)
                if once or dry_run:
                    return (await sweeper.run_once(dry_run=dry_run)).as_log()
                await sweeper.run_forever()
                return None
            finally:
                await partition_ends.stop()

    report = asyncio.run(run_sweeps())
    if report is not None:
        click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())


@main.command("confirm-releases")
@click.argument("customer_id")
@click.option("--note", help="A note kept with the confirmation (a ticket, a reason).")
def confirm_releases(customer_id: str, note: str | None) -> None:
    """Let the next sweep apply the releases the outage guard held for CUSTOMER_ID.

    The confirmation records the database login that made it (session_user): confirm with
    your own login, a member of the worker role (docs/security.md, "Least privilege")."""

    settings = load_settings()

    async def confirm() -> list[str]:
        async with connected(settings) as repository:
            rows = await repository.fetch("confirm_hold", customer_id, datetime.now(UTC), note)
        return [row["confirmed_by"] for row in rows]

    confirmed_by = asyncio.run(confirm())
    if not confirmed_by:
        raise click.ClickException(f"no unconfirmed hold for customer {customer_id!r}")
    click.echo(
        f"confirmed by {confirmed_by[0]}: the next sweep releases the held licenses of "
        f"{customer_id}"
    )


@main.command("publish-events")
@click.option(
    "--now",
    "now_text",
    default=None,
    help="Publish as of this ISO 8601 time instead of the clock: allocations settled by then.",
)
def publish_events(now_text: str | None) -> None:
    """Publish the pending license events of the outbox now, then exit (the relay inside
    `run` does this continuously)."""
    from worker.clock import FixedClock  # noqa: PLC0415
    from worker.licensing.relay import publish_pending_once  # noqa: PLC0415

    clock = FixedClock(parse_time(now_text)) if now_text else None
    published = asyncio.run(publish_pending_once(load_settings(), clock))
    click.echo(f"published {published} license events")


@main.command()
@click.option("--customer", "customer_id", default=None, help="Only this customer.")
@click.option(
    "--show", default=50, show_default=True, type=click.IntRange(min=0), help="Differences shown."
)
@click.option("--from", "first_day", metavar="DAY", help="First UTC day (a date or ISO time).")
@click.option("--to", "last_day", metavar="DAY", help="Last UTC day (a date or ISO time).")
@click.option("--bill", is_flag=True, help="With --from/--to: print the daily bill too.")
def reconcile(
    customer_id: str | None,
    show: int,
    first_day: str | None,
    last_day: str | None,
    bill: bool,
) -> None:
    """Check that billing's view agrees with the database.

    Without --from/--to: every subject's last license event on the topic (de-duplicated by
    event_id) must match its stored license; exit 0 when nothing differs, 8 otherwise.

    With --from/--to: the topic folded into licenses per customer and package for each
    day, against the usage snapshots and `report usage --as-of` at the end of each day;
    exit 0 when nothing differs, 8 when something does, 1 or 3 when the check cannot run
    (README, "Exit status")."""
    if (first_day is None) != (last_day is None):
        raise click.UsageError("give both --from and --to, or neither")
    if first_day is not None and last_day is not None:
        from worker.commands.reconcile_days import run_daily_reconciliation  # noqa: PLC0415

        run_daily_reconciliation(customer_id, first_day, last_day, show, bill)
        return
    if bill:
        raise click.UsageError("--bill needs --from and --to")
    from worker.licensing.reconcile import reconcile_subjects  # noqa: PLC0415

    settings = load_settings()

    async def run_check() -> Reconciliation:
        async with connected(settings, for_reading=True) as repository:
            return await reconcile_subjects(settings, repository, customer_id)

    result = asyncio.run(run_check())
    for mismatch in result.mismatches[:show]:
        click.echo(mismatch.describe())
    if len(result.mismatches) > show:
        click.echo(f"... and {len(result.mismatches) - show} more")
    summary = (
        f"{result.compared} subjects compared with {settings.license_events_topic}, "
        f"{result.pending} with events still in the outbox (not compared)"
    )
    if result.unreadable_events:
        summary += f", {result.unreadable_events} records that are not license events skipped"
    if result.mismatches:
        raise DifferencesFound(f"{len(result.mismatches)} differ: {summary}")
    click.echo(f"ok: {summary}; billing's view agrees with the database")


@main.command()
@click.option(
    "--timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds per service.",
)
def check(timeout: float) -> None:
    """Exit 0 when Postgres and Kafka answer, the database is migrated and the agent topics
    that exist have the same partition count, 1 otherwise (container probes)."""
    from worker.kafka.clients import cluster_answers  # noqa: PLC0415

    settings = load_settings()

    async def database_answers() -> None:
        async with connected(settings) as repository:
            await repository.ping()

    failures = []
    for name, probe in (
        ("postgres", database_answers),
        ("kafka", lambda: cluster_answers(settings)),
    ):
        try:
            asyncio.run(asyncio.wait_for(probe(), timeout))
        except TimeoutError:
            failures.append(f"{name}: no answer within {timeout:g} s")
        except Exception as error:
            failures.append(f"{name}: {command_failure(error).message}")
    if failures:
        # A container probe: any failure is 1 (Docker reserves 2 for HEALTHCHECK).
        raise click.ClickException("; ".join(failures))
    click.echo("ok: postgres and kafka answer")


@main.command("create-topics")
@click.option(
    "--partitions",
    default=None,
    show_default="TOPIC_PARTITIONS",
    type=click.IntRange(min=1),
    help="Partitions of each topic created.",
)
@click.option("--replication-factor", default=1, show_default=True, type=click.IntRange(min=1))
def create_topics(partitions: int | None, replication_factor: int) -> None:
    """Create the service's Kafka topics that do not exist yet; refuses (1) when the agent
    topics would have different partition counts."""
    from worker.kafka.clients import ensure_topics  # noqa: PLC0415

    settings = load_settings()
    partitions = partitions or settings.topic_partitions
    created = asyncio.run(ensure_topics(settings, partitions, replication_factor))
    log.info("kafka.topics_created", topics=created)


@main.command("export-schemas")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--asyncapi",
    "asyncapi_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the AsyncAPI 3.0 document of every topic to this file.",
)
def export_schemas(directory: Path, asyncapi_path: Path | None) -> None:
    """Write the wire contracts as JSON Schema files into DIRECTORY."""
    from schemas.export import export_json_schemas  # noqa: PLC0415
    from worker.asyncapi import write_asyncapi_document  # noqa: PLC0415

    for path in export_json_schemas(directory):
        click.echo(str(path))
    if asyncapi_path is not None:
        write_asyncapi_document(asyncapi_path)
        click.echo(str(asyncapi_path))


@main.command()
@click.option("--customers", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--devices-per-customer", default=20, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--rounds",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Heartbeats per device.",
)
@click.option(
    "--console/--no-console",
    default=False,
    show_default=True,
    help="Also send the console's messages first: each customer's creation, a Core "
    "subscription per customer, a Core+ trial for the first customer's admins group.",
)
@click.option(
    "--agents/--no-agents",
    default=True,
    show_default=True,
    help="Send the agents' installs and heartbeats (--console --no-agents: only create the "
    "customers, which the worker must have applied before their agents' signals arrive).",
)
def simulate(
    customers: int, devices_per_customer: int, rounds: int, console: bool, agents: bool
) -> None:
    """Produce a small simulated fleet's installs and heartbeats (for the demo), signed
    when AGENT_SIGNING_KEYS_FILE or CONSOLE_SIGNING_KEYS_FILE is set."""
    from worker.sim.producer import produce_fleet  # noqa: PLC0415

    settings = load_settings()
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5 * rounds)
    sent = asyncio.run(
        produce_fleet(
            settings,
            customers,
            devices_per_customer,
            rounds,
            start,
            with_console=console,
            with_agents=agents,
        )
    )
    what = {(True, True): "agent and console", (True, False): "console"}.get(
        (console, agents), "agent"
    )
    click.echo(f"produced {sent} {what} events")


@main.command()
def status() -> None:
    """Print what is stored: customers, users, devices, and ingestion progress."""

    settings = load_settings()

    async def show() -> None:
        async with connected(settings) as repository:
            summary = await repository.summary()
        for name, value in summary.items():
            click.echo(f"{name:>28}: {value}")

    asyncio.run(show())


main.add_command(dlq)
main.add_command(report)
main.add_command(erase)
main.add_command(hold)
main.add_command(release_hold)
main.add_command(license_events)

if __name__ == "__main__":
    sys.exit(main())
