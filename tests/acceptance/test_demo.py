"""`make demo` (scripts/demo.sh) as a newcomer sees it, on the suite's running services:
it finishes, prints nothing that looks like a failure, shows the whole report, ends with a
reconciliation that finds no difference, and says where its data is (issue #16, part 7;
issue #18: the demo reconciles its own timeline)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support import Services

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# What a newcomer would read as something having gone wrong.
ALARMING = re.compile(
    r"Traceback|Exception|Error\b|ERROR|CRITICAL|\[error|\[critical|GroupCoordinator|"
    r"NotAvailable|NotLeader|refused|failed",
    re.IGNORECASE,
)


def test_the_demo_runs_cleanly_and_reconciles_its_timeline(services: Services) -> None:
    if services.state_dir is None:
        pytest.skip("the demo needs the local services script's state dir (LOCAL_SERVICES_DIR)")
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "LOG_FORMAT", "LOG_LEVEL")
    }
    environment["LOCAL_SERVICES_DIR"] = str(services.state_dir)
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh")],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    alarming = [line for line in output.splitlines() if ALARMING.search(line)]
    assert alarming == [], "\n".join(alarming)
    # The report of cust-00-0000 is shown whole: its 20 devices, and its users.
    report = output.split("the usage report of cust-00-0000", 1)[1].split("\n=== ", 1)[0]
    device_rows = [line for line in report.splitlines() if re.match(r"\s+device\s+dev-", line)]
    assert len(device_rows) == 20, report
    assert "written: .local/demo-usage.xlsx" in report
    # The last reconciliation covers the whole timeline and finds nothing.
    reconciled = output.split("billing's daily counts over the whole timeline", 1)[1]
    assert "no difference:" in reconciled
    assert "billing's view agrees with the database" in output
    # Where the data is.
    where = output.split("where the demo's data is", 1)[1]
    database = re.search(r"^database:\s+(postgresql://\S+/license_demo_\d+)$", where, re.M)
    assert database, where
    assert re.search(r"^topics:\s+agent\.heartbeat\.demo-\d+", where, re.M), where
