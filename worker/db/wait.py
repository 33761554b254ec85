"""Waiting for Postgres after a transient error: a cheap probe, polled about twice a second,
instead of a backoff that has grown to tens of seconds during a long outage.

After an operation (a batch's transaction, a relay pass, the sweeper's lock) failed with a
transient error, `wait_to_retry` asks the probe (a fresh connection and `SELECT 1`, bounded
by a short timeout) whether the database answers:

- it does: the operation failed for another reason (a lost race, a revoked grant, a full
  server), so the backoff's next delay is waited, growing as failures repeat;
- it does not: the probe is asked again every `POLL_SECONDS` until it answers, and the
  operation is retried at once, its backoff reset. The retry comes within about a poll of
  the database's return, however long it was away; while it is down, it sees one probe per
  poll from each waiting pool, never the expensive operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable

import asyncpg
import structlog

from worker.db.errors import is_no_answer
from worker.retry import Backoff

log = structlog.get_logger(__name__)

POLL_SECONDS = 0.5
# How long the outage probe may take: a connection and `SELECT 1` take milliseconds when the
# server is up.
PROBE_TIMEOUT_SECONDS = 1.0
Probe = Callable[[], Awaitable[bool]]


async def database_answers(database_url: str) -> bool:
    """The outage probe: whether the server behind `database_url` answers at all, on a fresh
    connection (never one of a pool's) within PROBE_TIMEOUT_SECONDS. A refusal is an answer."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            # No prepared statement: through PgBouncer in transaction mode a named one would
            # stay behind on a server connection that other clients get next.
            connection = await asyncpg.connect(database_url, statement_cache_size=0)
            try:
                await connection.fetchval("SELECT 1")
            finally:
                await connection.close()
    except Exception as error:
        return not is_no_answer(error)
    return True


class DatabaseAnswers:
    """Whether Postgres answers `probe`. The loops that wait on one pool share its probes:
    one runs at a time, and its answer serves every caller that asked after it started."""

    def __init__(self, probe: Probe) -> None:
        self._probe = probe
        self._lock = asyncio.Lock()
        self._probed_at = -math.inf
        self._answered = False

    async def since(self, moment: float) -> bool:
        """The answer of a probe started at `moment` (time.monotonic) or later."""
        async with self._lock:
            if self._probed_at < moment:
                self._probed_at = time.monotonic()
                self._answered = await self._probe()
            return self._answered


async def wait_to_retry(
    answers: DatabaseAnswers,
    backoff: Backoff,
    stopping: asyncio.Event,
    *,
    task: str,
    beat: Callable[[], None] = lambda: None,
    poll_seconds: float = POLL_SECONDS,
) -> None:
    """Waits after a transient database error until a retry is worth it (see the module's
    docstring), or until `stopping` is set. `beat` is called at every poll: waiting out an
    outage is not being stuck."""
    if await answers.since(time.monotonic()):
        delay = backoff.next_delay()
        log.info("database.retry_later", task=task, retry_in_seconds=round(delay, 2))
        await pause(stopping, delay)
        return
    started = time.monotonic()
    log.warning("database.waiting", task=task, poll_seconds=poll_seconds)
    while not stopping.is_set():
        asked_at = time.monotonic()
        await pause(stopping, poll_seconds)
        beat()
        if not stopping.is_set() and await answers.since(asked_at):
            backoff.reset()
            waited = round(time.monotonic() - started, 2)
            log.info("database.answered", task=task, waited_seconds=waited)
            return


async def pause(stopping: asyncio.Event, seconds: float) -> None:
    """Sleeps `seconds`, or less if `stopping` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
