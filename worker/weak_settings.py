"""Settings that work but leave the service exposed: told at start-up, refused when strict.

Each weakness names the setting and why it is weak, never its value beyond a mode name (the
database URL and the passwords are secrets). `STRICT_SECURITY=true` (the Kubernetes
manifests) turns the warnings into a refusal to start; a local run only warns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

import structlog

from worker.settings import Settings

log = structlog.get_logger(__name__)

TLS_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})
# libpq's (and asyncpg's) default when neither DATABASE_URL nor PGSSLMODE names one: it
# tries TLS, falls back to plaintext, and checks no certificate.
LIBPQ_DEFAULT_SSLMODE = "prefer"


@dataclass(frozen=True, slots=True)
class WeakSetting:
    setting: str
    reason: str

    def describe(self) -> str:
        return f"{self.setting}: {self.reason}"


class WeakSettingsRefused(Exception):
    """STRICT_SECURITY=true and at least one weak setting: the worker does not start."""

    def __init__(self, weaknesses: Sequence[WeakSetting]) -> None:
        super().__init__(
            "STRICT_SECURITY=true refuses to start with weak settings: "
            + "; ".join(weakness.describe() for weakness in weaknesses)
        )
        self.weaknesses = list(weaknesses)


def configuration_weaknesses(
    settings: Settings, environment: Mapping[str, str]
) -> list[WeakSetting]:
    """What the configuration alone shows (`environment` for PGSSLMODE, as asyncpg reads it)."""
    return [
        *_database_tls_weaknesses(settings.database_url.get_secret_value(), environment),
        *_kafka_weaknesses(settings),
    ]


def role_weaknesses(is_superuser: bool) -> list[WeakSetting]:
    """What the database says about the role DATABASE_URL connects as."""
    if not is_superuser:
        return []
    return [
        WeakSetting(
            "DATABASE_URL",
            "connects as a superuser: it bypasses every grant and row check, and a stolen "
            "credential owns the whole cluster; use the worker role (create-roles)",
        )
    ]


def enforce(weaknesses: Sequence[WeakSetting], *, strict: bool) -> None:
    """Logs each weakness as `security.weak_setting`; raises WeakSettingsRefused when strict."""
    for weakness in weaknesses:
        log.warning(
            "security.weak_setting",
            setting=weakness.setting,
            reason=weakness.reason,
            strict=strict,
        )
    if strict and weaknesses:
        raise WeakSettingsRefused(weaknesses)


def _database_tls_weaknesses(url: str, environment: Mapping[str, str]) -> list[WeakSetting]:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))  # the last value wins
    host = query.get("host") or parts.hostname or ""
    if host.startswith("/"):
        return []  # a Unix socket: nothing crosses a network
    if "sslmode" in query:
        mode, source = query["sslmode"], "DATABASE_URL sslmode"
    elif environment.get("PGSSLMODE"):
        mode, source = environment["PGSSLMODE"], "PGSSLMODE"
    else:
        mode, source = LIBPQ_DEFAULT_SSLMODE, "DATABASE_URL sslmode (absent)"
    if mode == "verify-full":
        return []
    reason = _SSLMODE_WEAKNESS.get(mode, "is not a mode libpq knows")
    return [WeakSetting(source, f"{reason}: use sslmode=verify-full with sslrootcert")]


_SSLMODE_WEAKNESS = {
    mode: f"{mode} may connect without TLS and checks no certificate"
    for mode in ("disable", "allow", "prefer")
} | {
    "require": "require encrypts but checks no certificate (anyone in the path can answer)",
    "verify-ca": "verify-ca checks the CA but not the host name (any server the CA signed)",
}


def _kafka_weaknesses(settings: Settings) -> list[WeakSetting]:
    protocol = settings.kafka_security_protocol
    weaknesses = []
    if protocol not in TLS_PROTOCOLS:
        weaknesses.append(
            WeakSetting(
                "KAFKA_SECURITY_PROTOCOL",
                f"{protocol} sends messages (personal data) unencrypted and does not "
                "authenticate the broker: use SASL_SSL",
            )
        )
    if protocol == "SASL_PLAINTEXT" and settings.kafka_sasl_mechanism == "PLAIN":
        weaknesses.append(
            WeakSetting(
                "KAFKA_SASL_MECHANISM",
                "PLAIN over SASL_PLAINTEXT sends the password itself in clear: use SASL_SSL, "
                "and SCRAM-SHA-512",
            )
        )
    if protocol in TLS_PROTOCOLS and not settings.kafka_ssl_check_hostname:
        weaknesses.append(
            WeakSetting(
                "KAFKA_SSL_CHECK_HOSTNAME",
                "false accepts any certificate the CA signed, for any host: another "
                "service's certificate can impersonate the broker",
            )
        )
    return weaknesses
