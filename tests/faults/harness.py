"""The fault suite: replicas of `license-worker run` against real Kafka and Postgres, a known
stream with duplicates, late events and poison messages, faults injected while it flows
(SIGKILLs, Postgres and broker restarts), then the invariants checked against a model of
the stream (`tests/faults/model.py`, `tests/faults/rules.py`). docs/reliability.md says why.

`run_fault_suite` is used by the bounded pytest (tests/faults/test_fault_suite.py) and by
`make faults` (tests/faults/run.py).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import orjson
from aiokafka import AIOKafkaProducer

from tests.faults import environment, invariants, observe
from tests.faults.figures import Figures
from tests.faults.invariants import DeadLetterExpectation, Findings
from tests.faults.model import TimeRange, build_model
from tests.faults.replicas import FaultLog, Replica, ReplicaSet, ServiceFaults, warning_counts
from tests.faults.stream import Message, Poison, Stream, StreamShape, Topic, generate_stream
from tests.support import Services, run_cli, settings_environment
from worker.settings import Settings

PRODUCE_CHUNK = 200


@dataclass(frozen=True, slots=True)
class SuiteConfig:
    work_dir: Path
    events: int = 20_000
    seed: int = 20261203
    replicas: int = 3
    sigkills: int = 3
    postgres_restarts: int = 1
    broker_restarts: int = 1
    poison: tuple[Poison, ...] = tuple(Poison)
    produce_seconds: float = 60.0
    # Waiting for consumer lag 0: the whole wait, and how long lag may stay unchanged.
    drain_timeout_seconds: float = 420.0
    stall_seconds: float = 90.0
    batch_max_records: int = 1000
    keep_database: bool = False
    # From a service being back to the next batch stored: generous bounds (the worker's
    # backoff is capped at RETRY_MAX_SECONDS, 30 s; a broker restart also rebalances).
    max_recovery_seconds: tuple[tuple[str, float], ...] = (("postgres", 30.0), ("kafka", 60.0))


@dataclass(slots=True)
class SuiteResult:
    figures: Figures
    findings: Findings
    database_url: str = ""  # a superuser's
    topics: dict[str, str] = field(default_factory=dict)
    kept_database: bool = False

    @property
    def passed(self) -> bool:
        return not self.findings.failed

    def failure_report(self) -> str:
        return "\n".join(str(violation) for violation in self.findings.failed)


async def run_fault_suite(services: Services, config: SuiteConfig) -> SuiteResult:
    if services.state_dir is None:
        raise RuntimeError("the fault suite needs services run by deploy/local/services.sh")
    config.work_dir.mkdir(parents=True, exist_ok=True)
    database = await environment.create_database(services)
    topics = await environment.create_topics(services.kafka_bootstrap_servers)
    settings = environment.replica_settings(
        services.kafka_bootstrap_servers,
        services.worker_url(database),
        topics,
        config.batch_max_records,
    )
    try:
        run = _Run(services, database, settings, config)
        await run.execute()
        return SuiteResult(run.figures, run.findings, database, topics, config.keep_database)
    finally:
        if not config.keep_database:
            await services.drop_database(database)


class _Run:
    def __init__(
        self, services: Services, database: str, settings: Settings, config: SuiteConfig
    ) -> None:
        self.services, self.settings, self.config = services, settings, config
        self.superuser_url = services.superuser_url(database)
        self.database_name = urlsplit(database).path.lstrip("/")
        self.environment = settings_environment(settings)
        self.rng = random.Random(config.seed)
        self.faults = FaultLog()
        self.findings = Findings()
        self.figures = Figures(replicas=config.replicas)
        self.deadlocks = _DeadlockCounter(self.superuser_url, self.database_name)
        self.started = time.monotonic()
        self.base = datetime.now(UTC).replace(microsecond=0)
        self.stream: Stream = generate_stream(
            config.seed, StreamShape(events=config.events, poison=config.poison), self.base
        )
        self.poison_at: list[DeadLetterExpectation] = []
        self.production_ended = 0.0

    async def execute(self) -> None:
        replicas = ReplicaSet(
            [
                Replica(i, self.environment, self.config.work_dir / f"replica-{i}.log")
                for i in range(self.config.replicas)
            ],
            self.rng,
            self.faults,
        )
        assert self.services.state_dir is not None
        service_faults = ServiceFaults(
            self.services.state_dir,
            lambda: observe.stored_progress(self.superuser_url),
            self.faults,
        )
        stop_watch = asyncio.Event()
        replicas.start()
        watchdog = asyncio.create_task(replicas.watch(stop_watch))
        produce_start = datetime.now(UTC)
        try:
            await self._create_customers()
            await self._produce(replicas, service_faults)
            await replicas.settle()
            await service_faults.settle()
            await self._drain()
        finally:
            stop_watch.set()
            await watchdog
            exit_codes = replicas.stop()
            replicas.kill_all()
        self._check_clean_stops(exit_codes)
        await self._final_sweep()
        await self._check(produce_start, replicas)

    async def _create_customers(self) -> None:
        """The console creates the customers (one on the device license model) before any
        agent signal: the worker would create them from signals too, with the user model."""
        occurred = (self.base - timedelta(days=60)).isoformat()
        async with environment.producer(self.services.kafka_bootstrap_servers) as producer:
            for customer in self.stream.customers:
                event = {
                    "schema_version": 1,
                    "event_id": f"create-{customer.customer_id}",
                    "type": "customer.created",
                    "customer_id": customer.customer_id,
                    "occurred_at": occurred,
                    "name": f"Customer {customer.customer_id}",
                    "license_model": customer.license_model,
                }
                await producer.send_and_wait(
                    self.settings.admin_topic,
                    orjson.dumps(event),
                    key=customer.customer_id.encode(),
                )
        wanted = len(self.stream.customers)

        async def applied() -> bool:
            named = await observe.fetch_value(
                self.superuser_url, "SELECT count(*) FROM customers WHERE name IS NOT NULL"
            )
            return named == wanted

        if not await _wait_for(applied, timeout=180):
            self.findings.report(
                "console: customers created",
                f"{wanted} customer.created not applied",
                tally=None,
            )

    async def _produce(self, replicas: ReplicaSet, service_faults: ServiceFaults) -> None:
        messages = self.stream.messages
        schedule = _fault_schedule(self.rng, len(messages), self.config)
        background: list[asyncio.Task[None]] = []
        started = time.monotonic()
        async with environment.producer(self.services.kafka_bootstrap_servers) as producer:
            for index, message in enumerate(messages):
                for fault in schedule.pop(index, []):
                    await self._inject(fault, producer, replicas, service_faults, background)
                await self._send(producer, message)
                if index % PRODUCE_CHUNK == 0:
                    await _pace(started, index / len(messages) * self.config.produce_seconds)
            await producer.flush()
        await asyncio.gather(*background)
        self.production_ended = time.monotonic()

    async def _inject(
        self,
        fault: str,
        producer: AIOKafkaProducer,
        replicas: ReplicaSet,
        service_faults: ServiceFaults,
        background: list[asyncio.Task[None]],
    ) -> None:
        if fault == "sigkill":
            replicas.sigkill_one()
            return
        await asyncio.gather(*background)  # one service outage at a time
        background.clear()
        if fault == "postgres":
            await self.deadlocks.sample()
            # Agents keep sending while Postgres is away.
            background.append(asyncio.create_task(service_faults.restart_postgres()))
            return
        await producer.flush()  # agents cannot send while the broker is away
        await service_faults.restart_broker()

    async def _send(self, producer: AIOKafkaProducer, message: Message) -> None:
        topic = self._topic(message.topic)
        delivery = await producer.send(topic, message.value, key=message.key)
        if message.poison is not None:
            metadata = await delivery
            self.poison_at.append(
                DeadLetterExpectation(topic, metadata.partition, metadata.offset, message)
            )

    def _topic(self, topic: Topic) -> str:
        return (
            self.settings.heartbeat_topic
            if topic is Topic.HEARTBEAT
            else self.settings.lifecycle_topic
        )

    async def _drain(self) -> None:
        """Until every agent and console message is committed (lag 0), or lag stops moving."""
        groups = [
            (self.settings.consumer_group, list(self.settings.agent_topics)),
            (self.settings.admin_consumer_group, [self.settings.admin_topic]),
        ]
        reader = observe.LagReader(self.services.kafka_bootstrap_servers)
        await reader.start()
        try:
            lag = await self._wait_for_lag_zero(reader, groups)
        finally:
            await reader.stop()
        if lag is None:
            self.figures.drain_seconds = time.monotonic() - self.production_ended
            await self._wait_for_outbox()
            return
        behind = {name: value for name, value in sorted(lag.items()) if value}
        self.findings.report(
            "stream fully consumed (consumer lag 0)",
            f"lag after {time.monotonic() - self.production_ended:.0f} s: {behind}; "
            f"most logged warnings: {self._top_warnings()}",
            tally=None,
        )

    def _top_warnings(self) -> str:
        counts: Counter[str] = Counter()
        for path in self.config.work_dir.glob("replica-*.log"):
            counts += warning_counts(path.read_text(errors="replace"))
        return ", ".join(f"{name} x{count}" for name, count in counts.most_common(3))

    async def _wait_for_lag_zero(
        self, reader: observe.LagReader, groups: list[tuple[str, list[str]]]
    ) -> dict[str, int] | None:
        """None once the lag is 0; the lag if it stopped moving or time ran out."""
        deadline = time.monotonic() + self.config.drain_timeout_seconds
        last_total, last_change = -1, time.monotonic()
        lag: dict[str, int] = {}
        while time.monotonic() < deadline:
            lag = {}
            for group, topics in groups:
                lag |= await reader.lag(group, topics) or {"kafka unreachable": -1}
            total = sum(lag.values())
            if total == 0:
                return None
            if total != last_total:
                last_total, last_change = total, time.monotonic()
            elif time.monotonic() - last_change > self.config.stall_seconds:
                break
            await asyncio.sleep(2)
        return lag

    async def _wait_for_outbox(self) -> None:
        async def published() -> bool:
            return await observe.pending_outbox(self.superuser_url) == 0

        if not await _wait_for(published, timeout=120):
            pending = await observe.pending_outbox(self.superuser_url)
            self.findings.report(
                "relay publishes the outbox", f"{pending} events pending after 120 s", tally=None
            )

    def _check_clean_stops(self, exit_codes: list[int | None]) -> None:
        for index, code in enumerate(exit_codes):
            if code != 0:
                self.findings.report(
                    "replicas stop cleanly on SIGTERM", f"replica {index} exited {code}", tally=None
                )

    async def _final_sweep(self) -> None:
        """One sweeper pass once everything is consumed, then the outbox published."""
        for command in (("sweep", "--once"), ("publish-events",)):
            done = await asyncio.to_thread(run_cli, self.environment, *command, timeout=300)
            if done.returncode != 0:
                self.findings.report(
                    "final sweep and relay",
                    f"{' '.join(command)} exited {done.returncode}: {done.stderr[-500:]}",
                    tally=None,
                )

    async def _check(self, produce_start: datetime, replicas: ReplicaSet) -> None:
        stored = await observe.read_stored(self.superuser_url)
        bootstrap = self.services.kafka_bootstrap_servers
        license_events = await observe.read_topic(bootstrap, self.settings.license_events_topic)
        dead_letters = await observe.read_topic(bootstrap, self.settings.dlq_topic)
        now = datetime.now(UTC)
        clamped = TimeRange(
            produce_start, now + self.settings.future_tolerance + timedelta(seconds=5)
        )
        model = build_model(self.stream.signals, clamped)
        models = {c.customer_id: c.license_model for c in self.stream.customers}
        findings = self.findings
        invariants.check_devices(model, stored, findings)
        invariants.check_lifecycle(model, stored, findings)
        invariants.check_users(model, stored, findings)
        invariants.check_licenses(
            model, stored, models, now, self.settings.license_window, findings
        )
        events = invariants.check_license_events(stored, license_events, findings)
        letters = invariants.check_dead_letters(self.poison_at, dead_letters, findings)
        await self._check_operations(replicas)
        self._fill_figures(events, letters)

    async def _check_operations(self, replicas: ReplicaSet) -> None:
        for exit_ in self.faults.unexpected_exits:
            self.findings.report(
                "no replica dies on its own",
                f"replica {exit_.replica} exited {exit_.code}: {exit_.log_tail[-900:]}",
                tally=None,
            )
        deadlocks = await self.deadlocks.total()
        self.figures.deadlocks = deadlocks
        if deadlocks:
            self.findings.report(
                "no deadlocks", f"pg_stat_database.deadlocks rose by {deadlocks}", tally=None
            )
        self.figures.deadlock_errors_logged = sum(
            r.log_text().count("DeadlockDetected") for r in replicas.replicas
        )
        self._check_recoveries()

    def _check_recoveries(self) -> None:
        bounds = dict(self.config.max_recovery_seconds)
        for fault, seconds in self.faults.recoveries:
            if seconds is None or seconds > bounds[fault]:
                took = "no batch stored" if seconds is None else f"{seconds:.1f} s"
                self.findings.report(
                    "recovery after a restart within its bound",
                    f"{fault} back, next batch stored after {took} (bound {bounds[fault]:.0f} s)",
                    tally=None,
                )

    def _fill_figures(self, events: dict[str, int], letters: dict[str, int]) -> None:
        figures, stream = self.figures, self.stream
        figures.messages_produced = len(stream.messages)
        figures.distinct_events = len(stream.signals)
        figures.duplicates, figures.late, figures.poison = (
            stream.duplicates,
            stream.late,
            len(stream.poison),
        )
        figures.sigkills = self.faults.sigkills
        figures.postgres_restarts = self.faults.postgres_restarts
        figures.broker_restarts = self.faults.broker_restarts
        figures.unexpected_exits = len(self.faults.unexpected_exits)
        figures.recoveries = list(self.faults.recoveries)
        figures.lost, figures.doubled = self.findings.lost, self.findings.doubled
        figures.mismatches = self.findings.mismatches
        figures.license_events = f"{events['records']} / {events['distinct']}"
        figures.dead_letters = f"{letters['records']} / {letters['sources']}"
        figures.seconds = time.monotonic() - self.started


class _DeadlockCounter:
    """pg_stat_database.deadlocks of the suite's database, summed across restarts (a
    restart may reset the statistics)."""

    def __init__(self, superuser_url: str, database: str) -> None:
        self._url, self._database = superuser_url, database
        self._counted = 0
        self._last = 0

    async def sample(self) -> None:
        value = await observe.deadlocks(self._url, self._database)
        if value is None:
            return
        self._counted += value - self._last if value >= self._last else value
        self._last = value

    async def total(self) -> int:
        await self.sample()
        return self._counted


def _fault_schedule(rng: random.Random, messages: int, config: SuiteConfig) -> dict[int, list[str]]:
    """At which message each fault happens: spread over 10%..90% of the stream, jittered."""
    schedule: dict[int, list[str]] = {}
    for fault, count in (
        ("sigkill", config.sigkills),
        ("postgres", config.postgres_restarts),
        ("kafka", config.broker_restarts),
    ):
        for index in range(count):
            share = 0.1 + 0.8 * (index + rng.uniform(0.2, 0.8)) / count
            schedule.setdefault(int(share * messages), []).append(fault)
    return schedule


async def _pace(started: float, due_seconds: float) -> None:
    ahead = due_seconds - (time.monotonic() - started)
    if ahead > 0:
        await asyncio.sleep(ahead)


async def _wait_for(condition: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return True
        await asyncio.sleep(0.5)
    return False
