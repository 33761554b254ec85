"""READ_DATABASE_URL (issue #15, part 6): where `report usage` and `reconcile` read, a
streaming replica; DATABASE_URL when it is unset."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote, urlsplit

import click
import pytest
from pydantic import SecretStr, ValidationError

from worker.cli_support import load_settings
from worker.settings import Settings

PRIMARY = "postgresql://license_worker:primary-pw@primary:5432/license"
REPLICA = "postgresql://license_reporter:replica-pw@replica:5432/license"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(name, raising=False)


def write_secret(directory: Path, text: str) -> Path:
    path = directory / "read-secret"
    path.write_text(text, encoding="utf-8")
    return path


def test_unset_the_reports_read_from_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", PRIMARY)
    settings = Settings()
    assert settings.read_database_url is None
    assert settings.report_database_url() == PRIMARY
    assert settings.report_database_variable() == "DATABASE_URL"


def test_set_the_reports_read_from_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", PRIMARY)
    monkeypatch.setenv("READ_DATABASE_URL", REPLICA)
    settings = Settings()
    assert isinstance(settings.read_database_url, SecretStr)
    assert "replica-pw" not in repr(settings)
    assert settings.report_database_url() == REPLICA
    assert settings.report_database_variable() == "READ_DATABASE_URL"
    assert settings.database_url.get_secret_value() == PRIMARY  # writers keep the primary


def test_an_empty_variable_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("READ_DATABASE_URL", "")
    monkeypatch.setenv("READ_DATABASE_PASSWORD_FILE", "")
    settings = Settings()
    assert settings.read_database_url is None
    assert settings.read_database_password_file is None


@pytest.mark.parametrize(
    "url", ["replica-host", "mysql://u:secret-pw@replica/license", "http://replica"]
)
def test_a_url_that_is_not_postgres_is_refused_without_quoting_it(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("READ_DATABASE_URL", url)
    with pytest.raises(ValidationError) as raised:
        Settings()
    assert raised.value.errors()[0]["loc"] == ("read_database_url",)
    assert url not in str(raised.value)
    with pytest.raises(click.ClickException) as refused:
        load_settings()
    assert "READ_DATABASE_URL: must be a postgresql://" in refused.value.message
    assert "secret-pw" not in refused.value.message


def test_masked_hides_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("READ_DATABASE_URL", REPLICA + "?sslmode=verify-full&password=q-pw")
    shown = Settings().masked()
    assert shown["read_database_url"] == (
        "postgresql://license_reporter:***@replica:5432/license?sslmode=verify-full&password=***"
    )
    assert "replica-pw" not in json.dumps(shown)
    assert "q-pw" not in json.dumps(shown)


def test_masked_shows_none_when_unset() -> None:
    assert Settings().masked()["read_database_url"] is None


def test_its_password_from_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DATABASE_URL", PRIMARY)
    monkeypatch.setenv("READ_DATABASE_URL", "postgresql://license_reporter@replica/license")
    monkeypatch.setenv("READ_DATABASE_PASSWORD_FILE", str(write_secret(tmp_path, "r/p@ss\n")))
    settings = Settings()
    url = settings.report_database_url()
    assert unquote(urlsplit(url).password or "") == "r/p@ss"
    assert urlsplit(url).hostname == "replica"
    assert settings.database_url.get_secret_value() == PRIMARY
    assert "r%2Fp%40ss" not in json.dumps(settings.masked())


def test_a_password_file_without_the_url_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("READ_DATABASE_PASSWORD_FILE", str(write_secret(tmp_path, "pw")))
    with pytest.raises(ValidationError, match="READ_DATABASE_URL is not set"):
        Settings()


def test_a_password_in_the_url_and_a_file_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("READ_DATABASE_URL", REPLICA)
    monkeypatch.setenv("READ_DATABASE_PASSWORD_FILE", str(write_secret(tmp_path, "pw")))
    with pytest.raises(ValidationError, match="give the password one way only"):
        Settings()


def test_an_unreadable_password_file_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("READ_DATABASE_URL", "postgresql://license_reporter@replica/license")
    monkeypatch.setenv("READ_DATABASE_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValidationError, match="READ_DATABASE_PASSWORD_FILE: cannot read"):
        Settings()
