"""A real Prometheus (Debian's `prometheus` package) scrapes a real `license-worker run`, loads
the shipped alert rules, and answers every expression of the Grafana dashboard and every
series the alerts read (issue #16 part 5).

What it proves: the dashboard and the alerts query series the worker really exports under the
names and labels they use, the rules load and evaluate without error, and the counters the
alerts take `increase()` of exist from the start (a counter first seen at 1 never alerts).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.license_support import admin_event, send_admin
from tests.support import (
    Services,
    WorkerProcess,
    free_port,
    http_get,
    make_settings,
    produce,
    required_tool,
    wait_until,
)
from worker.sim.fleet import SimulatedDevice, agent_event

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
SELECTOR = re.compile(r"\b(?:license_worker_[a-z_]+|up)(?:\{[^}]*\})?")


def prometheus_binary() -> str:
    return required_tool("prometheus", "prometheus")


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def alert_selectors() -> set[str]:
    """Each series selector an alert reads (`up{job=...}` included)."""
    return {match for rule in alert_rules() for match in SELECTOR.findall(str(rule["expr"]))}


class Prometheus:
    def __init__(self, directory: Path, target_port: int) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(MONITORING / "alerts.yaml")],
            "scrape_configs": [
                {
                    "job_name": "license-worker",
                    "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                }
            ],
        }
        self._config = directory / "prometheus.yml"
        self._config.write_text(yaml.safe_dump(config))
        self._data = directory / "prometheus-data"
        self._log = directory / "prometheus.log"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    prometheus_binary(),
                    f"--config.file={self._config}",
                    f"--storage.tsdb.path={self._data}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=log,
            )
        return self

    def __exit__(self, *_: object) -> None:
        assert self._process is not None
        self._process.terminate()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()

    def log_text(self) -> str:
        return self._log.read_text(errors="replace")

    def api(self, path: str, **parameters: str) -> Any:
        query = urllib.parse.urlencode(parameters)
        status, body = http_get(self.port, f"/api/v1/{path}?{query}")
        assert status == 200, body
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]

    def series(self, expression: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=expression)["result"]
        return result


def fleet_messages() -> Iterator[tuple[bytes, bytes]]:
    now = datetime.now(UTC)
    for index in range(5):
        device = SimulatedDevice(
            "prom-co", f"dev-{index}", f"user-{index}@prom.example", "business"
        )
        for event_type in ("install", "heartbeat"):
            event = agent_event(device, event_type, now)
            yield f"prom-co:dev-{index}".encode(), json.dumps(event).encode()


async def test_a_real_prometheus_answers_every_dashboard_and_alert_series(
    services: Services, database_url: str, topics: dict[str, str], tmp_path: Path
) -> None:
    prometheus_binary()
    port = free_port()
    settings = make_settings(
        services,
        database_url,
        topics,
        metrics_port=port,
        monitor_interval_seconds=0.5,
        sweep_interval_seconds=1.0,
        relay_poll_seconds=0.2,
    )
    now = datetime.now(UTC)
    await send_admin(
        services, settings, [admin_event("customer.created", "prom-co", now, name="Prom Co")]
    )
    await produce(services.kafka_bootstrap_servers, settings.heartbeat_topic, fleet_messages())
    await produce(
        services.kafka_bootstrap_servers, settings.lifecycle_topic, [(b"prom-co:x", b"not json")]
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        with Prometheus(tmp_path, port) as prometheus:
            expressions = dashboard_expressions()
            selectors = alert_selectors()

            async def everything_answers() -> bool:
                try:
                    return all(prometheus.series(e) for e in [*expressions, *selectors])
                except (AssertionError, OSError):
                    return False

            try:
                await wait_until(everything_answers, timeout=90, interval=1)
            except AssertionError:
                missing = [e for e in [*expressions, *selectors] if not _answers(prometheus, e)]
                pytest.fail(
                    f"no series for {missing}\n--- prometheus\n{prometheus.log_text()[-3000:]}"
                    f"\n--- worker\n{worker.log_text()[-3000:]}"
                )
            [up] = prometheus.series('up{job="license-worker"}')
            assert up["value"][1] == "1"
            rules = [
                rule
                for group in prometheus.api("rules")["groups"]
                for rule in group["rules"]
                if rule["type"] == "alerting"
            ]
            assert sorted(rule["name"] for rule in rules) == sorted(
                rule["alert"] for rule in alert_rules()
            )
            await asyncio.sleep(2)  # a few evaluations
            for rule in prometheus.api("rules")["groups"][0]["rules"]:
                assert rule["health"] == "ok", rule
            # A healthy worker pages for nothing.
            firing = [a for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"]
            assert firing == []
    finally:
        assert worker.terminate() == 0, worker.log_text()[-3000:]


def _answers(prometheus: Prometheus, expression: str) -> bool:
    try:
        return bool(prometheus.series(expression))
    except AssertionError:
        return False
