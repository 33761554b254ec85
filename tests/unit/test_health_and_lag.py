"""Liveness, readiness, their HTTP answers, and the lag / stuck-partition arithmetic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from worker.licensing.sweep_rules import StoredProgress
from worker.ops import metrics  # noqa: F401 - registers the worker's metrics
from worker.ops.health import Liveness, Readiness, health_app
from worker.ops.lag import PartitionLag, Watch, partition_lag, stuck_partitions, watch_partitions

NOW = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("end", "stored", "expected"),
    [
        pytest.param(0, None, PartitionLag(0, 0.0), id="empty-never-stored"),
        pytest.param(5, None, PartitionLag(5, float("inf")), id="messages-never-stored"),
        pytest.param(
            10, StoredProgress(10, NOW - timedelta(hours=3)), PartitionLag(0, 0.0), id="caught-up"
        ),
        pytest.param(
            10, StoredProgress(7, NOW - timedelta(seconds=90)), PartitionLag(3, 90.0), id="behind"
        ),
        pytest.param(
            10, StoredProgress(12, NOW), PartitionLag(0, 0.0), id="stored-beyond-end-is-zero"
        ),
    ],
)
def test_partition_lag(end: int, stored: StoredProgress | None, expected: PartitionLag) -> None:
    assert partition_lag(end, stored, NOW) == expected


def test_a_partition_is_stuck_only_with_messages_waiting_and_no_progress_for_the_bound() -> None:
    first = watch_partitions({}, {("t", 0): 5, ("t", 1): 5, ("t", 2): 5}, now=100.0)
    later = watch_partitions(first, {("t", 0): 5, ("t", 1): 9, ("t", 2): 5}, now=160.0)
    assert later[("t", 0)] == Watch(5, 100.0)
    assert later[("t", 1)] == Watch(9, 160.0)
    lag = {
        ("t", 0): PartitionLag(3, 60.0),
        ("t", 1): PartitionLag(3, 1.0),
        ("t", 2): PartitionLag(0, 0.0),
    }
    assert stuck_partitions(later, lag, now=160.0, bound_seconds=60) == [("t", 0)]
    assert stuck_partitions(later, lag, now=159.0, bound_seconds=60) == []


def test_liveness_names_silent_tasks_and_stuck_partitions() -> None:
    liveness = Liveness()
    liveness.register("ingest", 10)
    liveness.register("relay", 100)
    assert liveness.problems() == []
    beat_at = liveness._beats["ingest"]
    assert liveness.problems(now=beat_at + 11) == ["task ingest silent for 11 s"]
    liveness.stuck_partitions = ["agent.heartbeat.v1[3]"]
    assert liveness.problems() == ["partition agent.heartbeat.v1[3] stuck"]


def call(app: Any, path: str) -> tuple[str, dict[str, Any] | str]:
    answer: dict[str, str] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        answer["status"] = status

    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, start_response))
    if path in ("/livez", "/readyz"):
        return answer["status"], orjson.loads(body)
    return answer["status"], body.decode()


def test_http_answers() -> None:
    liveness, readiness = Liveness(), Readiness()
    app = health_app(liveness, readiness)
    assert call(app, "/livez") == ("200 OK", {"ok": True, "problems": []})
    assert call(app, "/readyz") == (
        "503 Service Unavailable",
        {"ok": False, "problems": ["not probed yet"]},
    )
    readiness.set("kafka", answered=True)
    readiness.set("postgres", answered=False)
    assert call(app, "/readyz")[1] == {"ok": False, "problems": ["postgres unreachable"]}
    readiness.set("postgres", answered=True)
    assert call(app, "/readyz")[0] == "200 OK"
    status, text = call(app, "/metrics")
    assert status == "200 OK"
    assert "license_worker_events_total" in str(text)
