"""Gauges only the replica holding a lock knows (the sweeper's license totals, the relay's
outbox backlog). Exported while this replica leads and has measured them; withdrawn, not left
stale, once it stops leading: a replica that lost the sweeper lock must not go on reporting
yesterday's totals, nor one that lost the relay lock an outbox age that `max()` would alert on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class LeaderGauge(Collector):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        if registry is not None:
            registry.register(self)

    def set(self, value: float, *labels: str) -> None:
        if len(labels) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}, got {labels}")
        self._values[labels] = value

    def set_all(self, values: Iterable[tuple[tuple[str, ...], float]]) -> None:
        """Replaces every labelled value at once (a label set not given is withdrawn)."""
        self._values = {}
        for labels, value in values:
            self.set(value, *labels)

    def withdraw(self) -> None:
        self._values = {}

    def value(self, *labels: str) -> float | None:
        return self._values.get(labels)

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for labels, value in sorted(self._values.items()):
            family.add_metric(list(labels), value)
        yield family
