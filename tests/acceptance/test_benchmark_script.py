"""`python -m scripts.bench --quick` against the real services: every measurement runs and
checks what it stored (the figures of a quick run mean nothing; that they exist and add up
does)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.support import REPO_ROOT, Services

pytestmark = pytest.mark.acceptance


@pytest.mark.timeout(600)
def test_the_quick_benchmark_measures_every_stage_and_the_drain(
    services: Services, tmp_path: Path
) -> None:
    output = tmp_path / "results.json"
    environment = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": services.kafka_bootstrap_servers,
        "DATABASE_URL": services.database_url,
        "BENCH_WORK_DIR": str(tmp_path / "work"),
    }
    run = subprocess.run(
        [sys.executable, "-m", "scripts.bench", "--quick", "--skip-latency", "--output", output],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = orjson.loads(output.read_bytes())
    assert set(results["shapes"]) == {"live", "backlog", "first_sighting", "steady"}
    for name, shape in results["shapes"].items():
        [only] = shape["runs"]
        assert only["read"]["messages"] == shape["messages"]
        assert only["drain"]["messages"] == shape["messages"]
        # The peer drains the same messages, after the worker in the first run.
        assert only["peer"]["messages"] == shape["messages"]
        assert only["order"] == ["worker", "peer"]
        assert only["ratio_to_peer"] > 0
        assert shape["median"]["peer_postgres_cpu_us_per_event"] >= 0
        if name == "steady":  # its fleet stored beforehand: not read, not timed, no stages
            assert (
                shape["stored_beforehand"]
                == shape["shape"]["customers"] * (shape["shape"]["devices_per_customer"])
            )
            assert "decode" not in only
            continue
        assert only["decode"]["messages"] == shape["messages"]
        assert only["write"]["messages"] == shape["messages"]  # and every device was stored
        for stage in ("read", "decode", "write", "drain"):
            assert only[stage]["events_per_second"] > 0
        assert 0 < only["cpu_ceiling_events_per_second"] < float("inf")
    assert "steady: (r) worker drain / peer" in run.stdout
    assert "(a4) CPU ceiling" in run.stdout
    assert (tmp_path / "work" / "bench-code" / "worker").is_dir()  # not the repository's .local
