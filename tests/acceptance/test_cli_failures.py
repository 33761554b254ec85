"""Every command against every broken deployment an operator meets: one line naming the
cause and the setting, a documented exit status (README, "Exit status"), never a traceback."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from tests.service_fixtures import fresh_topic_names
from tests.support import (
    Services,
    create_topics,
    free_port,
    make_settings,
    run_cli,
    settings_environment,
)

pytestmark = pytest.mark.acceptance

POSTGRES, KAFKA = "postgres", "kafka"

# Exit statuses (worker/cli_support.py, ExitCode; README, "Exit status").
ERROR, UNREACHABLE, NOT_MIGRATED = 1, 3, 7


@dataclass(frozen=True)
class Command:
    arguments: tuple[str, ...]
    uses: frozenset[str]
    # `migrate` and `create-roles` are what a database that is not migrated needs.
    needs_migrated_database: bool = True
    # `check` is a container probe: any failure is 1 (Docker reserves 2 for HEALTHCHECK).
    probe: bool = False


def _command(*arguments: str, uses: set[str], **options: bool) -> Command:
    return Command(tuple(arguments), frozenset(uses), **options)


COMMANDS = {
    "status": _command("status", uses={POSTGRES}),
    "migrate": _command("migrate", uses={POSTGRES}, needs_migrated_database=False),
    "create-roles": _command("create-roles", uses={POSTGRES}, needs_migrated_database=False),
    "sweep": _command("sweep", "--once", uses={POSTGRES, KAFKA}),
    "publish-events": _command("publish-events", uses={POSTGRES, KAFKA}),
    "confirm-releases": _command("confirm-releases", "customer-1", uses={POSTGRES}),
    "dlq-inspect": _command("dlq", "inspect", uses={KAFKA}),
    "dlq-replay": _command("dlq", "replay", "--dry-run", uses={KAFKA}),
    "simulate": _command("simulate", "--customers", "1", uses={KAFKA}),
    "create-topics": _command("create-topics", uses={KAFKA}),
    "license-events": _command("license-events", "--timeout", "1", uses={KAFKA}),
    "report-usage": _command("report", "usage", uses={POSTGRES}),
    "erase": _command(
        "erase", "user", "u-1", "--customer", "c-1", "--reason", "ticket 1", uses={POSTGRES}
    ),
    "hold": _command(
        "hold", "user", "u-1", "--customer", "c-1", "--reason", "ticket 1", uses={POSTGRES}
    ),
    "release-hold": _command(
        "release-hold", "user", "u-1", "--customer", "c-1", "--reason", "ticket 1", uses={POSTGRES}
    ),
    "reconcile": _command("reconcile", uses={POSTGRES, KAFKA}),
    "check": _command("check", "--timeout", "5", uses={POSTGRES, KAFKA}, probe=True),
    # `run` waits out an unreachable Postgres or Kafka (an outage), so only the others.
    "run": _command("run", uses=set()),
}


@dataclass(frozen=True)
class Failure:
    setting: str
    exit_code: int
    applies_to: frozenset[str]  # the commands that meet it


def _users_of(service: str) -> frozenset[str]:
    return frozenset(name for name, command in COMMANDS.items() if service in command.uses)


FAILURES = {
    "postgres-unreachable": Failure("DATABASE_URL", UNREACHABLE, _users_of(POSTGRES)),
    "kafka-unreachable": Failure("KAFKA_BOOTSTRAP_SERVERS", UNREACHABLE, _users_of(KAFKA)),
    "database-url-invalid": Failure("DATABASE_URL", ERROR, _users_of(POSTGRES) | {"run"}),
    "not-migrated": Failure(
        "DATABASE_URL",
        NOT_MIGRATED,
        frozenset(
            name
            for name, command in COMMANDS.items()
            if (POSTGRES in command.uses or name == "run") and command.needs_migrated_database
        ),
    ),
    "metrics-port-in-use": Failure("METRICS_PORT", ERROR, frozenset({"run"})),
}

CASES = [
    pytest.param(command, failure, id=f"{command}-{failure}")
    for failure, details in FAILURES.items()
    for command in COMMANDS
    if command in details.applies_to
]


@dataclass(frozen=True)
class Deployment:
    """A working deployment's environment; each failure breaks one thing of it."""

    environment: dict[str, str]
    unmigrated_database_url: str


@pytest.fixture(scope="module")
async def deployment(
    services: Services, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Deployment]:
    migrated = await services.create_database("license_failures", template=template_database)
    await services.set_up_roles(migrated)
    unmigrated = await services.create_database("license_unmigrated")
    names = fresh_topic_names()
    await create_topics(services.kafka_bootstrap_servers, names, partitions=1)
    settings = make_settings(services, services.worker_url(migrated), names)
    environment = {**settings_environment(settings), "LOG_FORMAT": "json"}
    yield Deployment(environment, unmigrated)
    await services.drop_database(migrated)
    await services.drop_database(unmigrated)


@pytest.fixture(scope="module")
def port_in_use() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


def _broken(
    deployment: Deployment, failure: str, port_in_use: int, tmp_path: Path
) -> dict[str, str]:
    environment = dict(deployment.environment)
    if failure == "postgres-unreachable":
        environment["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{free_port()}/license"
    elif failure == "kafka-unreachable":
        environment["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{free_port()}"
    elif failure == "database-url-invalid":
        environment["DATABASE_URL"] = "foo"
    elif failure == "not-migrated":
        environment["DATABASE_URL"] = deployment.unmigrated_database_url
    elif failure == "metrics-port-in-use":
        environment.update(METRICS_PORT=str(port_in_use), METRICS_HOST="127.0.0.1")
    return environment


@pytest.mark.parametrize(("command", "failure"), CASES)
def test_a_broken_deployment_is_one_line_naming_the_setting(
    deployment: Deployment, port_in_use: int, tmp_path: Path, command: str, failure: str
) -> None:
    expected = FAILURES[failure]
    result = run_cli(
        _broken(deployment, failure, port_in_use, tmp_path),
        *COMMANDS[command].arguments,
        timeout=60,
    )

    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == (ERROR if COMMANDS[command].probe else expected.exit_code), output
    # Log lines are JSON (LOG_FORMAT=json): `run` logs its start; a one-shot command logs
    # at most its bounded wait (`simulate`). What is not JSON is the one line for the operator.
    logged = [orjson.loads(line) for line in result.stderr.splitlines() if _is_json(line)]
    told = [line for line in result.stderr.splitlines() if not _is_json(line)]
    assert len(told) == 1, result.stderr
    if command != "run":
        assert {line["event"] for line in logged} <= {"startup.waiting"}, result.stderr
    [line] = told
    assert line.startswith("Error: "), line
    assert expected.setting in line, line
    if failure == "metrics-port-in-use":
        assert str(port_in_use) in line
    if failure == "not-migrated":
        assert "license-worker migrate" in line


def _is_json(line: str) -> bool:
    try:
        return isinstance(orjson.loads(line), dict)
    except orjson.JSONDecodeError:
        return False


def test_version_prints_the_package_version() -> None:
    from importlib.metadata import version

    result = run_cli(dict(os.environ), "--version")
    assert result.returncode == 0, result.stderr
    assert version("license-telemetry") in result.stdout


@pytest.mark.parametrize(
    "arguments",
    [
        ["create-topics", "--partitions", "0"],
        ["create-topics", "--replication-factor", "0"],
        ["simulate", "--customers", "-1"],
        ["simulate", "--devices-per-customer", "-5"],
        ["simulate", "--rounds", "-1"],
        ["dlq", "inspect", "--samples", "-1"],
        ["license-events", "--timeout", "-1"],
        ["check", "--timeout", "0"],
        ["erase", "user", "u", "--customer", "c", "--reason", "r", "--wait", "-1"],
    ],
    ids=" ".join,
)
def test_nonsense_arguments_are_usage_errors(arguments: list[str]) -> None:
    result = run_cli(dict(os.environ), *arguments)
    assert result.returncode == 2, result.stderr
    assert "Invalid value" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("output_format", ["csv", "xlsx"])
def test_a_report_that_cannot_be_written_names_the_users_path(
    deployment: Deployment, tmp_path: Path, output_format: str
) -> None:
    target = tmp_path / "no-such-directory" / f"usage.{output_format}"
    result = run_cli(
        deployment.environment,
        "report",
        "usage",
        "--format",
        output_format,
        "--output",
        str(target),
    )
    assert result.returncode == ERROR, result.stderr
    assert f"cannot write the report to {target}" in result.stderr
    assert ".partial" not in result.stderr
    assert "Traceback" not in result.stderr
