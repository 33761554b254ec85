"""A relay that dies by SIGKILL right after Kafka acknowledged its events and before it
marks them published: the worst moment for a crash. Run as a script by test_relay.py."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from worker.db.repository import Repository
from worker.db.session import Session
from worker.kafka.clients import create_producer
from worker.licensing.relay import Relay
from worker.settings import Settings


class RelayKilledAfterPublish(Relay):
    async def _mark_published(self, session: Session, rows: list[Any]) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


async def main() -> None:
    settings = Settings()
    repository = await Repository.connect(settings.database_url.get_secret_value(), 2)
    producer = create_producer(settings)
    await producer.start()
    await RelayKilledAfterPublish(settings, repository, producer).publish_pending()


if __name__ == "__main__":
    asyncio.run(main())
