"""`worker.ingest.batch.decode_batch`: one consumed batch sorted into events and dead letters."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import Heartbeat, Install
from worker.ingest.batch import DecodedBatch, PartitionProgress, decode_batch
from worker.ingest.decoding import RejectReason
from worker.sim.fleet import SimulatedDevice, agent_event, encode

MAX_BYTES = 65_536
HEARTBEATS = "agent.heartbeat.v1"
LIFECYCLE = "agent.lifecycle.v1"
AT = datetime(2026, 11, 28, 17, 0, tzinfo=UTC)
DEVICE = SimulatedDevice("cust-042", "dev-7f3a", "alice@contoso.example", "business")


@dataclass(frozen=True)
class FakeRecord:
    topic: str
    partition: int
    offset: int
    timestamp: int  # milliseconds since the epoch, as aiokafka gives it
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] | None = field(default=())


def millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def good(topic: str, partition: int, offset: int, event_type: str = "heartbeat") -> FakeRecord:
    value = encode(agent_event(DEVICE, event_type, AT + timedelta(seconds=offset)))
    return FakeRecord(topic, partition, offset, millis(AT) + offset, DEVICE.key, value)


def bad(topic: str, partition: int, offset: int, value: bytes | None = b"{oops") -> FakeRecord:
    headers = (("trace", b"t-1"),)
    return FakeRecord(topic, partition, offset, millis(AT) + offset, b"k", value, headers)


def by_partition(*records: FakeRecord) -> dict[tuple[str, int], list[FakeRecord]]:
    grouped: dict[tuple[str, int], list[FakeRecord]] = {}
    for record in records:
        grouped.setdefault((record.topic, record.partition), []).append(record)
    return grouped


def test_empty_batch() -> None:
    batch = decode_batch({}, MAX_BYTES)
    assert batch == DecodedBatch()
    assert batch.size == 0


def test_partition_without_records_gets_no_offset() -> None:
    batch = decode_batch({(HEARTBEATS, 0): []}, MAX_BYTES)
    assert batch.next_offsets == {}
    assert batch.progress == []


def test_good_and_bad_records_are_split() -> None:
    records = [
        good(HEARTBEATS, 0, 10),
        bad(HEARTBEATS, 0, 11),
        good(HEARTBEATS, 0, 12),
        bad(HEARTBEATS, 0, 13, value=None),
    ]
    batch = decode_batch(by_partition(*records), MAX_BYTES)
    assert [decoded.record for decoded in batch.good] == [records[0], records[2]]
    assert all(isinstance(decoded.event, Heartbeat) for decoded in batch.good)
    assert [letter.offset for letter in batch.dead_letters] == [11, 13]
    assert [letter.rejection.reason for letter in batch.dead_letters] == [
        RejectReason.INVALID_JSON,
        RejectReason.EMPTY,
    ]
    assert batch.size == 4


def test_dead_letter_keeps_the_record_unchanged() -> None:
    record = bad(LIFECYCLE, 2, 99, value=b"\xff\xfe")
    (letter,) = decode_batch(by_partition(record), MAX_BYTES).dead_letters
    assert (letter.topic, letter.partition, letter.offset) == (LIFECYCLE, 2, 99)
    assert (letter.key, letter.value) == (b"k", b"\xff\xfe")
    assert list(letter.headers) == [("trace", b"t-1")]
    assert letter.rejection.reason is RejectReason.INVALID_UTF8


def test_record_without_headers_gives_an_empty_header_list() -> None:
    record = FakeRecord(HEARTBEATS, 0, 0, millis(AT), None, b"[]", headers=None)
    (letter,) = decode_batch(by_partition(record), MAX_BYTES).dead_letters
    assert list(letter.headers) == []
    assert letter.key is None


def test_max_message_bytes_is_applied() -> None:
    record = good(HEARTBEATS, 0, 0)
    assert record.value is not None
    batch = decode_batch(by_partition(record), len(record.value) - 1)
    assert [letter.rejection.reason for letter in batch.dead_letters] == [RejectReason.OVERSIZED]
    assert decode_batch(by_partition(record), len(record.value)).good


def test_next_offset_is_last_offset_plus_one_per_partition() -> None:
    records = [
        good(HEARTBEATS, 0, 5),
        good(HEARTBEATS, 0, 6),
        good(HEARTBEATS, 1, 40),
        bad(HEARTBEATS, 1, 41),  # the last record of a partition is bad: still consumed
        bad(LIFECYCLE, 0, 7),
        good(LIFECYCLE, 3, 0, "install"),
    ]
    batch = decode_batch(by_partition(*records), MAX_BYTES)
    assert batch.next_offsets == {
        (HEARTBEATS, 0): 7,
        (HEARTBEATS, 1): 42,
        (LIFECYCLE, 0): 8,
        (LIFECYCLE, 3): 1,
    }
    assert isinstance(batch.good[-1].event, Install)


def test_progress_per_partition_from_the_last_record() -> None:
    records = [good(HEARTBEATS, 0, 5), bad(HEARTBEATS, 0, 6), good(LIFECYCLE, 1, 0, "install")]
    batch = decode_batch(by_partition(*records), MAX_BYTES)
    assert batch.progress == [
        PartitionProgress(HEARTBEATS, 0, 7, AT + timedelta(milliseconds=6)),
        PartitionProgress(LIFECYCLE, 1, 1, AT),
    ]
    for progress in batch.progress:
        assert batch.next_offsets[(progress.topic, progress.partition)] == progress.next_offset
        assert progress.last_message_at.tzinfo is UTC


def test_progress_time_keeps_milliseconds() -> None:
    record = FakeRecord(HEARTBEATS, 0, 0, 1_764_349_200_123, None, b"null")
    (progress,) = decode_batch(by_partition(record), MAX_BYTES).progress
    assert progress.last_message_at == datetime(2025, 11, 28, 17, 0, 0, 123_000, tzinfo=UTC)


def test_mapping_keys_are_opaque() -> None:
    # aiokafka's getmany() keys by TopicPartition; the decoder reads topic and partition
    # from the records themselves.
    records = {object(): [good(HEARTBEATS, 4, 1)], object(): [good(HEARTBEATS, 5, 2)]}
    assert decode_batch(records, MAX_BYTES).next_offsets == {(HEARTBEATS, 4): 2, (HEARTBEATS, 5): 3}


PAYLOADS = [
    encode(agent_event(DEVICE, "heartbeat", AT)),
    encode(agent_event(DEVICE, "uninstall", AT)),
    b"",
    b"{",
    b"\xff",
    b"[]",
    orjson.dumps({**agent_event(DEVICE, "heartbeat", AT), "type": "reboot"}),
]


@settings(max_examples=100, deadline=None)
@given(
    partitions=st.dictionaries(
        st.tuples(st.sampled_from([HEARTBEATS, LIFECYCLE]), st.integers(0, 5)),
        st.tuples(
            st.integers(min_value=0, max_value=10**12),
            st.lists(
                st.tuples(st.integers(min_value=1, max_value=3), st.sampled_from(PAYLOADS)),
                min_size=1,
                max_size=8,
            ),
        ),
        max_size=6,
    )
)
def test_every_record_is_accounted_for(
    partitions: dict[tuple[str, int], tuple[int, list[tuple[int, bytes]]]],
) -> None:
    records: dict[tuple[str, int], list[FakeRecord]] = {}
    for (topic, partition), (first_offset, steps) in partitions.items():
        offset = first_offset
        records[(topic, partition)] = []
        for step, value in steps:
            offset += step
            records[(topic, partition)].append(
                FakeRecord(topic, partition, offset, millis(AT), None, value)
            )
    batch = decode_batch(records, MAX_BYTES)
    everything = [record for partition in records.values() for record in partition]
    assert batch.size == len(everything)
    taken = {(d.record.topic, d.record.partition, d.record.offset) for d in batch.good}
    left = {(letter.topic, letter.partition, letter.offset) for letter in batch.dead_letters}
    assert taken.isdisjoint(left)
    assert taken | left == {(r.topic, r.partition, r.offset) for r in everything}
    assert batch.next_offsets == {key: rs[-1].offset + 1 for key, rs in records.items()}
    assert len(batch.progress) == len(records)


def test_a_later_batch_extends_an_earlier_one() -> None:
    earlier = decode_batch(
        by_partition(good("hb", 0, 10), bad("hb", 0, 11), good("hb", 1, 5)), MAX_BYTES
    )
    later = decode_batch(by_partition(good("hb", 0, 12), bad("lc", 0, 3)), MAX_BYTES)
    earlier.extend(later)
    assert [item.record.offset for item in earlier.good] == [10, 5, 12]
    assert [letter.offset for letter in earlier.dead_letters] == [11, 3]
    assert earlier.next_offsets == {("hb", 0): 13, ("hb", 1): 6, ("lc", 0): 4}
    assert sorted((p.topic, p.partition, p.next_offset) for p in earlier.progress) == [
        ("hb", 0, 13),
        ("hb", 1, 6),
        ("lc", 0, 4),
    ]
    assert earlier.size == 5
