"""`python -m scripts.bench`: the ingestion benchmark (see `scripts.bench.cli`)."""

from __future__ import annotations

from scripts.bench.cli import main

main()
