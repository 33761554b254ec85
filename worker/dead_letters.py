"""Sends messages that cannot be processed to the DLQ topic: bytes and key unchanged, the
reason in headers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from worker.decoding import Rejection

HEADER_PREFIX = "dlq."


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]
    rejection: Rejection


def dead_letter_headers(letter: DeadLetter, failed_at: datetime) -> list[tuple[str, bytes]]:
    """The original headers, then ours. Ours never hold message content (it may be personal)."""
    reason_headers = {
        "error.class": letter.rejection.reason.value,
        "error.message": letter.rejection.detail,
        "source.topic": letter.topic,
        "source.partition": str(letter.partition),
        "source.offset": str(letter.offset),
        "failed_at": failed_at.isoformat(),
    }
    original = [
        (name, value) for name, value in letter.headers if not name.startswith(HEADER_PREFIX)
    ]
    return original + [
        (HEADER_PREFIX + name, value.encode("utf-8")) for name, value in reason_headers.items()
    ]


async def publish_dead_letters(
    producer: Any, topic: str, letters: Sequence[DeadLetter], failed_at: datetime
) -> None:
    """Sends every letter and waits until the broker has acknowledged all of them."""
    deliveries = [
        await producer.send(
            topic,
            value=letter.value,
            key=letter.key,
            headers=dead_letter_headers(letter, failed_at),
        )
        for letter in letters
    ]
    await asyncio.gather(*deliveries)
