"""`worker.settings.Settings`: one frozen object read from the environment."""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from datetime import timedelta
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from pydantic import SecretStr, ValidationError

from worker.settings import Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults are what is under test: no variable of the machine may leak in."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(name, raising=False)


def test_defaults() -> None:
    settings = Settings()
    assert settings.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert settings.kafka_security_protocol == "PLAINTEXT"
    assert settings.agent_topics == ("agent.heartbeat.v1", "agent.lifecycle.v1")
    assert settings.dlq_topic == "agent.events.dlq.v1"
    assert settings.license_events_topic == "license.events.v1"
    assert settings.max_message_bytes == 65_536
    assert settings.future_tolerance == timedelta(minutes=5)
    assert settings.metrics_port == 0
    assert str(settings.metrics_host) == "0.0.0.0"


@pytest.mark.parametrize(
    ("variable", "value", "attribute", "expected"),
    [
        ("KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9", "kafka_bootstrap_servers", "k1:9092,k2:9"),
        ("HEARTBEAT_TOPIC", "hb", "heartbeat_topic", "hb"),
        ("CONSUMER_GROUP", "g-2", "consumer_group", "g-2"),
        ("BATCH_MAX_RECORDS", "10", "batch_max_records", 10),
        ("MAX_MESSAGE_BYTES", "256", "max_message_bytes", 256),
        ("FUTURE_TOLERANCE_SECONDS", "0", "future_tolerance", timedelta(0)),
        ("FUTURE_TOLERANCE_SECONDS", "90.5", "future_tolerance", timedelta(seconds=90.5)),
        ("RETRY_MAX_SECONDS", "2.5", "retry_max_seconds", 2.5),
        ("METRICS_PORT", "9100", "metrics_port", 9100),
        ("METRICS_HOST", "127.0.0.1", "metrics_host", IPv4Address("127.0.0.1")),
        ("METRICS_HOST", "::1", "metrics_host", IPv6Address("::1")),
        ("LOG_LEVEL", "debug", "log_level", "debug"),
        ("KAFKA_SSL_CHECK_HOSTNAME", "false", "kafka_ssl_check_hostname", False),
        ("KAFKA_SASL_MECHANISM", "PLAIN", "kafka_sasl_mechanism", "PLAIN"),
        ("kafka_security_protocol", "SASL_PLAINTEXT", "kafka_security_protocol", "SASL_PLAINTEXT"),
    ],
)
def test_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, attribute: str, expected: object
) -> None:
    monkeypatch.setenv(variable, value)
    assert getattr(Settings(), attribute) == expected


def test_secrets_from_the_environment_are_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:db-pw@db:5432/license")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "kafka-pw")
    settings = Settings()
    assert isinstance(settings.database_url, SecretStr)
    assert isinstance(settings.kafka_sasl_password, SecretStr)
    assert settings.database_url.get_secret_value() == "postgresql://app:db-pw@db:5432/license"
    assert "db-pw" not in repr(settings)
    assert "kafka-pw" not in repr(settings)
    assert "kafka-pw" not in str(settings)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MAX_MESSAGE_BYTES", "255"),
        ("MAX_MESSAGE_BYTES", "10485761"),
        ("BATCH_MAX_RECORDS", "0"),
        ("BATCH_MAX_RECORDS", "many"),
        ("DATABASE_POOL_SIZE", "0"),
        ("FUTURE_TOLERANCE_SECONDS", "-1"),
        ("RETRY_INITIAL_SECONDS", "0"),
        ("METRICS_PORT", "65536"),
        ("METRICS_HOST", "localhost"),  # an address, not a name to resolve
        ("KAFKA_SECURITY_PROTOCOL", "TLS"),
        ("KAFKA_SASL_MECHANISM", "GSSAPI"),
        ("LOG_LEVEL", "trace"),
        ("LOG_FORMAT", "xml"),
    ],
)
def test_invalid_values_are_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError):
        Settings()


def test_unknown_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOT_A_SETTING", "x")
    assert not hasattr(Settings(), "not_a_setting")


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.batch_max_records = 1  # type: ignore[misc]


# --- masked ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://app:hunter2@db:5432/license",
            "postgresql://app:***@db:5432/license",
        ),
        ("postgres://app:p@ss@db/license", "postgres://app:***@db/license"),
        ("postgresql://app:a:b@db/license", "postgresql://app:***@db/license"),
        ("postgresql://app:%40pw%3A@db/license", "postgresql://app:***@db/license"),
        (
            "postgresql://app:pw@db1:5432,db2:5432/license?sslmode=require",
            "postgresql://app:***@db1:5432,db2:5432/license?sslmode=require",
        ),
        ("postgresql://app@db/license", "postgresql://app@db/license"),
        ("postgresql://db/license", "postgresql://db/license"),
        ("postgresql://app:@db/license", "postgresql://app:***@db/license"),
    ],
    ids=[
        "password",
        "at-in-password",
        "colon-in-password",
        "escaped-password",
        "multi-host",
        "no-password",
        "no-credentials",
        "empty-password",
    ],
)
def test_masked_database_url(monkeypatch: pytest.MonkeyPatch, url: str, shown: str) -> None:
    monkeypatch.setenv("DATABASE_URL", url)
    assert Settings().masked()["database_url"] == shown


def test_masked_hides_a_password_in_the_query(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@db:5432/license?password=hunter2")
    assert "hunter2" not in json.dumps(Settings().masked())


def test_masked_hides_every_secret_and_shows_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:db-pw@db:5432/license")
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "worker")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "kafka-pw")
    shown = Settings().masked()
    text = json.dumps(shown)  # it must be loggable as JSON
    assert "db-pw" not in text
    assert "kafka-pw" not in text
    assert shown["kafka_sasl_password"] != "kafka-pw"
    assert shown["kafka_sasl_username"] == "worker"
    assert shown["kafka_security_protocol"] == "SASL_SSL"
    assert set(shown) == set(Settings.model_fields)


def test_masked_without_sasl_password() -> None:
    assert Settings().masked()["kafka_sasl_password"] is None


# --- Kafka client options -------------------------------------------------------------------


def test_plaintext_client_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    assert Settings().kafka_client_options() == {
        "bootstrap_servers": "k1:9092,k2:9092",
        "security_protocol": "PLAINTEXT",
    }


@pytest.mark.parametrize(
    ("mechanism", "expected"),
    [(None, "SCRAM-SHA-512"), ("PLAIN", "PLAIN"), ("SCRAM-SHA-256", "SCRAM-SHA-256")],
)
def test_sasl_plaintext_client_options(
    monkeypatch: pytest.MonkeyPatch, mechanism: str | None, expected: str
) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "worker")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "kafka-pw")
    if mechanism:
        monkeypatch.setenv("KAFKA_SASL_MECHANISM", mechanism)
    assert Settings().kafka_client_options() == {
        "bootstrap_servers": "127.0.0.1:9092",
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": expected,
        "sasl_plain_username": "worker",
        "sasl_plain_password": "kafka-pw",
    }


def test_sasl_without_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    options = Settings().kafka_client_options()
    assert options["sasl_plain_username"] is None
    assert options["sasl_plain_password"] is None


# TLS without certificate files: the system trust store, so no file needs to exist here.
@pytest.mark.parametrize("protocol", ["SSL", "SASL_SSL"])
@pytest.mark.parametrize("check_hostname", [True, False])
def test_tls_client_options(
    monkeypatch: pytest.MonkeyPatch, protocol: str, check_hostname: bool
) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", protocol)
    monkeypatch.setenv("KAFKA_SSL_CHECK_HOSTNAME", str(check_hostname).lower())
    options = Settings().kafka_client_options()
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname is check_hostname
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert ("sasl_mechanism" in options) is (protocol == "SASL_SSL")


# --- passwords from files (container secrets) -----------------------------------------------


def write_secret(tmp_path: Path, text: str, name: str = "secret") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("file_text", "password"),
    [
        ("db-pw", "db-pw"),
        ("db-pw\n", "db-pw"),
        ("db-pw\r\n", "db-pw"),
        ("db-pw\n\n", "db-pw\n"),  # only the one newline an editor or `echo` adds
        (" db pw ", " db pw "),
    ],
)
def test_database_password_from_a_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, file_text: str, password: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://license_worker@db:5432/license")
    monkeypatch.setenv("DATABASE_PASSWORD_FILE", str(write_secret(tmp_path, file_text)))
    settings = Settings()
    assert isinstance(settings.database_url, SecretStr)
    assert unquote(urlsplit(settings.database_url.get_secret_value()).password or "") == password
    assert settings.database_password_file == tmp_path / "secret"


def test_a_password_from_a_file_keeps_the_rest_of_the_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(
        "DATABASE_URL",
        "postgresql://license_worker@db1:5432,db2:5432/license"
        "?sslmode=verify-full&sslrootcert=/etc/pg/ca.crt",
    )
    monkeypatch.setenv("DATABASE_PASSWORD_FILE", str(write_secret(tmp_path, "p@ss:w/rd?#%\n")))
    url = Settings().database_url.get_secret_value()
    assert url == (
        "postgresql://license_worker:p%40ss%3Aw%2Frd%3F%23%25@db1:5432,db2:5432/license"
        "?sslmode=verify-full&sslrootcert=/etc/pg/ca.crt"
    )


def test_a_password_file_works_without_a_user_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://db/license")
    monkeypatch.setenv("DATABASE_PASSWORD_FILE", str(write_secret(tmp_path, "pw")))
    assert Settings().database_url.get_secret_value() == "postgresql://:pw@db/license"


def test_a_password_file_and_the_default_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_PASSWORD_FILE", str(write_secret(tmp_path, "pw")))
    assert Settings().database_url.get_secret_value() == (
        "postgresql://postgres:pw@127.0.0.1:5432/license"
    )


def test_password_files_work_for_settings_given_in_code(tmp_path: Path) -> None:
    settings = Settings(
        database_url=SecretStr("postgresql://app@db/license"),
        database_password_file=write_secret(tmp_path, "db-pw", "db"),
        kafka_sasl_password_file=write_secret(tmp_path, "kafka-pw", "kafka"),
    )
    assert settings.database_url.get_secret_value() == "postgresql://app:db-pw@db/license"
    assert settings.kafka_sasl_password == SecretStr("kafka-pw")


@pytest.mark.parametrize(
    "url",
    ["postgresql://app:inline@db/license", "postgresql://app@db/license?password=inline"],
    ids=["user-info", "query"],
)
def test_a_password_in_the_url_and_a_password_file_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("DATABASE_PASSWORD_FILE", str(write_secret(tmp_path, "from-file")))
    with pytest.raises(ValidationError, match="give the password one way only") as refused:
        Settings()
    assert "inline" not in str(refused.value)
    assert "from-file" not in str(refused.value)


def test_kafka_sasl_password_from_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "worker")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD_FILE", str(write_secret(tmp_path, "kafka-pw\n")))
    settings = Settings()
    assert isinstance(settings.kafka_sasl_password, SecretStr)
    assert settings.kafka_client_options()["sasl_plain_password"] == "kafka-pw"


def test_kafka_sasl_password_and_its_file_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "inline")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD_FILE", str(write_secret(tmp_path, "from-file")))
    with pytest.raises(ValidationError, match="give the password one way only") as refused:
        Settings()
    assert "inline" not in str(refused.value)


@pytest.mark.parametrize("variable", ["DATABASE_PASSWORD_FILE", "KAFKA_SASL_PASSWORD_FILE"])
@pytest.mark.parametrize(
    ("make_path", "problem"),
    [
        (lambda tmp: tmp / "missing", "No such file or directory"),
        (lambda tmp: tmp, "Is a directory"),
        (lambda tmp: write_secret(tmp, ""), "is empty"),
        (lambda tmp: write_secret(tmp, "\n"), "is empty"),
    ],
    ids=["missing", "directory", "empty", "only-a-newline"],
)
def test_an_unusable_password_file_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    variable: str,
    make_path: Callable[[Path], Path],
    problem: str,
) -> None:
    path = make_path(tmp_path)
    monkeypatch.setenv(variable, str(path))
    with pytest.raises(ValidationError) as refused:
        Settings()
    [error] = refused.value.errors()
    assert error["msg"] == f"Value error, {variable}: " + (
        f"{path} {problem}" if problem == "is empty" else f"cannot read {path}: {problem}"
    )


def test_a_password_file_that_is_not_text_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "binary"
    path.write_bytes(b"\xff\xfe")
    monkeypatch.setenv("DATABASE_PASSWORD_FILE", str(path))
    with pytest.raises(ValidationError, match=r"cannot read .*: not UTF-8 text"):
        Settings()


def test_an_empty_file_variable_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_PASSWORD_FILE", "")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD_FILE", "")
    settings = Settings()
    assert settings.database_password_file is None
    assert settings.kafka_sasl_password_file is None
    assert (
        settings.database_url.get_secret_value() == "postgresql://postgres@127.0.0.1:5432/license"
    )


def test_masked_never_shows_passwords_from_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(
        "DATABASE_URL",
        "postgresql://app@db:5432/license?sslmode=verify-full&sslrootcert=/pg/ca.crt",
    )
    monkeypatch.setenv("DATABASE_PASSWORD_FILE", str(write_secret(tmp_path, "db-pw", "db")))
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD_FILE", str(write_secret(tmp_path, "kafka-pw", "k")))
    settings = Settings()
    shown = settings.masked()
    text = json.dumps(shown)
    assert "db-pw" not in text
    assert "kafka-pw" not in text
    assert "db-pw" not in repr(settings)
    assert "kafka-pw" not in repr(settings)
    assert shown["database_url"] == (
        "postgresql://app:***@db:5432/license?sslmode=verify-full&sslrootcert=/pg/ca.crt"
    )
    assert shown["database_password_file"] == str(tmp_path / "db")
    assert shown["kafka_sasl_password_file"] == str(tmp_path / "k")


def test_masked_keeps_the_tls_parameters_readable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "DATABASE_URL",
        "postgresql://app:pw@db/license?password=pw2&sslmode=verify-full&sslrootcert=/pg/ca.crt",
    )
    shown = Settings().masked()["database_url"]
    assert shown == (
        "postgresql://app:***@db/license?password=***&sslmode=verify-full&sslrootcert=/pg/ca.crt"
    )


# --- Postgres refusals at start-up ------------------------------------------------------------


def test_a_rejected_login_is_a_refusal_naming_what_to_check() -> None:
    import asyncpg

    from worker.db.errors import database_refusal

    reason = database_refusal(asyncpg.InvalidPasswordError("password authentication failed"))
    assert reason is not None
    assert "28P01" in reason
    assert "DATABASE_PASSWORD_FILE" in reason
    assert database_refusal(asyncpg.InvalidAuthorizationSpecificationError("no")) is not None


def test_an_untrusted_certificate_is_a_refusal_and_an_outage_is_not() -> None:
    import ssl

    import asyncpg

    from worker.db.errors import database_refusal

    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_message = "unable to get local issuer certificate"
    reason = database_refusal(error)
    assert reason is not None
    assert "sslrootcert" in reason
    assert "local issuer" in reason
    assert database_refusal(ConnectionRefusedError()) is None
    assert database_refusal(asyncpg.CannotConnectNowError("starting up")) is None


@pytest.mark.parametrize(
    "variable", ["kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"]
)
def test_a_missing_tls_file_is_named_at_start_up(variable: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=f"{variable.upper()}: cannot read"):
        Settings(**{variable: str(tmp_path / "absent.pem")})
    present = tmp_path / "present.pem"
    present.write_text("-----BEGIN CERTIFICATE-----\n")
    assert getattr(Settings(**{variable: str(present)}), variable) == str(present)


GOOD_KEY = "3f9a0c51d2e8b7a4c6f1e0d9b8a7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9"


def test_the_pseudonym_key_from_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PSEUDONYM_KEY_FILE", str(write_secret(tmp_path, GOOD_KEY + "\n")))
    settings = Settings()
    assert settings.required_pseudonym_key() == GOOD_KEY
    assert len(settings.event_id_key()) == 32
    assert settings.event_id_key() != bytes.fromhex(GOOD_KEY), "derived, not the key itself"
    assert GOOD_KEY not in json.dumps(settings.masked())


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("CHANGE-ME-to-64-random-hex-characters", "sample value"),
        ("change-me" + "ab" * 40, "sample value"),
        ("ab" * 31, "has 31 bytes"),
        ("pseudonym-secret-99aa0", "hexadecimal"),
        ("00" * 32, "not random"),
        ("abcd" * 16, "not random"),
        (GOOD_KEY[:-1], "hexadecimal"),
    ],
)
def test_a_weak_pseudonym_key_is_refused_without_quoting_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, key: str, problem: str
) -> None:
    monkeypatch.setenv("PSEUDONYM_KEY_FILE", str(write_secret(tmp_path, key)))
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert problem in str(refused.value)
    assert "PSEUDONYM_KEY_FILE" in str(refused.value)
    assert key not in str(refused.value)


def test_the_pseudonym_key_and_its_file_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PSEUDONYM_KEY", GOOD_KEY)
    monkeypatch.setenv("PSEUDONYM_KEY_FILE", str(write_secret(tmp_path, GOOD_KEY)))
    with pytest.raises(ValidationError, match="one way only"):
        Settings()


def test_without_a_pseudonym_key_only_what_needs_it_refuses() -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="PSEUDONYM_KEY_FILE is not set"):
        settings.event_id_key()
