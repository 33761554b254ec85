#!/usr/bin/env bash
# The ingestion benchmark (docs/benchmarks.md). Starts its own Kafka and Postgres in
# .local/bench-services and stops them afterwards, unless KAFKA_BOOTSTRAP_SERVERS and
# DATABASE_URL already point at running ones. Arguments go to `python -m scripts.bench`:
#     bash scripts/bench.sh                 # full: 3 runs of each measurement
#     bash scripts/bench.sh --quick         # smoke version, about two minutes
#     bash scripts/bench.sh --shapes steady --devices 5000 --rounds 3 --runs 1  # smaller
#     bash scripts/bench.sh --git-ref HEAD  # the committed worker, not the working tree
#     bash scripts/bench.sh --sweep         # the sweeper over 1,000,000 devices (bench_sweep.py)
#     bash scripts/bench.sh --load-proof    # minutes under load, plotted (load_proof.py)
set -euo pipefail
cd "$(dirname "$0")/.."
export KAFKA_LIB_DIR="${KAFKA_LIB_DIR:-$PWD/.local/kafka-lib}"
python=.venv/bin/python
[[ -x "$python" ]] || { echo "no $python: run 'make setup' first" >&2; exit 1; }

if [[ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" || -z "${DATABASE_URL:-}" ]]; then
  state_dir="$PWD/.local/bench-services"
  trap 'bash deploy/local/services.sh stop --clean "$state_dir"' EXIT
  env_lines="$(bash deploy/local/services.sh start "$state_dir")"
  eval "$env_lines"
fi

if [[ "${1:-}" == "--sweep" ]]; then
  shift
  "$python" scripts/bench_sweep.py "$@"
elif [[ "${1:-}" == "--load-proof" ]]; then
  shift
  "$python" scripts/load_proof.py "$@"
else
  "$python" -m scripts.bench "$@"
fi
