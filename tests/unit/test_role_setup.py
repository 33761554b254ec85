"""`worker.db.roles`: role names and the SCRAM verifiers `create-roles` stores."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from worker.db.roles import DatabaseRoles, scram_sha256_verifier
from worker.db.sql_files import role_setup_queries

# RFC 7677, section 3: user "user", password "pencil".
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_AUTH_MESSAGE = (
    b"n=user,r=rOprNGfwEbeRWgbNEkqO,"
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
)
RFC_CLIENT_PROOF = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_SIGNATURE = base64.b64decode("6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")


def verifier_parts(verifier: str) -> tuple[int, bytes, bytes, bytes]:
    mechanism, rest = verifier.split("$", 1)
    assert mechanism == "SCRAM-SHA-256"
    iteration_salt, keys = rest.split("$")
    iterations, salt = iteration_salt.split(":")
    stored_key, server_key = keys.split(":")
    return (
        int(iterations),
        base64.b64decode(salt),
        base64.b64decode(stored_key),
        base64.b64decode(server_key),
    )


def test_the_verifier_matches_the_rfc_7677_exchange() -> None:
    """A server holding this verifier accepts the RFC's client proof and answers with the
    RFC's server signature."""
    iterations, salt, stored_key, server_key = verifier_parts(
        scram_sha256_verifier("pencil", salt=RFC_SALT)
    )
    assert (iterations, salt) == (4096, RFC_SALT)
    client_signature = hmac.new(stored_key, RFC_AUTH_MESSAGE, "sha256").digest()
    client_key = bytes(a ^ b for a, b in zip(RFC_CLIENT_PROOF, client_signature, strict=True))
    assert hashlib.sha256(client_key).digest() == stored_key
    assert hmac.new(server_key, RFC_AUTH_MESSAGE, "sha256").digest() == RFC_SERVER_SIGNATURE


def test_every_verifier_has_its_own_salt() -> None:
    first, second = scram_sha256_verifier("same"), scram_sha256_verifier("same")
    assert first != second
    assert verifier_parts(first)[1] != verifier_parts(second)[1]
    assert "same" not in first


@pytest.mark.parametrize(("password", "problem"), [("", "empty"), ("pässword", "ASCII")])
def test_unusable_passwords_are_refused(password: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        scram_sha256_verifier(password)


def test_default_role_names() -> None:
    assert DatabaseRoles() == DatabaseRoles("license_owner", "license_worker", "license_reporter")


@pytest.mark.parametrize(
    ("owner", "worker", "problem"),
    [
        ("Owner", "worker", "not a role name"),
        ("owner", "wörker", "not a role name"),
        ("owner", "", "not a role name"),
        ("o" * 64, "worker", "not a role name"),
        ("a;drop", "worker", "not a role name"),
        ("same", "same", "three roles"),
        ("owner", "license_reporter", "three roles"),
    ],
)
def test_bad_role_names_are_refused(owner: str, worker: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        DatabaseRoles(owner, worker)


def test_the_role_set_up_runs_in_the_documented_order() -> None:
    assert list(role_setup_queries()) == [
        "choose_roles",
        "create_roles",
        "grant_database_access",
        "grant_schema_access",
        "grant_table_access",
    ]
