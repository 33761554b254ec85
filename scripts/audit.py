"""Audits the locked dependencies for known vulnerabilities: `make audit`.

    python scripts/audit.py REQUIREMENTS   (exported from uv.lock by `make audit`)

pip-audit asks a vulnerability service about each pinned version: PyPI's JSON API first,
then OSV. Outcomes and exit codes:
- a known vulnerability in any dependency: the list, exit 1 (CI fails);
- every dependency audited (or some, with the skipped ones named), none vulnerable: exit 0;
- no service answered (unreachable, timed out, every dependency "could not be audited"): a
  loud WARNING that the audit did not run, exit 0, or exit 2 when AUDIT_REQUIRED=1. A
  machine without a route to any vulnerability service would otherwise fail every build
  forever; a pipeline that has one sets AUDIT_REQUIRED=1 (docs/security.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

SERVICES = ("pypi", "osv")
PIP_AUDIT = (sys.executable, "-m", "pip_audit")
CONNECT_TIMEOUT_SECONDS = 15
RUN_TIMEOUT_SECONDS = float(os.environ.get("AUDIT_TIMEOUT_SECONDS", "300"))


class Outcome(StrEnum):
    VULNERABLE = "vulnerable"
    CLEAN = "clean"
    UNAVAILABLE = "unavailable"


@dataclass
class Verdict:
    outcome: Outcome
    service: str
    audited: int = 0
    vulnerable: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    problem: str = ""


def judge(service: str, report: dict[str, Any] | None, problem: str = "") -> Verdict:
    """Pure: pip-audit's JSON report (None if it produced none) to a verdict."""
    if report is None:
        return Verdict(Outcome.UNAVAILABLE, service, problem=problem or "no report")
    dependencies = report.get("dependencies", [])
    skipped = [f"{d['name']}: {d['skip_reason']}" for d in dependencies if d.get("skip_reason")]
    vulnerable = [
        f"{d['name']} {d.get('version', '?')}: "
        + ", ".join(
            f"{v['id']} (fixed in {', '.join(v.get('fix_versions') or ['no release'])})"
            for v in d["vulns"]
        )
        for d in dependencies
        if d.get("vulns")
    ]
    audited = len(dependencies) - len(skipped)
    if vulnerable:
        return Verdict(Outcome.VULNERABLE, service, audited, vulnerable, skipped)
    if audited == 0:
        return Verdict(Outcome.UNAVAILABLE, service, 0, [], skipped, "no dependency audited")
    return Verdict(Outcome.CLEAN, service, audited, [], skipped)


def run_pip_audit(
    requirements: str,
    service: str,
    command: Sequence[str] = PIP_AUDIT,
    timeout: float = RUN_TIMEOUT_SECONDS,
) -> Verdict:
    arguments = [*command, "-r", requirements, "--no-deps", "--disable-pip", "--format", "json"]
    arguments += ["--progress-spinner", "off", "-s", service]
    arguments += ["--timeout", str(CONNECT_TIMEOUT_SECONDS)]
    try:
        result = subprocess.run(
            arguments, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return judge(service, None, f"timed out after {timeout:.0f} s")
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return judge(service, None, f"exit {result.returncode}: {last_line[:300]}")
    return judge(service, report)


def audit(requirements: str, command: Sequence[str] = PIP_AUDIT) -> Verdict:
    """The first service that answers decides."""
    verdict = Verdict(Outcome.UNAVAILABLE, "none", problem="no service tried")
    for service in SERVICES:
        verdict = run_pip_audit(requirements, service, command)
        if verdict.outcome is not Outcome.UNAVAILABLE:
            return verdict
        print(f"audit: {service} did not answer ({verdict.problem})", file=sys.stderr)
    return verdict


def exit_code(verdict: Verdict, required: bool) -> int:
    if verdict.outcome is Outcome.VULNERABLE:
        return 1
    if verdict.outcome is Outcome.UNAVAILABLE:
        return 2 if required else 0
    return 0


def report(verdict: Verdict, required: bool) -> str:
    if verdict.outcome is Outcome.VULNERABLE:
        lines = [f"AUDIT FAILED: known vulnerabilities ({verdict.service}):"]
        lines += [f"  {line}" for line in verdict.vulnerable]
        return "\n".join(lines)
    if verdict.outcome is Outcome.UNAVAILABLE:
        banner = "!" * 78
        consequence = (
            "AUDIT_REQUIRED=1: failing." if required else "Not failing (AUDIT_REQUIRED unset)."
        )
        return "\n".join(
            [
                banner,
                "WARNING: the dependency audit DID NOT RUN: no vulnerability service answered",
                f"  (PyPI JSON API, OSV; last problem: {verdict.problem}).",
                "  The locked dependencies were NOT checked for known vulnerabilities.",
                f"  {consequence}",
                banner,
            ]
        )
    lines = [f"audit: {verdict.audited} dependencies, no known vulnerability ({verdict.service})"]
    if verdict.skipped:
        lines.append(f"audit: WARNING: {len(verdict.skipped)} not audited:")
        lines += [f"  {line}" for line in verdict.skipped]
    return "\n".join(lines)


def main(argv: Sequence[str], command: Sequence[str] = PIP_AUDIT) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 64
    required = os.environ.get("AUDIT_REQUIRED", "") == "1"
    verdict = audit(argv[0], command)
    print(report(verdict, required))
    return exit_code(verdict, required)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
