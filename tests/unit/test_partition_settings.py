"""The retention settings of the partitioned tables (migration 0015): documented defaults,
at least two months (the database function refuses less too), and which table each
governs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from worker.licensing.partitions import retention_months
from worker.settings import Settings

VARIABLES = (
    "LICENSE_HISTORY_RETENTION_MONTHS",
    "LIFECYCLE_EVENTS_RETENTION_MONTHS",
    "USAGE_SNAPSHOTS_RETENTION_MONTHS",
    "PARTITION_MONTHS_AHEAD",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_defaults_follow_billing_and_audit() -> None:
    settings = Settings()
    assert retention_months(settings) == {
        "license_history": 25,
        "device_lifecycle_events": 13,
        "usage_snapshots": 25,
    }
    assert settings.partition_months_ahead == 3


def test_each_table_reads_its_own_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LICENSE_HISTORY_RETENTION_MONTHS", "36")
    monkeypatch.setenv("LIFECYCLE_EVENTS_RETENTION_MONTHS", "6")
    monkeypatch.setenv("USAGE_SNAPSHOTS_RETENTION_MONTHS", "24")
    assert retention_months(Settings()) == {
        "license_history": 36,
        "device_lifecycle_events": 6,
        "usage_snapshots": 24,
    }


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        *((name, value) for name in VARIABLES[:3] for value in ("1", "0", "-25", "1201", "x")),
        ("PARTITION_MONTHS_AHEAD", "0"),
        ("PARTITION_MONTHS_AHEAD", "25"),
    ],
)
def test_short_retentions_and_far_horizons_are_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError):
        Settings()
