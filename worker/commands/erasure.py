"""`license-worker erase`, `hold` and `release-hold`: erasure on request and legal holds
(worker/licensing/erasures.py). Each prints its receipt as JSON; a refusal is one line on
standard error and an exit status of its own (README, "Erasure and legal holds")."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import click
import orjson

from worker.cli_support import connected, load_settings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from worker.licensing.erasure_rules import ErasureTarget, Receipt
    from worker.licensing.erasures import Erasures
    from worker.settings import Settings

    _Action = Callable[[Erasures, ErasureTarget], Awaitable[Receipt]]

_CUSTOMER = click.option(
    "--customer",
    "customer_id",
    metavar="ID",
    help="The customer a user or device belongs to (required for them).",
)
_REASON = click.option(
    "--reason",
    required=True,
    help="Why (a ticket number): kept in the audit, so never a name, e-mail or host name.",
)


@click.command()
@click.argument("scope", type=click.Choice(["user", "device", "customer"]))
@click.argument("subject_id", metavar="ID")
@_CUSTOMER
@_REASON
@click.option(
    "--wait",
    "wait_seconds",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds to wait for the relay to publish the releases before the purge step.",
)
def erase(
    scope: str, subject_id: str, customer_id: str | None, reason: str, wait_seconds: float
) -> None:
    """Erase a user's, a device's or a whole customer's personal data now (GDPR Art. 17).

    Releases what the subject holds (billing gets the releases), purges as the 90-day purge
    does, emits user.erased, device.erased or customer.erased, and prints the deletion
    receipt. Refused while a legal hold covers the data."""

    async def run(erasures: Erasures, target: ErasureTarget) -> Receipt:
        return await erasures.erase(target, reason, wait_seconds)

    _run(scope, subject_id, customer_id, run)


@click.command()
@click.argument("scope", type=click.Choice(["user", "customer"]))
@click.argument("subject_id", metavar="ID")
@_CUSTOMER
@_REASON
def hold(scope: str, subject_id: str, customer_id: str | None, reason: str) -> None:
    """Put a user or a customer on legal hold: neither the purge nor an erasure touches its
    data until `release-hold`."""

    async def run(erasures: Erasures, target: ErasureTarget) -> Receipt:
        return await erasures.set_hold(target, reason)

    _run(scope, subject_id, customer_id, run)


@click.command("release-hold")
@click.argument("scope", type=click.Choice(["user", "customer"]))
@click.argument("subject_id", metavar="ID")
@_CUSTOMER
@_REASON
def release_hold(scope: str, subject_id: str, customer_id: str | None, reason: str) -> None:
    """Lift a legal hold: the purge and erasures apply again."""

    async def run(erasures: Erasures, target: ErasureTarget) -> Receipt:
        return await erasures.lift_hold(target, reason)

    _run(scope, subject_id, customer_id, run)


def _run(scope: str, subject_id: str, customer_id: str | None, action: _Action) -> None:
    # Imported here: keeps `--help` fast.
    from worker.licensing.erasure_rules import ErasureTarget, Scope  # noqa: PLC0415
    from worker.licensing.erasures import ErasureRefused  # noqa: PLC0415

    try:
        target = ErasureTarget.of(Scope(scope), subject_id, customer_id)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    settings = load_settings()
    try:
        receipt = asyncio.run(_with_erasures(settings, target, action))
    except ErasureRefused as error:
        # Each refusal has its exit status: unknown 4, on hold 5, waiting for the relay 6,
        # a reason that cannot be kept 2, anything else 1.
        click.echo(f"Error: {error}", err=True)
        raise SystemExit(error.exit_code) from None
    click.echo(orjson.dumps(receipt.as_json(), option=orjson.OPT_INDENT_2).decode())


async def _with_erasures(settings: Settings, target: ErasureTarget, action: _Action) -> Receipt:
    from worker.clock import SystemClock  # noqa: PLC0415
    from worker.licensing.erasures import Erasures  # noqa: PLC0415
    from worker.licensing.relay import publish_pending_once  # noqa: PLC0415

    async with connected(settings, pool_size=2) as repository:
        erasures = Erasures(
            settings, repository, SystemClock(), lambda: publish_pending_once(settings)
        )
        return await action(erasures, target)
