#!/usr/bin/env bash
# The newcomer's tour: local Kafka and Postgres, a small simulated fleet, the worker storing
# its signals and allocating licenses, then a simulated timeline: the sweeper at day 31
# releases the licenses, at day 121 purges the users' personal data, we read the license
# events billing receives and reconcile them, day by day, with the usage snapshots and the
# as-of reports. Services keep running afterwards (`make services-stop`).
set -euo pipefail
cd "$(dirname "$0")/.."
export KAFKA_LIB_DIR="${KAFKA_LIB_DIR:-$PWD/.local/kafka-lib}"
cli=.venv/bin/license-worker
section() { printf '\n=== %s\n' "$*"; }

# LOCAL_SERVICES_DIR: run on services already started there (the test suite does).
env_lines="$(bash deploy/local/services.sh start ${LOCAL_SERVICES_DIR:+"$LOCAL_SERVICES_DIR"})"
eval "$env_lines"
echo "$env_lines"
export LOG_FORMAT="${LOG_FORMAT:-console}" LOG_LEVEL="${LOG_LEVEL:-warning}"
# A fresh database per demo, so the timeline starts from nothing.
demo_db="license_demo_$(date +%s)"
psql "$DATABASE_URL" -qc "CREATE DATABASE $demo_db"
export DATABASE_URL="${DATABASE_URL%/*}/$demo_db"
suffix="demo-$(date +%s)"
export HEARTBEAT_TOPIC="agent.heartbeat.$suffix" LIFECYCLE_TOPIC="agent.lifecycle.$suffix"
export LICENSE_EVENTS_TOPIC="license.events.$suffix" DLQ_TOPIC="agent.events.dlq.$suffix"
export ADMIN_TOPIC="tenant.admin.$suffix"

demo_start="$(date -u +%Y-%m-%dT%H:%M:%SZ)"  # day 0: reconcile covers the timeline from here

section "day 0: migrate, create topics, a simulated fleet (3 customers x 20 devices)"
echo "(the console gives every customer Core, and cust-00-0000's admins group a 14-day Core+ trial)"
$cli migrate
$cli create-topics --partitions 4

section "day 0: the worker runs for 15 seconds (SIGTERM stops it in order)"
echo "(the console creates the customers first: the worker refuses signals for customers it"
echo " does not know, UNKNOWN_CUSTOMERS=refuse; then the agents install and heartbeat)"
$cli simulate --customers 3 --console --no-agents
echo "(the local services have no TLS and the demo connects as Postgres's superuser: the worker"
echo " says so in three security.weak_setting warnings; production settings: docs/security.md)"
$cli run &
worker=$!
for _ in $(seq 60); do
  known="$(psql "$DATABASE_URL" -tAc "SELECT count(*) FROM customers")"
  [ "$known" -ge 3 ] && break
  sleep 0.5
done
[ "$known" -ge 3 ] || { echo "the console's customers were not applied in 30 s" >&2; kill -TERM "$worker"; exit 1; }
$cli simulate --customers 3 --devices-per-customer 20 --rounds 5
sleep 15
kill -TERM "$worker"
wait "$worker"
$cli status
psql "$DATABASE_URL" -c "SELECT customer_id, subject_type, basis, package, count(*) AS licenses FROM licenses WHERE active GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4"

section "day 0: the usage report of cust-00-0000, and its Excel export"
$cli report usage --customer cust-00-0000
mkdir -p .local
$cli report usage --customer cust-00-0000 --format xlsx --output .local/demo-usage.xlsx
echo "written: .local/demo-usage.xlsx"

day() { date -u -d "+$1 days" +%Y-%m-%dT%H:%M:%SZ; }
section "day 31: every device has been silent for 30 days (and the Core+ trial has ended)"
$cli sweep --once --now "$(day 31)"
# The relay inside `run` would publish the allocations once settled (ALLOCATION_SETTLE_SECONDS
# after their decision) and the releases within a second; no worker runs here.
$cli publish-events --now "$(day 31)"
section "day 121: 90 days after the releases"
$cli sweep --once --now "$(day 121)"
psql "$DATABASE_URL" -c "SELECT subject_type, active, release_reason, purged_at IS NOT NULL AS purged, count(*) FROM licenses GROUP BY 1, 2, 3, 4 ORDER BY 1"
psql "$DATABASE_URL" -c "SELECT user_id, email FROM users ORDER BY user_id LIMIT 3"

section "what billing receives (license.events topic; type, subject, reason)"
$cli publish-events --now "$(day 121)"
$cli license-events | python3 -c '
import collections, json, sys
events = [json.loads(line) for line in sys.stdin]
for event in events[:3] + events[-3:]:
    print(json.dumps(event))
counts = collections.Counter((e["type"], e["reason"]) for e in events)
for (kind, reason), n in sorted(counts.items()):
    print(f"{n:5d}  {kind:20s} {reason}")'

section "does billing's view agree with the database? (every subject's last event)"
$cli reconcile

section "billing's daily counts over the whole timeline, against the usage snapshots and the as-of reports"
echo "(the topic folded as billing folds it: de-duplicated by event_id, intervals by sequence;"
echo " compared per customer, day and package; exit 8 if anything differs)"
$cli reconcile --from "$demo_start" --to "$(day 121)" --bill

section "where the demo's data is (query it, or run any command against it)"
cat <<EOF
database:  $DATABASE_URL
topics:    $HEARTBEAT_TOPIC, $LIFECYCLE_TOPIC (agents), $ADMIN_TOPIC (console),
           $LICENSE_EVENTS_TOPIC (billing), $DLQ_TOPIC (dead letters)
e.g.       psql "$DATABASE_URL" -c "SELECT * FROM license_history ORDER BY id LIMIT 10"
           DATABASE_URL="$DATABASE_URL" LICENSE_EVENTS_TOPIC="$LICENSE_EVENTS_TOPIC" \\
             KAFKA_BOOTSTRAP_SERVERS="$KAFKA_BOOTSTRAP_SERVERS" $cli license-events
services:  still running; make services-stop stops them
EOF
