"""Co-partitioning of the agent topics: both must have the same number of partitions, so
that a device's heartbeats and lifecycle events (keyed alike) land on the same partition
number and so on the same replica. Pure; `create-topics`, `check` and the worker's start
read the counts from the broker and ask `co_partitioned`."""

from __future__ import annotations

from collections.abc import Mapping

from worker.failures import OperatorError


class AgentTopicsNotCoPartitioned(OperatorError):
    """The agent topics have, or would have, different partition counts."""


def co_partitioned(counts: Mapping[str, int]) -> str | None:
    """None when every topic of `counts` (name -> partition count) has the same number of
    partitions, otherwise the problem in one line for the operator."""
    if len(set(counts.values())) <= 1:
        return None
    listed = ", ".join(f"{topic} has {count}" for topic, count in sorted(counts.items()))
    return (
        f"the agent topics must have the same number of partitions ({listed}); "
        "add partitions to the smaller one (kafka-topics --alter --partitions) before "
        "running the worker"
    )
