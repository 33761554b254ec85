"""`worker.db.wait`: after a transient database error, back off while the database
answers; while it does not, poll a cheap probe and retry as soon as it answers."""

from __future__ import annotations

import asyncio
import time

from worker.db.wait import DatabaseAnswers, wait_to_retry
from worker.retry import Backoff

POLL = 0.02


class ScriptedProbe:
    """Answers False `down_for` times, then True; counts the calls."""

    def __init__(self, down_for: int, seconds: float = 0.0) -> None:
        self.down_for = down_for
        self.seconds = seconds
        self.calls = 0

    async def __call__(self) -> bool:
        self.calls += 1
        await asyncio.sleep(self.seconds)
        return self.calls > self.down_for


def grown_backoff(initial: float = 0.2, maximum: float = 30.0, failures: int = 20) -> Backoff:
    """A backoff as a long outage leaves it: at its cap."""
    backoff = Backoff(initial, maximum)
    for _ in range(failures):
        backoff.next_delay()
    return backoff


async def test_a_database_that_answers_means_backing_off() -> None:
    probe = ScriptedProbe(down_for=0)
    backoff = Backoff(0.05, 0.05)
    started = time.monotonic()
    await wait_to_retry(DatabaseAnswers(probe), backoff, asyncio.Event(), task="t", poll_seconds=1)
    assert 0.025 <= time.monotonic() - started < 0.5
    assert probe.calls == 1
    assert backoff.attempts == 1, "the backoff grows while the database answers and we fail"


async def test_a_database_away_is_polled_and_the_retry_comes_at_its_return() -> None:
    probe = ScriptedProbe(down_for=5)
    backoff = grown_backoff()
    started = time.monotonic()
    await wait_to_retry(
        DatabaseAnswers(probe), backoff, asyncio.Event(), task="t", poll_seconds=POLL
    )
    waited = time.monotonic() - started
    # Five polls, however far the backoff had grown (its next delay would be 15-30 s).
    assert probe.calls == 6
    assert 5 * POLL <= waited < 5 * POLL + 0.5
    assert backoff.attempts == 0, "a database back is a fresh start"


async def test_waiting_ends_when_the_worker_stops() -> None:
    probe = ScriptedProbe(down_for=10**6)
    stopping = asyncio.Event()
    waiting = asyncio.create_task(
        wait_to_retry(DatabaseAnswers(probe), Backoff(1, 1), stopping, task="t", poll_seconds=POLL)
    )
    await asyncio.sleep(5 * POLL)
    stopping.set()
    await asyncio.wait_for(waiting, 1)
    calls = probe.calls
    await asyncio.sleep(3 * POLL)
    assert probe.calls == calls, "no probe after the stop"


async def test_a_backoff_wait_ends_when_the_worker_stops() -> None:
    stopping = asyncio.Event()
    answers = DatabaseAnswers(ScriptedProbe(down_for=0))
    waiting = asyncio.create_task(wait_to_retry(answers, Backoff(60, 60), stopping, task="t"))
    await asyncio.sleep(0.05)
    stopping.set()
    await asyncio.wait_for(waiting, 1)


async def test_waiting_loops_share_the_probes() -> None:
    """Ten loops waiting on one pool: about one probe per poll, not ten."""
    polls_down = 10
    probe = ScriptedProbe(down_for=10**6)
    answers = DatabaseAnswers(probe)
    stopping = asyncio.Event()
    waiters = [
        asyncio.create_task(
            wait_to_retry(answers, Backoff(1, 1), stopping, task=f"t{n}", poll_seconds=POLL)
        )
        for n in range(10)
    ]
    await asyncio.sleep(polls_down * POLL)
    stopping.set()
    await asyncio.gather(*waiters)
    # The first question of each loop after its failure is its own; the polls are shared.
    assert probe.calls <= 10 + 2 * polls_down


async def test_the_beat_goes_on_while_waiting() -> None:
    beats = 0

    def beat() -> None:
        nonlocal beats
        beats += 1

    probe = ScriptedProbe(down_for=4)
    answers = DatabaseAnswers(probe)
    await wait_to_retry(
        answers, Backoff(1, 1), asyncio.Event(), task="t", beat=beat, poll_seconds=POLL
    )
    assert beats == 4


async def test_an_answer_is_reused_only_by_those_who_asked_before_it_started() -> None:
    probe = ScriptedProbe(down_for=1)
    answers = DatabaseAnswers(probe)
    before = time.monotonic()
    assert not await answers.since(before)
    assert not await answers.since(before), "asked before that probe started: its answer"
    assert await answers.since(time.monotonic()), "asked after: a new probe"
    assert probe.calls == 2


async def test_a_slow_probe_bounds_the_rate_by_itself() -> None:
    """A probe that takes longer than a poll (a server that does not answer the connection
    within the timeout) is not run twice at once."""
    probe = ScriptedProbe(down_for=3, seconds=3 * POLL)
    answers = DatabaseAnswers(probe)
    stopping = asyncio.Event()
    await asyncio.gather(
        *(
            wait_to_retry(answers, Backoff(1, 1), stopping, task="t", poll_seconds=POLL)
            for _ in range(3)
        )
    )
    assert probe.calls <= 6
