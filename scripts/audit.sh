#!/usr/bin/env bash
# Known vulnerabilities in the locked dependencies (every group: dev tools run in CI too).
# Exports uv.lock as pinned requirements, then scripts/audit.py decides: see its docstring.
set -euo pipefail
cd "$(dirname "$0")/.."
UV="${UV:-python3 -m uv}"
mkdir -p .local
$UV export --frozen --format requirements-txt --no-hashes --no-emit-project --all-groups \
  --quiet --output-file .local/audit-requirements.txt
$UV run --frozen python scripts/audit.py .local/audit-requirements.txt
