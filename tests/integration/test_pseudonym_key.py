"""Issue #14 part 4: a purged user cannot be re-identified from what the database keeps
without the pseudonym key; the operator, who holds the key, can still confirm a guess."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from tests.integration.license_support import day, ingest, send, sweep
from tests.support import Services, fetch, make_settings
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice

pytestmark = pytest.mark.integration

GUESS = "alice.smith@contoso.example"
WRONG_GUESS = "bob.jones@contoso.example"
DEVICES = [
    SimulatedDevice("contoso", "alice-laptop", GUESS, "business"),
    SimulatedDevice("contoso", "alice-phone", GUESS, "personal"),
]
# The namespace written in the source before the fix: anyone could read it.
PUBLISHED_NAMESPACE = uuid.UUID("6f1f6d2e-4c1a-5b8e-9a43-0d2b7c51e0a1")
LICENSE_EVENT_TYPES = ("license.allocated", "license.released")


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(
        services, database_url, topics, sweep_enabled=False, relay_poll_seconds=0.1
    )


async def database_dump(settings: Settings) -> str:
    """Every row of every table, as text: whatever a stolen backup shows."""
    url = settings.database_url.get_secret_value()
    tables = await fetch(
        url, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    )
    lines = []
    for table in tables:
        name = table["table_name"]
        if name == "schema_migrations":
            continue  # not the worker's to read, and it holds no rows of users
        rows = await fetch(url, f'SELECT t::text AS line FROM "{name}" AS t')
        lines += [f"{name}: {row['line']}" for row in rows]
    return "\n".join(lines)


async def purged_user_rows(settings: Settings) -> list[tuple[str, datetime]]:
    """(customer, effective time) of every history row of a user: all the attacker needs
    besides a guess."""
    rows = await fetch(
        settings.database_url.get_secret_value(),
        "SELECT customer_id, effective_at FROM license_history WHERE subject_type = 'user'",
    )
    return [(row["customer_id"], row["effective_at"]) for row in rows]


def unkeyed_ids(customer_id: str, user_id: str, effective_at: datetime) -> Iterator[str]:
    """The ids the published scheme gives a guessed user's license events, with and without
    an event number."""
    for event_type in LICENSE_EVENT_TYPES:
        for suffix in ("", "|1", "|2", "|3"):
            name = f"{customer_id}|{event_type}|user|{user_id}|{effective_at.isoformat()}{suffix}"
            yield str(uuid.uuid5(PUBLISHED_NAMESPACE, name))


def keyed_ids(key: bytes, customer_id: str, user_id: str, effective_at: datetime) -> Iterator[str]:
    from worker.licensing.rules import license_event_id

    for event_type in LICENSE_EVENT_TYPES:
        for sequence in (1, 2, 3):
            yield license_event_id(
                key, customer_id, event_type, "user", user_id, effective_at, sequence=sequence
            )


async def test_a_guessed_address_is_confirmed_against_purged_rows_only_with_the_key(
    services: Services, settings: Settings
) -> None:
    events = [(d, "install", day(0)) for d in DEVICES]
    total = await send(services, settings, events)
    await ingest(services, settings, day(0) + timedelta(minutes=1), total)
    await sweep(settings, day(31))
    report = await sweep(settings, day(125))
    assert report.purged == 1
    dump = await database_dump(settings)
    history = await purged_user_rows(settings)
    assert len(history) >= 2, "allocated and released rows under the pseudonym"
    assert GUESS not in dump

    # Without the key: the guess matches nothing anywhere (history and outbox ids, outbox
    # payloads, usage snapshots, every other table).
    confirmed = [
        event_id
        for customer_id, effective_at in history
        for event_id in unkeyed_ids(customer_id, GUESS, effective_at)
        if event_id in dump
    ]
    assert confirmed == [], "a guessed address was confirmed without any key"

    # With the key: the operator confirms the right guess, in the history, the outbox column
    # and the outbox payload, and refutes a wrong one.
    from worker.licensing.sweep_rules import pseudonym

    key_text = settings.required_pseudonym_key()
    event_key = settings.event_id_key()

    def confirms(user_id: str) -> list[tuple[str, int]]:
        """(table, times the id appears in the row) of every row a keyed id of the guess
        matches."""
        return [
            (line.split(":", 1)[0], line.count(event_id))
            for customer_id, effective_at in history
            for event_id in keyed_ids(event_key, customer_id, user_id, effective_at)
            for line in dump.splitlines()
            if event_id in line
        ]

    found = confirms(GUESS)
    assert {table for table, _ in found} == {"license_history", "license_outbox"}
    # An outbox row names its id twice: the column and the payload.
    assert {count for table, count in found if table == "license_outbox"} == {2}
    assert confirms(WRONG_GUESS) == []
    released_at = await fetch(
        settings.database_url.get_secret_value(),
        "SELECT subject_id, released_at FROM licenses WHERE subject_type = 'user'",
    )
    (row,) = released_at
    assert row["subject_id"] == pseudonym(key_text.encode(), "contoso", GUESS, row["released_at"])
