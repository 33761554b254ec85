#!/usr/bin/env bash
# The newcomer's tour: local Kafka and Postgres, a small simulated fleet, the worker storing
# its signals, and a look at what reached Postgres. Services keep running afterwards
# (`make services-stop` stops them).
set -euo pipefail
cd "$(dirname "$0")/.."
export KAFKA_LIB_DIR="${KAFKA_LIB_DIR:-$PWD/.local/kafka-lib}"
cli=.venv/bin/license-worker

env_lines="$(bash deploy/local/services.sh start)"
eval "$env_lines"
echo "$env_lines"
export LOG_FORMAT="${LOG_FORMAT:-console}"

$cli migrate
$cli create-topics --partitions 4
$cli simulate --customers 3 --devices-per-customer 20 --rounds 5

echo "--- running the worker for 15 seconds (SIGTERM then stops it in order)"
$cli run &
worker=$!
sleep 15
kill -TERM "$worker"
wait "$worker"

echo "--- what Postgres holds now"
$cli status
echo "--- five devices"
psql "$DATABASE_URL" -c "SELECT customer_id, device_id, user_id, device_kind, protected, last_seen_at FROM devices ORDER BY customer_id, device_id LIMIT 5"
