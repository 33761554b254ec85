"""The alert rules, proven with Prometheus's own tools (issue #16 part 4): `promtool check
rules`, and `promtool test rules` with a case where each alert fires and one where it does
not; every runbook link is absolute and lands on its section of docs/operations.md."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from scripts.alert_rules import DEFAULT_RUNBOOK_BASE, with_runbook_base
from tests.support import required_tool

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
ALERT_TESTS = MONITORING / "alerts.test.yaml"


def promtool() -> str:
    return required_tool("promtool", "prometheus")


def run_promtool(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *arguments],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def alert_names() -> list[str]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule["alert"] for group in document["groups"] for rule in group["rules"]]


def test_promtool_checks_the_rules() -> None:
    result = run_promtool("check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", ALERT_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_wrong_expectation_fails_promtool(tmp_path: Path) -> None:
    """The unit tests can fail: expecting a healthy fleet to page is caught."""
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    first = tests["tests"][0]
    first["alert_rule_test"] = [
        {"eval_time": "1m", "alertname": "LicenseWorkerIngestionLagging", "exp_alerts": [{}]}
    ]
    tests["tests"] = [first]
    tests["rule_files"] = [str(ALERTS)]
    broken = tmp_path / "broken.test.yaml"
    broken.write_text(yaml.safe_dump(tests))
    assert run_promtool("test", "rules", str(broken)).returncode != 0


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for name in alert_names():
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name} is never shown to fire"
        assert any(not case["exp_alerts"] for case in mine), f"{name} is never shown quiet"


def test_runbook_urls_are_absolute_and_land_on_their_section() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    document = yaml.safe_load(ALERTS.read_text())
    for rule in (rule for group in document["groups"] for rule in group["rules"]):
        url = rule["annotations"]["runbook_url"]
        assert url == f"{DEFAULT_RUNBOOK_BASE}#{rule['alert'].lower()}"
        assert f"\n### {rule['alert']}\n" in operations


def test_the_runbook_base_is_configurable() -> None:
    rendered = with_runbook_base(ALERTS.read_text(), "https://wiki.example/ops/lw/")
    urls = [
        rule["annotations"]["runbook_url"]
        for group in yaml.safe_load(rendered)["groups"]
        for rule in group["rules"]
    ]
    assert urls == [f"https://wiki.example/ops/lw#{name.lower()}" for name in alert_names()]
    with pytest.raises(ValueError, match="absolute"):
        with_runbook_base(ALERTS.read_text(), "docs/operations.md")
