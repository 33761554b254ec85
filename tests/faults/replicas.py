"""The worker replicas (`license-worker run` subprocesses in one consumer group) and the
faults done to them and to the services: SIGKILL of a replica (restarted), Postgres and
Kafka restarts (deploy/local/services.sh), and the time each recovery took."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import REPO_ROOT, SERVICES_SCRIPT

# How long a killed replica stays down, and a stopped service.
RESTART_DELAY_SECONDS = (0.5, 3.0)
OUTAGE_SECONDS = 4.0
RECOVERY_TIMEOUT_SECONDS = 300.0


@dataclass(slots=True)
class Exit:
    replica: int
    code: int | None
    log_tail: str


class Replica:
    def __init__(self, index: int, environment: dict[str, str], log_path: Path) -> None:
        self.index = index
        self._environment = environment
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.expected_down = False

    def start(self) -> None:
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "run"],
                env=self._environment,
                stdout=log_file,
                stderr=log_file,
                cwd=REPO_ROOT,
            )
        self.expected_down = False

    def kill(self) -> None:
        self.expected_down = True
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def terminate(self, timeout: float = 90) -> int | None:
        self.expected_down = True
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
            return None

    def exited_on_its_own(self) -> int | None:
        """The exit code if the process ended without being asked to, else None."""
        if self.expected_down or self.process is None:
            return None
        return self.process.poll()

    def log_tail(self, lines: int = 3) -> str:
        """The last error lines of the log, without their stack frames."""
        return "; ".join(error_lines(self.log_text())[-lines:])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def error_lines(text: str) -> list[str]:
    """The worker's error and critical log events, each as `event key=value ...` (lists such
    as stack frames left out)."""
    lines = []
    for line in text.splitlines():
        if '"level": "error"' not in line and '"level": "critical"' not in line:
            continue
        with contextlib.suppress(ValueError):
            fields = json.loads(line)
            shown = (
                f"{key}={value}"
                for key, value in fields.items()
                if key not in ("event", "level", "timestamp") and not isinstance(value, list)
            )
            lines.append(" ".join([str(fields.get("event")), *shown]))
    return lines


def warning_counts(text: str) -> Counter[str]:
    """How often each (event, error) warning or error was logged."""
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        if '"level": "warning"' in line or '"level": "error"' in line:
            with contextlib.suppress(ValueError):
                fields = json.loads(line)
                counts[f"{fields.get('event')} {fields.get('error', '')}".strip()] += 1
    return counts


@dataclass(slots=True)
class FaultLog:
    sigkills: int = 0
    postgres_restarts: int = 0
    broker_restarts: int = 0
    unexpected_exits: list[Exit] = field(default_factory=list)
    # (fault, seconds from the service being back to the next batch stored; None: never)
    recoveries: list[tuple[str, float | None]] = field(default_factory=list)


class ReplicaSet:
    """N replicas; a watchdog restarts any that died on its own (and records it)."""

    def __init__(self, replicas: list[Replica], rng: random.Random, faults: FaultLog) -> None:
        self.replicas = replicas
        self._rng = rng
        self._faults = faults
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        for replica in self.replicas:
            replica.start()

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for replica in self.replicas:
                code = replica.exited_on_its_own()
                if code is not None:
                    self._faults.unexpected_exits.append(
                        Exit(replica.index, code, replica.log_tail())
                    )
                    replica.start()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    def sigkill_one(self) -> None:
        """SIGKILLs a random running replica; it is restarted after a short pause."""
        running = [r for r in self.replicas if r.process and r.process.poll() is None]
        if not running:
            return
        victim = self._rng.choice(running)
        victim.kill()
        self._faults.sigkills += 1
        delay = self._rng.uniform(*RESTART_DELAY_SECONDS)
        task = asyncio.create_task(self._restart_later(victim, delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart_later(self, replica: Replica, delay: float) -> None:
        await asyncio.sleep(delay)
        replica.start()

    async def settle(self) -> None:
        """Waits for pending restarts."""
        if self._tasks:
            await asyncio.gather(*self._tasks)

    def stop(self) -> list[int | None]:
        for task in self._tasks:
            task.cancel()  # a restart still pending must not outlive the run
        return [replica.terminate() for replica in self.replicas]

    def kill_all(self) -> None:
        for replica in self.replicas:
            with contextlib.suppress(Exception):
                replica.kill()


class ServiceFaults:
    """Stops and starts Postgres or Kafka with deploy/local/services.sh, and measures how
    long the worker takes to store its next batch once the service is back."""

    def __init__(
        self,
        state_dir: Path,
        progress: Callable[[], Awaitable[int | None]],
        faults: FaultLog,
    ) -> None:
        self._state_dir = state_dir
        self._progress = progress
        self._faults = faults
        self._measurements: set[asyncio.Task[None]] = set()

    async def restart_postgres(self) -> None:
        await self._script("stop-postgres")
        await asyncio.sleep(OUTAGE_SECONDS)
        await self._script("start-postgres")
        self._faults.postgres_restarts += 1
        self._measure("postgres")

    async def restart_broker(self) -> None:
        await self._script("stop-kafka")
        await asyncio.sleep(OUTAGE_SECONDS)
        await self._script("start-kafka")
        self._faults.broker_restarts += 1
        self._measure("kafka")

    def _measure(self, fault: str) -> None:
        task = asyncio.create_task(self._recovery(fault, time.monotonic()))
        self._measurements.add(task)
        task.add_done_callback(self._measurements.discard)

    async def _recovery(self, fault: str, back_at: float) -> None:
        """From the service being back to the first batch stored after that: the progress
        read right after the restart, then the first time it grows."""
        before = await self._progress()
        while before is None and time.monotonic() - back_at < RECOVERY_TIMEOUT_SECONDS:
            await asyncio.sleep(0.1)
            before = await self._progress()
        while time.monotonic() - back_at < RECOVERY_TIMEOUT_SECONDS:
            now = await self._progress()
            if now is not None and before is not None and now > before:
                self._faults.recoveries.append((fault, time.monotonic() - back_at))
                return
            await asyncio.sleep(0.2)
        self._faults.recoveries.append((fault, None))

    async def settle(self) -> None:
        if self._measurements:
            await asyncio.gather(*self._measurements)

    async def _script(self, command: str) -> None:
        process = await asyncio.create_subprocess_exec(
            "bash",
            str(SERVICES_SCRIPT),
            command,
            str(self._state_dir),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, error = await asyncio.wait_for(process.communicate(), timeout=240)
        if process.returncode != 0:
            raise RuntimeError(f"services.sh {command} failed: {error.decode(errors='replace')}")
