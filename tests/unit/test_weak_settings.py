"""`worker.weak_settings`: which settings are weak, what is logged, and the strict refusal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from worker.settings import Settings
from worker.weak_settings import (
    WeakSetting,
    WeakSettingsRefused,
    configuration_weaknesses,
    enforce,
    role_weaknesses,
)

SECURE_URL = "postgresql://license_worker:s3cret-pw@db.example:5432/license?sslmode=verify-full&sslrootcert=/ca.crt"
SECURE_KAFKA: dict[str, Any] = {
    "kafka_security_protocol": "SASL_SSL",
    "kafka_sasl_mechanism": "SCRAM-SHA-512",
    "kafka_sasl_username": "license-worker",
    "kafka_sasl_password": "kafka-s3cret",
}
KUBERNETES = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def weak(environment: dict[str, str] | None = None, **values: Any) -> list[str]:
    settings = Settings(**{"database_url": SECURE_URL, **SECURE_KAFKA, **values})
    return [weakness.setting for weakness in configuration_weaknesses(settings, environment or {})]


def test_a_verified_database_and_sasl_ssl_kafka_are_not_weak() -> None:
    assert weak() == []


@pytest.mark.parametrize(
    ("url", "environment", "expected"),
    [
        pytest.param(
            "postgresql://u@db/x", {}, ["DATABASE_URL sslmode (absent)"], id="absent-is-prefer"
        ),
        *(
            pytest.param(
                f"postgresql://u@db/x?sslmode={mode}", {}, ["DATABASE_URL sslmode"], id=mode
            )
            for mode in ("disable", "allow", "prefer", "require", "verify-ca", "bogus")
        ),
        pytest.param(
            "postgresql://u@db/x?sslmode=verify-full&sslmode=require",
            {},
            ["DATABASE_URL sslmode"],
            id="the-last-value-counts-as-asyncpg-reads-it",
        ),
        pytest.param("postgresql://u@db/x", {"PGSSLMODE": "verify-full"}, [], id="pgsslmode-full"),
        pytest.param(
            "postgresql://u@db/x", {"PGSSLMODE": "require"}, ["PGSSLMODE"], id="pgsslmode-weak"
        ),
        pytest.param(
            "postgresql://u@db/x?sslmode=verify-full",
            {"PGSSLMODE": "disable"},
            [],
            id="the-url-wins-over-pgsslmode",
        ),
        pytest.param(
            "postgresql://u@/x?host=/var/run/postgresql", {}, [], id="unix-socket-no-network"
        ),
    ],
)
def test_database_tls(url: str, environment: dict[str, str], expected: list[str]) -> None:
    assert weak(environment, database_url=url) == expected


@pytest.mark.parametrize(
    ("kafka", "expected"),
    [
        pytest.param(
            {"kafka_security_protocol": "PLAINTEXT", "kafka_sasl_mechanism": None},
            ["KAFKA_SECURITY_PROTOCOL"],
            id="plaintext-without-sasl",
        ),
        pytest.param(
            {"kafka_security_protocol": "SASL_PLAINTEXT"},
            ["KAFKA_SECURITY_PROTOCOL"],
            id="scram-over-plaintext",
        ),
        pytest.param(
            {"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "PLAIN"},
            ["KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM"],
            id="plain-over-plaintext",
        ),
        pytest.param({"kafka_sasl_mechanism": "PLAIN"}, [], id="plain-over-tls"),
        pytest.param({"kafka_security_protocol": "SSL"}, [], id="tls-client-certificates"),
        pytest.param(
            {"kafka_ssl_check_hostname": False}, ["KAFKA_SSL_CHECK_HOSTNAME"], id="no-hostname"
        ),
        pytest.param(
            {"kafka_security_protocol": "PLAINTEXT", "kafka_ssl_check_hostname": False},
            ["KAFKA_SECURITY_PROTOCOL"],
            id="hostname-check-irrelevant-without-tls",
        ),
    ],
)
def test_kafka(kafka: dict[str, Any], expected: list[str]) -> None:
    assert weak(**kafka) == expected


def test_the_defaults_of_a_local_run_are_weak_on_both_counts() -> None:
    settings = Settings()
    found = [w.setting for w in configuration_weaknesses(settings, {})]
    assert found == ["DATABASE_URL sslmode (absent)", "KAFKA_SECURITY_PROTOCOL"]


def test_a_superuser_is_weak_and_another_role_is_not() -> None:
    [weakness] = role_weaknesses(is_superuser=True)
    assert weakness.setting == "DATABASE_URL"
    assert "superuser" in weakness.reason
    assert role_weaknesses(is_superuser=False) == []


def test_reasons_never_carry_secrets_or_hosts() -> None:
    settings = Settings(
        database_url="postgresql://bob:s3cret-pw@db.example/x?sslmode=require",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_password="kafka-s3cret",
    )
    text = repr(configuration_weaknesses(settings, {}))
    for value in ("s3cret-pw", "kafka-s3cret", "bob", "db.example"):
        assert value not in text


def test_enforce_logs_each_weakness_and_refuses_only_when_strict() -> None:
    weaknesses = [WeakSetting("KAFKA_SECURITY_PROTOCOL", "plain"), WeakSetting("PGSSLMODE", "x")]
    with structlog.testing.capture_logs() as logs:
        enforce(weaknesses, strict=False)
    assert [(e["event"], e["log_level"], e["setting"]) for e in logs] == [
        ("security.weak_setting", "warning", "KAFKA_SECURITY_PROTOCOL"),
        ("security.weak_setting", "warning", "PGSSLMODE"),
    ]
    with structlog.testing.capture_logs() as logs, pytest.raises(WeakSettingsRefused) as refused:
        enforce(weaknesses, strict=True)
    assert len(logs) == 2
    assert "STRICT_SECURITY=true" in str(refused.value)
    assert "KAFKA_SECURITY_PROTOCOL: plain" in str(refused.value)
    assert "PGSSLMODE: x" in str(refused.value)
    enforce([], strict=True)  # nothing weak: starts


def test_the_kubernetes_manifests_are_strict_and_pass_their_own_checks() -> None:
    """The ConfigMap sets STRICT_SECURITY=true, so a weak value there would stop every pod:
    the Deployment's and the migration Job's settings must have none."""
    documents = [
        document
        for path in sorted(KUBERNETES.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
    ]
    [config] = [d["data"] for d in documents if d["kind"] == "ConfigMap"]
    [job] = [d for d in documents if d["kind"] == "Job"]
    assert config["STRICT_SECURITY"] == "true"
    job_environment = {
        variable["name"]: variable["value"]
        for variable in job["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    for environment in (config, {**config, **job_environment}):
        settings = Settings(
            database_url=environment["DATABASE_URL"],
            kafka_bootstrap_servers=environment["KAFKA_BOOTSTRAP_SERVERS"],
            kafka_security_protocol=environment["KAFKA_SECURITY_PROTOCOL"],
            kafka_sasl_mechanism=environment["KAFKA_SASL_MECHANISM"],
            kafka_ssl_check_hostname=environment.get("KAFKA_SSL_CHECK_HOSTNAME", "true"),
        )
        assert configuration_weaknesses(settings, {}) == []
