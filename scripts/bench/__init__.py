"""The ingestion benchmark (`python -m scripts.bench`, see `scripts.bench.cli` and
docs/benchmarks.md), one module a concern:

- `code_under_test`: the snapshot of the worker's code and the worker names the bench uses;
- `shapes`: the fleets' workloads (live, backlog);
- `scenario`: fresh topics and databases per measurement, and producing into them;
- `stages`: the stage limits, (a) read, (a2) read + decode + fold, (a3) write, (a4) CPU;
- `meters`: peak RSS and CPU use of the processes involved;
- `workers`: the real worker as a subprocess and (b) its drain;
- `latency`: (d) produce-to-committed latency at a fixed rate;
- `report`: medians, verdicts and the printed table;
- `cli`: arguments, and the runs of every measurement into the JSON result.
"""

from __future__ import annotations

import sys
import time


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
