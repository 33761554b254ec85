"""A real streaming replica of the tests' Postgres: `pg_basebackup -R` from it into a fresh
data directory, started on a free port, stopped and deleted at the end. Needs the server
binaries where the primary runs (deploy/local/services.sh) and a primary that lets its
superuser stream WAL (services.sh's pg_hba.conf has the `replication` line)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from tests.support import wait_until


def postgres_binaries() -> Path | None:
    """Where initdb and pg_basebackup live: PG_BIN, else the newest /usr/lib/postgresql/*,
    preferring 15 (as deploy/local/services.sh chooses)."""
    candidates = [os.environ.get("PG_BIN", ""), "/usr/lib/postgresql/15/bin"]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "pg_basebackup").exists():
            return Path(candidate)
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def closed_port_url(url: str) -> str:
    """`url` with its port swapped for one nothing listens on."""
    return with_port(url, free_port())


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    user_info, _, _ = parts.netloc.rpartition("@")
    netloc = f"{user_info}@127.0.0.1:{port}" if user_info else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class Replica:
    port: int
    primary_url: str  # a superuser's, on the primary

    def url_for(self, url: str) -> str:
        """`url` (a role and database on the primary) on the replica."""
        return with_port(url, self.port)

    async def caught_up(self) -> None:
        """Waits until the replica has replayed everything the primary has written so far."""
        primary = await asyncpg.connect(self.primary_url)
        try:
            written = await primary.fetchval("SELECT pg_current_wal_lsn()::text")
        finally:
            await primary.close()

        async def replayed() -> bool:
            replica = await asyncpg.connect(self.url_for(self.primary_url))
            try:
                return bool(
                    await replica.fetchval(
                        "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", written
                    )
                )
            finally:
                await replica.close()

        await wait_until(replayed, timeout=60)


def _as_postgres(command: list[str], cwd: Path) -> list[str]:
    """initdb and pg_ctl refuse root: as root, run them as the postgres user."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


@contextlib.contextmanager
def streaming_replica(primary_url: str) -> Iterator[Replica]:
    """A started replica of the cluster `primary_url` (a superuser's URL) is on."""
    binaries = postgres_binaries()
    if binaries is None:
        raise RuntimeError("no pg_basebackup: set PG_BIN to the Postgres server binaries")
    primary = urlsplit(primary_url)
    home = Path(tempfile.mkdtemp(prefix="license-replica-"))
    if os.geteuid() == 0:
        shutil.chown(home, "postgres", "postgres")
    data = home / "data"
    port = free_port()

    def run(*command: str) -> None:
        done = subprocess.run(
            _as_postgres(list(command), home),
            cwd=home,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            log = home / "postgres.log"
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise RuntimeError(f"{command[0]} failed: {done.stderr}{done.stdout}{tail}")

    try:
        run(
            str(binaries / "pg_basebackup"),
            f"--host={primary.hostname}",
            f"--port={primary.port}",
            f"--username={primary.username}",
            f"--pgdata={data}",
            "--write-recovery-conf",  # -R: standby.signal and primary_conninfo
            "--wal-method=stream",
            "--checkpoint=fast",
        )
        # max_connections at least the primary's (services.sh starts it with 200), or a
        # hot standby refuses to start; no TLS (the tests connect in plain text).
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k '' -c max_connections=200 "
            "-c ssl=off -c fsync=off -c hot_standby=on"
        )
        run(
            str(binaries / "pg_ctl"),
            f"--pgdata={data}",
            f"--log={home / 'postgres.log'}",
            "--wait",
            "--timeout=60",
            f"--options={options}",
            "start",
        )
        yield Replica(port, primary_url)
    finally:
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):
                run(str(binaries / "pg_ctl"), f"--pgdata={data}", "-m", "fast", "-w", "stop")
        shutil.rmtree(home, ignore_errors=True)
