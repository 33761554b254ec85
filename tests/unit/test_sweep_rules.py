"""The sweeper's pure decisions: ingestion watermark, outage guard, pseudonyms."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.licensing.sweep_rules import (
    CustomerRisk,
    StoredProgress,
    customers_to_hold,
    ingestion_watermark,
    pseudonym,
)

NOW = datetime(2026, 12, 30, tzinfo=UTC)
HOUR_AGO = NOW - timedelta(hours=1)
DAY_AGO = NOW - timedelta(days=1)


@pytest.mark.parametrize(
    ("end_offsets", "progress", "expected"),
    [
        pytest.param({}, {}, NOW, id="no-partitions"),
        pytest.param({("hb", 0): 0}, {}, NOW, id="empty-partition-never-consumed"),
        pytest.param(
            {("hb", 0): 10}, {("hb", 0): StoredProgress(10, DAY_AGO)}, NOW, id="caught-up-idle"
        ),
        pytest.param(
            {("hb", 0): 10},
            {("hb", 0): StoredProgress(7, HOUR_AGO)},
            HOUR_AGO,
            id="lagging-partition-gives-its-last-stored-time",
        ),
        pytest.param(
            {("hb", 0): 10, ("hb", 1): 5},
            {("hb", 0): StoredProgress(7, HOUR_AGO), ("hb", 1): StoredProgress(2, DAY_AGO)},
            DAY_AGO,
            id="laggiest-partition-wins",
        ),
        pytest.param(
            {("hb", 0): 10, ("hb", 1): 5},
            {("hb", 0): StoredProgress(10, DAY_AGO)},
            None,
            id="messages-never-stored-means-unknown",
        ),
        pytest.param(
            {("hb", 0): 10},
            {("hb", 0): StoredProgress(12, DAY_AGO)},
            NOW,
            id="stored-beyond-end-after-topic-recreated-counts-as-caught-up",
        ),
    ],
)
def test_ingestion_watermark(
    end_offsets: dict[tuple[str, int], int],
    progress: dict[tuple[str, int], StoredProgress],
    expected: datetime | None,
) -> None:
    assert ingestion_watermark(end_offsets, progress, NOW) == expected


@given(
    st.dictionaries(
        st.integers(0, 7),
        st.tuples(st.integers(0, 100), st.integers(0, 100), st.integers(0, 10_000)),
        max_size=8,
    )
)
def test_watermark_is_never_after_now(partitions: dict[int, tuple[int, int, int]]) -> None:
    ends = {("t", p): end for p, (end, _, _) in partitions.items()}
    progress = {
        ("t", p): StoredProgress(stored, NOW - timedelta(minutes=age))
        for p, (_, stored, age) in partitions.items()
    }
    watermark = ingestion_watermark(ends, progress, NOW)
    assert watermark is None or watermark <= NOW


@pytest.mark.parametrize(
    ("at_risk", "active", "held"),
    [
        pytest.param(2, 100, False, id="2-percent"),
        pytest.param(20, 100, False, id="exactly-the-share-is-allowed"),
        pytest.param(21, 100, True, id="over-the-share"),
        pytest.param(9, 9, False, id="small-customer-below-minimum"),
        pytest.param(10, 10, True, id="all-licenses-at-the-minimum"),
        pytest.param(10, 0, True, id="no-active-counted-as-one"),
    ],
)
def test_outage_guard(at_risk: int, active: int, held: bool) -> None:
    risk = CustomerRisk("c", at_risk, active)
    assert customers_to_hold([risk], max_share=0.2, min_releases=10) == ([risk] if held else [])


def test_pseudonym_is_keyed_stable_and_differs_per_release() -> None:
    first = pseudonym(b"key", "acme", "alice@acme.example", DAY_AGO)
    assert first == pseudonym(b"key", "acme", "alice@acme.example", DAY_AGO)
    assert first.startswith("purged-")
    assert "alice" not in first
    assert first != pseudonym(b"other key", "acme", "alice@acme.example", DAY_AGO)
    assert first != pseudonym(b"key", "acme", "alice@acme.example", NOW)
    assert first != pseudonym(b"key", "globex", "alice@acme.example", DAY_AGO)
