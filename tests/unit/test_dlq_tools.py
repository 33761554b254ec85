"""`worker.ingest.dlq_tools`: truncated dead letters are told apart, counted and never replayed."""

from __future__ import annotations

from types import SimpleNamespace

from worker.ingest.dlq_tools import DeadLetterRecord, inspect, split_truncated, to_record


def dead_letter(offset: int, *extra: tuple[str, bytes]) -> DeadLetterRecord:
    headers = [
        ("trace", b"1"),
        ("dlq.error.class", b"oversized"),
        ("dlq.source.topic", b"agent.heartbeat.v1"),
        ("dlq.source.partition", b"2"),
        ("dlq.source.offset", str(offset).encode()),
        *extra,
    ]
    record = SimpleNamespace(partition=0, offset=offset, key=b"k", value=b"v", headers=headers)
    return to_record(record)


TRUNCATION = (
    ("dlq.truncated", b"true"),
    ("dlq.original_size", b"2500000"),
    ("dlq.original_sha256", b"ab" * 32),
)


def test_a_truncated_dead_letter_is_recognised_by_its_header() -> None:
    truncated = dead_letter(7, *TRUNCATION)
    assert truncated.truncated
    assert truncated.source == "agent.heartbeat.v1[2]@7"
    assert truncated.original_headers == [("trace", b"1")]
    assert not dead_letter(8).truncated
    assert not dead_letter(9, ("dlq.truncated", b"false")).truncated


def test_split_keeps_order_and_sets_the_truncated_apart() -> None:
    records = [dead_letter(1), dead_letter(2, *TRUNCATION), dead_letter(3)]
    whole, truncated = split_truncated(records)
    assert [r.offset for r in whole] == [1, 3]
    assert [r.offset for r in truncated] == [2]


def test_inspect_counts_the_truncated() -> None:
    report = inspect([dead_letter(1), dead_letter(2, *TRUNCATION)], samples_per_reason=3)
    assert report.total == 2
    assert report.truncated == 1
    assert report.by_reason == {"oversized": 2}
