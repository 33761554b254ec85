"""TLS to Postgres: `sslmode` and `sslrootcert` in DATABASE_URL reach every connection the
worker makes. Needs the local services (deploy/local/services.sh makes the server's
certificate with a throw-away CA)."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trustme

from tests.support import (
    ROLES,
    Services,
    encode,
    fetch,
    fetchval,
    make_settings,
    produce,
    running_worker,
    wait_until,
)
from worker.db.repository import Repository
from worker.sim.fleet import SimulatedDevice, agent_event

pytestmark = pytest.mark.integration

CONNECTIONS_OF_THE_WORKER = """
SELECT s.ssl, s.version
FROM pg_stat_activity AS a
JOIN pg_stat_ssl AS s USING (pid)
WHERE a.datname = $1 AND a.usename = $2
"""


@pytest.fixture
def server_ca(services: Services) -> Path:
    if services.state_dir is None:
        pytest.skip("needs Postgres started by deploy/local/services.sh (its CA)")
    path = services.state_dir / "pg-tls" / "ca.crt"
    if not path.exists():
        pytest.skip("these local services were started without TLS; restart them")
    return path


def with_tls(url: str, mode: str, root_certificate: Path | None = None) -> str:
    query = f"sslmode={mode}" + (f"&sslrootcert={root_certificate}" if root_certificate else "")
    return f"{url}?{query}"


async def test_the_worker_stores_signals_over_verified_tls(
    services: Services, database_url: str, topics: dict[str, str], server_ca: Path
) -> None:
    tls_url = with_tls(database_url, "verify-full", server_ca)
    device = SimulatedDevice("c1", "d1", "alice", "business")
    event = agent_event(device, "heartbeat", datetime.now(UTC))
    await produce(
        services.kafka_bootstrap_servers, topics["heartbeat_topic"], [(device.key, encode(event))]
    )

    async with running_worker(make_settings(services, tls_url, topics)):

        async def stored() -> bool:
            return await fetchval(tls_url, "SELECT count(*) FROM devices") == 1

        await wait_until(stored, timeout=60)
        database = database_url.rsplit("/", 1)[-1]
        connections = await fetch(
            services.superuser_url(database_url), CONNECTIONS_OF_THE_WORKER, database, ROLES.worker
        )
    assert len(connections) >= 2, "the ingestion and the background pool"
    assert all(row["ssl"] and row["version"].startswith("TLS") for row in connections)


async def test_verify_full_encrypts_and_disable_does_not(
    database_url: str, server_ca: Path
) -> None:
    """The control for the test above: the server reports which connections use TLS."""
    in_use = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    assert await fetchval(with_tls(database_url, "verify-full", server_ca), in_use) is True
    assert await fetchval(with_tls(database_url, "disable"), in_use) is False


async def test_an_untrusted_server_certificate_is_refused(
    database_url: str, server_ca: Path, tmp_path: Path
) -> None:
    other_ca = tmp_path / "other-ca.crt"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        await Repository.connect(with_tls(database_url, "verify-full", other_ca), 1)
