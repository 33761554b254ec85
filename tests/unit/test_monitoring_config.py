"""The dashboard and the alert rules in deploy/monitoring only query metrics the worker
exports, and every alert has a runbook in docs/operations.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

from worker.ops import metrics  # noqa: F401 - registers the worker's metrics

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
METRIC_NAME = re.compile(r"\blicense_worker_[a-z_]+\b")
SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}


def exported_names() -> set[str]:
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("license_worker_"):
            names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def alert_rules() -> list[dict[str, object]]:
    document = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_every_alert_queries_exported_metrics() -> None:
    exported = exported_names()
    rules = alert_rules()
    assert len(rules) >= 5
    for rule in rules:
        used = set(METRIC_NAME.findall(str(rule["expr"])))
        if 'up{job="license-worker"}' in str(rule["expr"]):
            continue  # the scrape itself: the worker down or absent
        assert used, f"{rule['alert']} queries no worker metric"
        assert used <= exported, f"{rule['alert']} queries unknown {used - exported}"


def test_every_dashboard_panel_queries_exported_metrics() -> None:
    exported = exported_names()
    expressions = dashboard_expressions()
    assert len(expressions) >= 10
    for expression in expressions:
        used = set(METRIC_NAME.findall(expression))
        assert used, f"panel expression {expression!r} queries no worker metric"
        assert used <= exported, f"{expression!r} queries unknown {used - exported}"


def test_every_alert_has_a_runbook_section() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    headings = {
        line.removeprefix("### ").strip()
        for line in operations.splitlines()
        if line.startswith("### ")
    }
    for rule in alert_rules():
        assert rule["alert"] in headings, f"no runbook section '### {rule['alert']}'"
        runbook = str(rule["annotations"]["runbook_url"])  # type: ignore[index]
        assert runbook.endswith("#" + str(rule["alert"]).lower())
