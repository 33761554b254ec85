"""Leader leases: which replica runs the sweeper, and which the relay (sql/queries/leases.sql,
migration 0014). They replace session advisory locks, which PgBouncer in transaction mode
cannot keep (a session is not a server connection there; docs/scaling.md, "PgBouncer").

A lease is a row with a holder, a token and an expiry on the database's clock. A replica
takes it when it has expired, renews it every third of LEADER_LEASE_SECONDS, and gives it up
when it stops. Two guards keep a replica that lost it from acting:
- locally, it acts only until the lease's duration has passed since it last asked for a
  renewal that succeeded (the database's expiry cannot be earlier);
- in the database, every transaction of its work first checks the lease with FOR SHARE
  (`Repository.fenced`): an expired lease, or one taken by another replica, refuses the
  transaction (LeaseLost), and a takeover waits until a transaction that passed the check
  has ended. A stale leader never writes after another took over.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING

import structlog

from worker.ops.logs import error_fields

if TYPE_CHECKING:
    from worker.db.repository import Repository

log = structlog.get_logger(__name__)

# A holder renews this many times per lease duration: two renewals may fail (a slow or
# briefly unreachable database) before the lease can expire.
RENEWALS_PER_LEASE = 3


class LeaseLost(Exception):
    """The lease a leader's work needs is no longer this replica's: it stops leading."""


def lease_holder(replica_id: str) -> str:
    """This process's name in a lease: its replica and a random part, since replicas on one
    host, or a one-shot command beside `run`, can share a replica id."""
    return f"{replica_id}:{secrets.token_hex(4)}"


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


@dataclass
class Lease:
    name: str
    holder: str
    seconds: float
    token: int | None = None
    # Event-loop time until which this replica may act, from its last successful renewal.
    valid_until: float = 0.0
    lost: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def duration(self) -> timedelta:
        return timedelta(seconds=self.seconds)

    @property
    def held(self) -> bool:
        return self.token is not None and _loop_time() < self.valid_until

    def renewed(self, token: int, asked_at: float) -> None:
        """The database set the expiry at least `seconds` after `asked_at`."""
        self.token = token
        self.valid_until = asked_at + self.seconds
        self.lost.clear()

    def give_up(self, reason: str) -> None:
        if self.token is not None:
            log.warning("lease.lost", lease=self.name, token=self.token, reason=reason)
        self.token = None
        self.lost.set()


class Leadership:
    """A lease this replica competes for (`acquire`), keeps renewed while it holds it, and
    gives up when closed."""

    def __init__(self, repository: Repository, name: str, holder: str, seconds: float) -> None:
        self._repository = repository
        self.lease = Lease(name, holder, seconds)
        self._renewing: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Leadership:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def acquire(self) -> Lease | None:
        """The lease if this replica holds it, or takes it now; None while another does."""
        lease = self.lease
        if lease.held:
            return lease
        self._stop_renewing()
        if not await self._repository.take_lease(lease):
            return None
        log.info("lease.taken", lease=lease.name, token=lease.token)
        self._renewing = asyncio.create_task(self._keep_renewed(), name=f"lease-{lease.name}")
        return lease

    async def close(self) -> None:
        """Stops renewing and gives the lease up, so another replica takes over at once."""
        self._stop_renewing()
        lease = self.lease
        if lease.token is not None:
            with contextlib.suppress(Exception):  # unreachable: the lease expires by itself
                await self._repository.release_lease(lease)
            lease.token = None
            lease.lost.set()

    def _stop_renewing(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            self._renewing = None

    async def _keep_renewed(self) -> None:
        lease = self.lease
        while lease.token is not None:
            await asyncio.sleep(lease.seconds / RENEWALS_PER_LEASE)
            try:
                if not await self._repository.renew_lease(lease):
                    lease.give_up("taken by another replica")
                    return
            except Exception as error:
                # Postgres away or slow: try again; the local deadline stops the work.
                log.warning("lease.renewal_failed", lease=lease.name, **error_fields(error))
            if not lease.held:
                lease.give_up("not renewed in time")
                return
