"""`worker.kafka.refusals`: which start-up failures stop the worker at once, and what they say."""

from __future__ import annotations

import ssl

import pytest
from aiokafka.errors import (
    AuthenticationFailedError,
    KafkaConnectionError,
    RequestTimedOutError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from pydantic import SecretStr

from worker.kafka.refusals import (
    CERT_HAS_EXPIRED,
    CERT_NOT_YET_VALID,
    HOSTNAME_MISMATCH,
    IP_ADDRESS_MISMATCH,
    refusal_message,
)
from worker.settings import Settings

ADDRESS = "kafka-1.example:9094"
PASSWORD = "s3cret-Pa55"  # must never show in a message
UNTRUSTED = 19  # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def secured(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": "license-worker",
        "kafka_sasl_password": SecretStr(PASSWORD),
        "kafka_ssl_cafile": "/etc/kafka/ca.pem",
        **overrides,
    }
    # Constructed without validation: the CA file named in the messages need not exist here
    # (settings refuse an unreadable one at start-up).
    return Settings.model_construct(**values)


def certificate_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    """What the ssl module raises during the handshake (it sets these attributes itself)."""
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    error.verify_code = code
    error.verify_message = message
    return error


@pytest.mark.parametrize(
    "error",
    [
        SaslAuthenticationFailed("Authentication failed due to invalid credentials"),
        AuthenticationFailedError("bad credentials"),
    ],
)
def test_rejected_credentials_name_the_user_the_mechanism_and_the_variables(
    error: Exception,
) -> None:
    message = refusal_message(error, secured(), ADDRESS)
    assert message == (
        "Kafka at kafka-1.example:9094 rejected the SASL credentials for user "
        "'license-worker' (SCRAM-SHA-512): check KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
    )


def test_the_default_mechanism_is_named_when_none_is_configured() -> None:
    message = refusal_message(
        SaslAuthenticationFailed("invalid credentials"),
        secured(kafka_sasl_mechanism=None),
        ADDRESS,
    )
    assert message is not None
    assert "(SCRAM-SHA-512)" in message


def test_a_mechanism_the_listener_does_not_offer() -> None:
    message = refusal_message(
        UnsupportedSaslMechanismError("no"), secured(kafka_sasl_mechanism="SCRAM-SHA-256"), ADDRESS
    )
    assert message is not None
    assert "does not offer the SASL mechanism SCRAM-SHA-256" in message
    assert "KAFKA_SASL_MECHANISM" in message


def test_an_untrusted_certificate_names_the_ca_file() -> None:
    error = certificate_error(UNTRUSTED, "self-signed certificate in certificate chain")
    assert refusal_message(error, secured(), ADDRESS) == (
        "the TLS certificate of the broker at kafka-1.example:9094 is not trusted by "
        "KAFKA_SSL_CAFILE=/etc/kafka/ca.pem (self-signed certificate in certificate chain): "
        "set KAFKA_SSL_CAFILE to the CA that signed the broker's certificate"
    )


def test_without_a_ca_file_the_system_store_is_the_one_that_did_not_trust_it() -> None:
    error = certificate_error(20, "unable to get local issuer certificate")
    message = refusal_message(error, secured(kafka_ssl_cafile=None), ADDRESS)
    assert message is not None
    assert "not trusted by the system's CA certificates (KAFKA_SSL_CAFILE is not set)" in message


@pytest.mark.parametrize("code", [HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH])
def test_a_certificate_for_another_name(code: int) -> None:
    error = certificate_error(code, "Hostname mismatch, certificate is not valid for 'x'.")
    message = refusal_message(error, secured(), ADDRESS)
    assert message is not None
    assert message.startswith(
        "the TLS certificate of the broker at kafka-1.example:9094 is not valid for that name"
    )
    assert "KAFKA_BOOTSTRAP_SERVERS" in message


@pytest.mark.parametrize("code", [CERT_HAS_EXPIRED, CERT_NOT_YET_VALID])
def test_a_certificate_outside_its_validity(code: int) -> None:
    error = certificate_error(code, "certificate has expired")
    message = refusal_message(error, secured(), ADDRESS)
    assert message is not None
    assert "outside its validity period (certificate has expired)" in message


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connect call failed"),
        ConnectionResetError(),
        TimeoutError(),
        OSError(113, "No route to host"),
        KafkaConnectionError("Connection at kafka-1.example:9094 closed"),
        RequestTimedOutError(),
        # A TLS handshake cut short by a broker that is going down or still starting.
        ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),
        ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_a_broker_that_may_come_up_is_not_a_refusal(error: Exception) -> None:
    assert refusal_message(error, secured(), ADDRESS) is None


@pytest.mark.parametrize(
    "error",
    [
        SaslAuthenticationFailed(f"invalid credentials {PASSWORD}"),
        UnsupportedSaslMechanismError(),
        certificate_error(UNTRUSTED, "self-signed certificate in certificate chain"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_no_message_shows_the_password(error: Exception) -> None:
    message = refusal_message(error, secured(), ADDRESS)
    assert message is not None
    assert PASSWORD not in message
