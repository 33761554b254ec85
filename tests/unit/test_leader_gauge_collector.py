"""A leader-only gauge exports what was set, and nothing once withdrawn."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from worker.ops.leader_gauges import LeaderGauge


def test_set_withdraw_and_labels() -> None:
    registry = CollectorRegistry()
    gauge = LeaderGauge("x_total_things", "Things.", ["kind"], registry=registry)
    assert registry.get_sample_value("x_total_things", {"kind": "a"}) is None
    gauge.set_all([(("a",), 3), (("b",), 4)])
    assert registry.get_sample_value("x_total_things", {"kind": "a"}) == 3
    gauge.set_all([(("b",), 5)])
    assert registry.get_sample_value("x_total_things", {"kind": "a"}) is None
    assert registry.get_sample_value("x_total_things", {"kind": "b"}) == 5
    gauge.withdraw()
    assert registry.get_sample_value("x_total_things", {"kind": "b"}) is None
    with pytest.raises(ValueError, match="labels"):
        gauge.set(1)


def test_the_name_is_registered_while_withdrawn() -> None:
    registry = CollectorRegistry()
    LeaderGauge("x_plain", "Plain.", registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        LeaderGauge("x_plain", "Plain again.", registry=registry)
