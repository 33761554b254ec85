#!/usr/bin/env bash
# Tools some tests need besides Kafka and Postgres, from Debian's packages:
#   promtool (package prometheus): checks and unit-tests the alert rules.
# With SERVICES_AUTO_INSTALL=1 (CI) and root, missing ones are installed; otherwise their
# tests skip locally with the reason, and fail under CI=true.
set -euo pipefail

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ "${SERVICES_AUTO_INSTALL:-0}" == 1 && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "test tools: installing ${missing[*]} with apt-get (SERVICES_AUTO_INSTALL=1)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
else
  echo "test tools: missing Debian packages ${missing[*]}; their tests are skipped" \
       "(apt-get install -y ${missing[*]}, or SERVICES_AUTO_INSTALL=1 as root)" >&2
fi
