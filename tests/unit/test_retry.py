"""`worker.retry.retry`: retries what is retriable, raises what is not, stops when asked."""

from __future__ import annotations

import asyncio

import pytest

from worker.retry import Stopped, always, retry


class Flaky:
    """Fails with each of `errors` in turn, then returns "done"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def transient(error: Exception) -> bool:
    return isinstance(error, ConnectionError)


async def test_a_transient_error_is_waited_out_and_retried() -> None:
    waited: list[Exception] = []

    async def wait(error: Exception) -> None:
        waited.append(error)

    operation = Flaky(ConnectionError("a"), ConnectionError("b"))
    assert await retry(operation, retriable=transient, wait=wait) == "done"
    assert operation.calls == 3
    assert [str(error) for error in waited] == ["a", "b"]


async def test_a_permanent_error_is_raised_without_waiting() -> None:
    async def wait(error: Exception) -> None:
        raise AssertionError("a permanent error is not waited out")

    operation = Flaky(ValueError("refused"))
    with pytest.raises(ValueError, match="refused"):
        await retry(operation, retriable=transient, wait=wait)
    assert operation.calls == 1


async def test_a_wait_may_give_up_by_raising() -> None:
    async def wait(error: Exception) -> None:
        raise error

    with pytest.raises(ConnectionError):
        await retry(Flaky(ConnectionError()), retriable=always, wait=wait)


async def test_stopping_during_the_wait_gives_up_without_retrying() -> None:
    stopping = asyncio.Event()

    async def wait(error: Exception) -> None:
        stopping.set()

    operation = Flaky(ConnectionError())
    with pytest.raises(Stopped):
        await retry(operation, retriable=transient, wait=wait, stopping=stopping)
    assert operation.calls == 1


async def test_a_failure_after_stopping_is_not_waited_out() -> None:
    stopping = asyncio.Event()
    stopping.set()

    async def wait(error: Exception) -> None:
        raise AssertionError("no wait once stopping")

    with pytest.raises(Stopped):
        await retry(Flaky(ConnectionError()), retriable=transient, wait=wait, stopping=stopping)


async def test_a_permanent_error_while_stopping_is_still_raised_as_such() -> None:
    stopping = asyncio.Event()
    stopping.set()

    async def wait(error: Exception) -> None:
        raise AssertionError("not waited")

    with pytest.raises(ValueError, match="bad row"):
        await retry(Flaky(ValueError("bad row")), retriable=transient, wait=wait, stopping=stopping)
