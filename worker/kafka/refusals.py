"""Tells a Kafka that refuses us from one that is not up yet.

Wrong SASL credentials, a SASL mechanism the listener does not offer, or a broker certificate
we do not trust are configuration mistakes: waiting does not fix them, so start-up stops at
once with a message naming the setting to check. Everything else (connection refused, reset,
timeouts) may be a broker that is still starting, and is waited for.
"""

from __future__ import annotations

import ssl

from aiokafka.errors import (
    AuthenticationFailedError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)

from worker.settings import Settings

# OpenSSL's X509_V_ERR_* codes, as ssl.SSLCertVerificationError.verify_code carries them.
CERT_NOT_YET_VALID = 9
CERT_HAS_EXPIRED = 10
HOSTNAME_MISMATCH = 62
IP_ADDRESS_MISMATCH = 64


class KafkaAccessRefused(Exception):
    """Kafka answered, but will not let us in with this configuration."""


def refusal_message(error: BaseException, settings: Settings, address: str) -> str | None:
    """What an operator must fix when `error` (from connecting to `address`) is a refusal;
    None when the error may go away by waiting."""
    if isinstance(error, SaslAuthenticationFailed | AuthenticationFailedError):
        return (
            f"Kafka at {address} rejected the SASL credentials for user "
            f"{settings.kafka_sasl_username!r} ({_mechanism(settings)}): "
            "check KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
        )
    if isinstance(error, UnsupportedSaslMechanismError):
        return (
            f"Kafka at {address} does not offer the SASL mechanism {_mechanism(settings)}: "
            "check KAFKA_SASL_MECHANISM and that KAFKA_BOOTSTRAP_SERVERS names the SASL listener"
        )
    if isinstance(error, ssl.SSLCertVerificationError):
        return _certificate_message(error, settings, address)
    return None


def _certificate_message(
    error: ssl.SSLCertVerificationError, settings: Settings, address: str
) -> str:
    detail = error.verify_message or str(error)
    code = error.verify_code
    if code in (HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH):
        return (
            f"the TLS certificate of the broker at {address} is not valid for that name "
            f"({detail}): put a name or address the certificate lists in "
            "KAFKA_BOOTSTRAP_SERVERS"
        )
    if code in (CERT_HAS_EXPIRED, CERT_NOT_YET_VALID):
        return (
            f"the TLS certificate of the broker at {address} is outside its validity period "
            f"({detail}): the broker needs a current certificate"
        )
    trusted_by = (
        f"KAFKA_SSL_CAFILE={settings.kafka_ssl_cafile}"
        if settings.kafka_ssl_cafile
        else "the system's CA certificates (KAFKA_SSL_CAFILE is not set)"
    )
    return (
        f"the TLS certificate of the broker at {address} is not trusted by {trusted_by} "
        f"({detail}): set KAFKA_SSL_CAFILE to the CA that signed the broker's certificate"
    )


def _mechanism(settings: Settings) -> str:
    # The same default kafka_client_options() applies.
    return settings.kafka_sasl_mechanism or "SCRAM-SHA-512"
