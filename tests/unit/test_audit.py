"""scripts/audit.py: the decision behind `make audit`, with pip-audit's real report format."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from scripts import audit
from scripts.audit import Outcome, exit_code, judge, report

VULNERABLE_REPORT = {
    "dependencies": [
        {"name": "orjson", "version": "3.11.0", "vulns": []},
        {
            "name": "jinja2",
            "version": "2.4.1",
            "vulns": [
                {"id": "PYSEC-2014-8", "fix_versions": ["2.7.2"], "aliases": [], "description": ""},
                {"id": "GHSA-xxxx", "fix_versions": [], "aliases": [], "description": ""},
            ],
        },
    ],
    "fixes": [],
}
CLEAN_REPORT = {
    "dependencies": [
        {"name": "orjson", "version": "3.11.0", "vulns": []},
        {"name": "local-tool", "skip_reason": "Dependency not found on PyPI"},
    ],
    "fixes": [],
}
# What this machine gets from PyPI: the index answers, the per-version JSON API does not.
NOTHING_AUDITED = {
    "dependencies": [
        {"name": n, "skip_reason": f"Dependency not found on PyPI and could not be audited: {n}"}
        for n in ("orjson", "asyncpg")
    ],
    "fixes": [],
}


def test_a_known_vulnerability_fails() -> None:
    verdict = judge("pypi", VULNERABLE_REPORT)
    assert verdict.outcome is Outcome.VULNERABLE
    assert verdict.vulnerable == [
        "jinja2 2.4.1: PYSEC-2014-8 (fixed in 2.7.2), GHSA-xxxx (fixed in no release)"
    ]
    assert exit_code(verdict, required=False) == 1
    assert "AUDIT FAILED" in report(verdict, required=False)


def test_clean_passes_and_names_what_it_could_not_audit() -> None:
    verdict = judge("pypi", CLEAN_REPORT)
    assert (verdict.outcome, verdict.audited) == (Outcome.CLEAN, 1)
    assert exit_code(verdict, required=True) == 0
    assert "1 not audited" in report(verdict, required=False)


@pytest.mark.parametrize(
    "verdict",
    [judge("pypi", NOTHING_AUDITED), judge("osv", None, "timed out after 300 s")],
    ids=["every-dependency-skipped", "no-report"],
)
def test_no_answer_warns_loudly_and_fails_only_when_required(verdict: audit.Verdict) -> None:
    assert verdict.outcome is Outcome.UNAVAILABLE
    assert exit_code(verdict, required=False) == 0
    assert exit_code(verdict, required=True) == 2
    text = report(verdict, required=False)
    assert "WARNING: the dependency audit DID NOT RUN" in text
    assert "NOT checked" in text


def fake_pip_audit(tmp_path: Path, outputs: dict[str, Any]) -> list[str]:
    """A stand-in for `python -m pip_audit` that prints the report given for `-s SERVICE`."""
    script = tmp_path / "fake_pip_audit.py"
    script.write_text(
        "import json, sys, time\n"
        f"outputs = {json.dumps(outputs)!r}\n"
        "service = sys.argv[sys.argv.index('-s') + 1]\n"
        "answer = json.loads(outputs)[service]\n"
        "if answer == 'hang': time.sleep(30)\n"
        "elif answer == 'crash': sys.exit('ConnectionError: name resolution failed')\n"
        "else: print(json.dumps(answer))\n"
    )
    return [sys.executable, str(script)]


def test_falls_back_to_osv_when_pypi_audits_nothing(tmp_path: Path) -> None:
    command = fake_pip_audit(tmp_path, {"pypi": NOTHING_AUDITED, "osv": VULNERABLE_REPORT})
    verdict = audit.audit("requirements.txt", command)
    assert (verdict.outcome, verdict.service) == (Outcome.VULNERABLE, "osv")


def test_a_service_that_crashes_or_hangs_is_unavailable_not_fatal(tmp_path: Path) -> None:
    command = fake_pip_audit(tmp_path, {"pypi": "hang", "osv": "crash"})
    hung = audit.run_pip_audit("requirements.txt", "pypi", command, timeout=0.5)
    assert hung.outcome is Outcome.UNAVAILABLE
    assert "timed out" in hung.problem
    crashed = audit.run_pip_audit("requirements.txt", "osv", command)
    assert crashed.outcome is Outcome.UNAVAILABLE
    assert "name resolution failed" in crashed.problem


@pytest.mark.parametrize(
    ("outputs", "required", "expected"),
    [
        ({"pypi": VULNERABLE_REPORT, "osv": "crash"}, "", 1),
        ({"pypi": CLEAN_REPORT, "osv": "crash"}, "1", 0),
        ({"pypi": NOTHING_AUDITED, "osv": "crash"}, "", 0),
        ({"pypi": NOTHING_AUDITED, "osv": "crash"}, "1", 2),
    ],
    ids=["vulnerable", "clean", "unavailable", "unavailable-required"],
)
def test_main_exit_codes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    outputs: dict[str, Any],
    required: str,
    expected: int,
) -> None:
    monkeypatch.setenv("AUDIT_REQUIRED", required)
    assert audit.main(["requirements.txt"], fake_pip_audit(tmp_path, outputs)) == expected
