"""The pure co-partitioning rule shared by `create-topics`, `check` and the worker's start."""

from __future__ import annotations

from worker.kafka.partitions import co_partitioned


def test_topics_with_the_same_partition_count_are_co_partitioned() -> None:
    assert co_partitioned({"agent.heartbeat.v1": 24, "agent.lifecycle.v1": 24}) is None


def test_one_topic_or_none_is_no_problem() -> None:
    assert co_partitioned({"agent.heartbeat.v1": 4}) is None
    assert co_partitioned({}) is None


def test_different_counts_are_named_in_one_line() -> None:
    problem = co_partitioned({"agent.lifecycle.v1": 24, "agent.heartbeat.v1": 4})
    assert problem is not None
    assert "\n" not in problem
    assert "agent.heartbeat.v1 has 4, agent.lifecycle.v1 has 24" in problem
