"""`license-worker license-events`: the license events topic as billing receives it, and the
check of its signatures."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from worker.cli_support import DifferencesFound, load_settings


@click.group("license-events", invoke_without_command=True)
@click.option(
    "--timeout",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds to wait for more.",
)
@click.pass_context
def license_events(context: click.Context, timeout: float) -> None:
    """Print the license events topic from the beginning, one JSON object a line, as
    billing receives it (`license-events verify`: check its signatures)."""
    if context.invoked_subcommand is not None:
        return
    from worker.kafka.clients import read_topic  # noqa: PLC0415

    settings = load_settings()
    for value in asyncio.run(read_topic(settings, settings.license_events_topic, timeout)):
        click.echo(value.decode())


@license_events.command("verify")
@click.option(
    "--keys-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The verifying keys (billing's copy, `current` not needed); default: the file of "
    "LICENSE_EVENTS_SIGNING_KEY_FILE.",
)
@click.option(
    "--show",
    default=20,
    show_default=True,
    type=click.IntRange(min=0),
    help="Records that do not verify shown by partition and offset.",
)
def verify(keys_file: Path | None, show: int) -> None:
    """Check the signature of every record on the license events topic, from the beginning
    to its current end: count valid, unsigned, malformed, unknown key and bad signature.
    Exit 0 when every record is valid, 8 otherwise."""
    from worker.licensing.signature_check import (  # noqa: PLC0415
        check_license_event_signatures,
    )
    from worker.trust.signing import SigningKeysError, load_signing_keys  # noqa: PLC0415

    settings = load_settings()
    try:
        keys = (
            load_signing_keys(keys_file, "--keys-file")
            if keys_file is not None
            else settings.license_events_signing_keys()
        )
    except SigningKeysError as error:
        raise click.UsageError(str(error)) from None
    if keys is None:
        raise click.UsageError(
            "no keys to verify with: set LICENSE_EVENTS_SIGNING_KEY_FILE or give --keys-file"
        )
    check = asyncio.run(check_license_event_signatures(settings, keys, show))
    for refused in check.refused:
        click.echo(refused.describe())
    if check.invalid > len(check.refused):
        click.echo(f"... and {check.invalid - len(check.refused)} more")
    click.echo(f"{settings.license_events_topic}: {check.summary()}")
    if check.invalid:
        raise DifferencesFound(
            f"{check.invalid} of {check.records} records on {settings.license_events_topic} "
            "are not validly signed license events"
        )
