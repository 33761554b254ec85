#!/usr/bin/env bash
# The whole test suite: lint, dependency audit, unit, integration (real Kafka and Postgres), acceptance.
# Starts its own services in .local/test-services and stops them afterwards, unless
# KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL already point at running ones.
set -euo pipefail
cd "$(dirname "$0")/.."
export KAFKA_LIB_DIR="${KAFKA_LIB_DIR:-$PWD/.local/kafka-lib}"
UV="${UV:-python3 -m uv}"

$UV run --frozen ruff check .
$UV run --frozen ruff format --check .
$UV run --frozen mypy
# The migration linter (.squawk.toml says why each exclusion is there).
$UV run --frozen squawk --config .squawk.toml sql/migrations/*.sql
# Fails on a known vulnerability; only warns when no vulnerability service answers.
UV="$UV" bash scripts/audit.sh
bash scripts/test_tools.sh

# The export tests open reports in LibreOffice (installed here when SERVICES_AUTO_INSTALL=1).
bash deploy/local/services.sh require-libreoffice

if [[ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" || -z "${DATABASE_URL:-}" ]]; then
  state_dir="$PWD/.local/test-services"
  trap 'bash deploy/local/services.sh stop --clean "$state_dir"' EXIT
  env_lines="$(bash deploy/local/services.sh start "$state_dir")"
  eval "$env_lines"
  export LOCAL_SERVICES_DIR="$state_dir"
fi

status=0
$UV run --frozen pytest "$@" || status=$?
if [[ $status -eq 5 ]]; then
  echo "pytest collected no tests: that is a failure, not a pass" >&2
fi
exit $status
