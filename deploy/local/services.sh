#!/usr/bin/env bash
# Local Kafka (KRaft, single node) + PostgreSQL (+ PgBouncer) for development and tests,
# without Docker.  Kafka runs from jars fetched from Maven Central
# (deploy/local/pom.xml) with the installed JDK; Postgres runs from the
# distribution's server binaries.  Everything lives under one STATE_DIR and
# listens on 127.0.0.1 only, on free ports picked at first start.
#
# Usage: deploy/local/services.sh COMMAND [--clean] [STATE_DIR]
#
#   start          start Kafka, Postgres and PgBouncer (idempotent: if they
#                  already run, only reprint the env); prints the env lines
#   stop [--clean] stop them (SIGTERM, then SIGKILL after 30 s for Kafka;
#                  pg_ctl stop -m fast); --clean also deletes STATE_DIR
#   clean          same as stop --clean
#   env            print the env lines if Kafka and Postgres are running
#   status         show what is running (stderr), exit 0 if Kafka and
#                  Postgres run
#   stop-postgres / start-postgres   stop/restart only Postgres, same port
#   stop-kafka    / start-kafka      stop/restart only Kafka, same ports
#   env-secure     print the env lines of the secured (SASL_SSL) listener
#   require-libreoffice
#                  LibreOffice is no service, but the report tests open the
#                  exports in it as an MSP would: installs
#                  libreoffice-calc-nogui when soffice is missing and
#                  SERVICES_AUTO_INSTALL=1; otherwise only says it is missing
#                  (the test then skips, or fails under CI=true)
#
# STATE_DIR defaults to <repo>/.local/services.  stdout carries only the
# env lines, so this works:
#     env_lines="$(deploy/local/services.sh start)" && eval "$env_lines"
# which exports
#     KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:<port>
#     DATABASE_URL=postgresql://postgres@127.0.0.1:<port>/license
#     PSEUDONYM_KEY_FILE=STATE_DIR/pseudonym.key
#     PGBOUNCER_DATABASE_URL=postgresql://postgres@127.0.0.1:<port>/license
#                          (only while PgBouncer runs; see below)
# (the same lines are written to STATE_DIR/env).  All progress messages go
# to stderr.
#
# PgBouncer (Debian's `pgbouncer` package) runs in front of that Postgres in
# pool_mode=transaction, on a port of its own, for the tests that run the
# worker through it (docs/scaling.md, "PgBouncer").  Every database of the
# local Postgres is reachable through it under its own name.  Its client
# authentication mirrors Postgres': the superuser `postgres` is trusted,
# every other role gives its SCRAM password, which PgBouncer checks against
# the verifier it reads from pg_shadow as `postgres` (auth_user, auth_query)
# and passes on to Postgres (SCRAM pass-through): roles created later, by
# `license-worker create-roles` or the tests, need no userlist entry.  When
# the pgbouncer binary is missing it is installed with
# SERVICES_AUTO_INSTALL=1, otherwise only reported: Kafka and Postgres start
# anyway, and PGBOUNCER_DATABASE_URL is not printed.
#
# Beside the PLAINTEXT listener the broker always has a SASL_SSL listener on
# a second free port: TLS with a throw-away CA and broker certificate
# (generated with openssl under STATE_DIR/kafka/tls, valid for localhost and
# 127.0.0.1, renewed when it expires within a day) and SCRAM-SHA-512 with one
# user, `license-worker`, whose random password is kept in
# STATE_DIR/kafka/sasl-password and registered with Kafka's own tools
# (StorageTool --add-scram when the storage is formatted; kafka-configs for a
# state dir formatted by an older version of this script).  The settings for
# it are written to STATE_DIR/env-secure (never to stdout), in the same
# `export NAME=value` form:
#     KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:<secure port>
#     KAFKA_SECURITY_PROTOCOL=SASL_SSL   KAFKA_SASL_MECHANISM=SCRAM-SHA-512
#     KAFKA_SASL_USERNAME=license-worker KAFKA_SASL_PASSWORD=<password>
#     KAFKA_SSL_CAFILE=STATE_DIR/kafka/tls/ca.pem
# The controller and inter-broker traffic stay PLAINTEXT on 127.0.0.1.
#
# Environment overrides:
#   KAFKA_LIB_DIR        jar cache (default STATE_DIR/../kafka-lib); filled
#                        with mvn unless it already has kafka_2.13-*.jar
#   KAFKA_HEAP_OPTS      default "-Xms256m -Xmx512m"
#   KAFKA_START_TIMEOUT  seconds to wait for "Kafka Server started" (90)
#   PG_BIN               Postgres server binaries (default: newest
#                        /usr/lib/postgresql/*/bin, preferring 15)
#   PGBOUNCER_BIN        the pgbouncer binary (default: on PATH, or
#                        /usr/sbin/pgbouncer)
#   SERVICES_AUTO_INSTALL=1
#                        when running as root with apt-get, install missing
#                        JDK/Maven/Postgres/PgBouncer packages (and, for
#                        require-libreoffice, LibreOffice) instead of failing.
#                        Off by default: a script that silently changes the
#                        system's packages is a surprise, and the Debian
#                        postgresql package may also create/start its own
#                        cluster on port 5432 (and pgbouncer its own
#                        service on 6432, unused here).  CI on a fresh machine can
#                        set it.
#
# As root, Postgres and PgBouncer run as the `postgres` user (initdb and
# pgbouncer refuse root); every directory above STATE_DIR must then be
# traversable by that user.
#
# Postgres accepts TLS and plain connections on the same port.  Its
# certificate comes from a throw-away CA made with openssl at first start:
# clients verify it with ?sslmode=verify-full&sslrootcert=STATE_DIR/pg-tls/ca.crt
# (host 127.0.0.1 or localhost).  The superuser `postgres` needs no password;
# every other role (e.g. those of `license-worker create-roles`) logs in with
# its SCRAM password.
set -euo pipefail
umask 022

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
POM="$SCRIPT_DIR/pom.xml"
LOG4J_CONFIG="$SCRIPT_DIR/log4j2.yaml"
PG_DB=license
PG_SUPERUSER=postgres

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '8,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# ---------------------------------------------------------------- arguments
[ $# -ge 1 ] || usage
CMD="$1"; shift
CLEAN=0
STATE_ARG=""
for a in "$@"; do
  case "$a" in
    --clean) CLEAN=1 ;;
    -h|--help) usage ;;
    -*) die "unknown option: $a" ;;
    *) [ -z "$STATE_ARG" ] || die "only one STATE_DIR may be given"; STATE_ARG="$a" ;;
  esac
done
STATE_DIR="${STATE_ARG:-$REPO_ROOT/.local/services}"
case "$STATE_DIR" in /*) ;; *) STATE_DIR="$PWD/$STATE_DIR" ;; esac
STATE_DIR="${STATE_DIR%/}"
[ -n "$STATE_DIR" ] && [ "$STATE_DIR" != "/" ] || die "refusing STATE_DIR '/'"

KAFKA_DIR="$STATE_DIR/kafka"
KAFKA_DATA="$KAFKA_DIR/data"
KAFKA_PROPS="$KAFKA_DIR/server.properties"
KAFKA_PID="$KAFKA_DIR/kafka.pid"
KAFKA_LOG="$KAFKA_DIR/server.log"
KAFKA_OUT="$KAFKA_DIR/kafka.out"
TLS_DIR="$KAFKA_DIR/tls"
SASL_PASSWORD_FILE="$KAFKA_DIR/sasl-password"
PSEUDONYM_KEY_FILE="$STATE_DIR/pseudonym.key"
SCRAM_MARKER="$KAFKA_DIR/scram-user-created"   # the user exists in the cluster metadata
SASL_USER=license-worker
SASL_MECHANISM=SCRAM-SHA-512
PG_DIR="$STATE_DIR/pg"
PG_DATA="$PG_DIR/data"
PG_LOG="$PG_DIR/postgres.log"
PG_TLS_DIR="$STATE_DIR/pg-tls"
PGB_DIR="$STATE_DIR/pgbouncer"
PGB_CONFIG="$PGB_DIR/pgbouncer.ini"
PGB_PID="$PGB_DIR/pgbouncer.pid"
PGB_LOG="$PGB_DIR/pgbouncer.log"
PORTS_FILE="$STATE_DIR/ports"
ENV_FILE="$STATE_DIR/env"
SECURE_ENV_FILE="$STATE_DIR/env-secure"
MARKER="$STATE_DIR/.local-services"   # lets `clean` know the dir is ours

KAFKA_PORT="" CONTROLLER_PORT="" PG_PORT="" KAFKA_SECURE_PORT="" PGBOUNCER_PORT=""

# ------------------------------------------------------------- small helpers
is_root() { [ "$(id -u)" -eq 0 ]; }

# Run a Postgres server program as the postgres user when we are root.
# Run from PG_DIR so the (unprivileged) user never sits in an unreadable cwd.
as_pg() {
  if is_root; then
    (cd "$PG_DIR" && runuser -u postgres -- "$@")
  else
    (cd "$PG_DIR" && "$@")
  fi
}

# Echo N free TCP ports on 127.0.0.1 (distinct; all sockets held at once).
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

# True if PORT can be bound on 127.0.0.1 (SO_REUSEADDR like the servers use).
port_free() {
  python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
}

load_ports() {
  [ -f "$PORTS_FILE" ] || return 1
  # shellcheck disable=SC1090
  . "$PORTS_FILE"
  # KAFKA_SECURE_PORT and PGBOUNCER_PORT may be missing: state dirs from
  # before the secured listener or PgBouncer get one in choose_ports.
  [ -n "$KAFKA_PORT" ] && [ -n "$CONTROLLER_PORT" ] && [ -n "$PG_PORT" ]
}

save_ports() {
  printf 'KAFKA_PORT=%s\nCONTROLLER_PORT=%s\nPG_PORT=%s\nKAFKA_SECURE_PORT=%s\nPGBOUNCER_PORT=%s\n' \
    "$KAFKA_PORT" "$CONTROLLER_PORT" "$PG_PORT" "$KAFKA_SECURE_PORT" "$PGBOUNCER_PORT" \
    >"$PORTS_FILE.tmp"
  mv "$PORTS_FILE.tmp" "$PORTS_FILE"
}

env_lines() {
  printf 'export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:%s\n' "$KAFKA_PORT"
  printf 'export DATABASE_URL=postgresql://%s@127.0.0.1:%s/%s\n' "$PG_SUPERUSER" "$PG_PORT" "$PG_DB"
  printf 'export PSEUDONYM_KEY_FILE=%s\n' "$PSEUDONYM_KEY_FILE"
  if pgbouncer_running; then
    printf 'export PGBOUNCER_DATABASE_URL=postgresql://%s@127.0.0.1:%s/%s\n' \
      "$PG_SUPERUSER" "$PGBOUNCER_PORT" "$PG_DB"
  fi
}

# The worker's pseudonym key (docs/security.md): 32 random bytes as hexadecimal text, made
# once per state dir and readable by its owner only.
ensure_pseudonym_key() {
  [ -s "$PSEUDONYM_KEY_FILE" ] && return
  (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' >"$PSEUDONYM_KEY_FILE.tmp")
  mv "$PSEUDONYM_KEY_FILE.tmp" "$PSEUDONYM_KEY_FILE"
}

secure_env_lines() {
  printf 'export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:%s\n' "$KAFKA_SECURE_PORT"
  printf 'export KAFKA_SECURITY_PROTOCOL=SASL_SSL\n'
  printf 'export KAFKA_SASL_MECHANISM=%s\n' "$SASL_MECHANISM"
  printf 'export KAFKA_SASL_USERNAME=%s\n' "$SASL_USER"
  printf 'export KAFKA_SASL_PASSWORD=%s\n' "$(cat "$SASL_PASSWORD_FILE")"
  printf 'export KAFKA_SSL_CAFILE=%s\n' "$TLS_DIR/ca.pem"
}

# Serialise concurrent invocations on the same STATE_DIR (e.g. several test
# processes calling `start` at once).  Daemons are started with fd 9 closed
# so they never hold the lock.
take_lock() {
  mkdir -p "$STATE_DIR"
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$STATE_DIR/.lock"
    flock 9
  fi
}

# ------------------------------------------------------------- prerequisites
apt_install() {
  if [ "${SERVICES_AUTO_INSTALL:-0}" = 1 ] && is_root && command -v apt-get >/dev/null 2>&1; then
    log "installing $* with apt-get (SERVICES_AUTO_INSTALL=1)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
    return 0
  fi
  return 1
}

require_java_maven() {
  local missing=()
  command -v java >/dev/null 2>&1 || missing+=(java)
  if ! command -v mvn >/dev/null 2>&1 && ! kafka_lib_cached; then missing+=(mvn); fi
  if [ ${#missing[@]} -gt 0 ]; then
    apt_install openjdk-17-jre-headless maven ||
      die "missing: ${missing[*]}. Install a JDK >= 17 and Maven, e.g.:
    apt-get install -y openjdk-17-jre-headless maven
(or rerun as root with SERVICES_AUTO_INSTALL=1)"
  fi
  local ver
  ver="$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java\.specification\.version = //p')"
  case "$ver" in
    1.*|9|10|11|12|13|14|15|16)
      die "Kafka 4.x needs Java >= 17, found java $ver ($(command -v java)).
    apt-get install -y openjdk-17-jre-headless" ;;
  esac
}

find_pg_bin() {
  if [ -n "${PG_BIN:-}" ]; then
    [ -x "$PG_BIN/initdb" ] || die "PG_BIN=$PG_BIN has no initdb"
    return
  fi
  if [ -x /usr/lib/postgresql/15/bin/initdb ]; then
    PG_BIN=/usr/lib/postgresql/15/bin; return
  fi
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  if [ -n "$d" ] && [ -x "$d/initdb" ]; then PG_BIN="$d"; return; fi
  if command -v initdb >/dev/null 2>&1; then PG_BIN="$(dirname "$(command -v initdb)")"; return; fi
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
    PG_BIN="$(pg_config --bindir)"; return
  fi
  PG_BIN=""
}

require_postgres() {
  find_pg_bin
  if [ -z "$PG_BIN" ]; then
    if apt_install postgresql-15; then find_pg_bin; fi
    [ -n "$PG_BIN" ] || die "PostgreSQL server binaries (initdb, pg_ctl) not found.
Install them, e.g.:
    apt-get install -y postgresql-15      (Debian bookworm; or: postgresql)
or point PG_BIN at the directory holding initdb/pg_ctl
(or rerun as root with SERVICES_AUTO_INSTALL=1)"
  fi
  if is_root; then
    id postgres >/dev/null 2>&1 ||
      die "running as root but there is no 'postgres' user to run the server as (initdb refuses root)"
    command -v runuser >/dev/null 2>&1 || die "runuser (util-linux) is needed to run Postgres as the postgres user"
  fi
}

require_libreoffice() {
  command -v soffice >/dev/null 2>&1 && return 0
  if apt_install --no-install-recommends libreoffice-calc-nogui; then
    command -v soffice >/dev/null 2>&1 || die "libreoffice-calc-nogui is installed but soffice is not on PATH"
    return 0
  fi
  log "LibreOffice (soffice) not found: the report tests' spreadsheet check will skip (and fail under CI=true).
    apt-get install -y --no-install-recommends libreoffice-calc-nogui
(or rerun as root with SERVICES_AUTO_INSTALL=1)"
}

kafka_lib_dir() { printf '%s\n' "${KAFKA_LIB_DIR:-$(dirname "$STATE_DIR")/kafka-lib}"; }
kafka_lib_cached() { compgen -G "$(kafka_lib_dir)/kafka_2.13-*.jar" >/dev/null; }

fetch_kafka_lib() {
  KAFKA_LIB="$(kafka_lib_dir)"
  if kafka_lib_cached; then return; fi
  command -v mvn >/dev/null 2>&1 || die "mvn not found; apt-get install -y maven"
  log "fetching Kafka jars into $KAFKA_LIB (mvn, Maven Central)"
  mkdir -p "$KAFKA_LIB"
  # Copy into a temp dir first so an interrupted download is not mistaken for
  # a complete cache.
  local tmp="$KAFKA_LIB.tmp.$$"
  rm -rf "$tmp"
  if ! mvn -B -q -Dstyle.color=never -f "$POM" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$tmp" >"$tmp.log" 2>&1 </dev/null; then
    cat "$tmp.log" >&2
    rm -rf "$tmp" "$tmp.log"
    die "mvn could not fetch the Kafka jars (output above; Maven Central must be reachable)"
  fi
  rm -f "$tmp.log"
  mv "$tmp"/*.jar "$KAFKA_LIB"/
  rm -rf "$tmp"
  kafka_lib_cached || die "no kafka_2.13-*.jar in $KAFKA_LIB after mvn"
}

# -------------------------------------------------------------------- Kafka
kafka_pid() {
  # Prints the broker pid if it is alive and really is our broker.
  [ -f "$KAFKA_PID" ] || return 1
  local pid
  pid="$(cat "$KAFKA_PID" 2>/dev/null || true)"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "kafka.Kafka $KAFKA_PROPS" || return 1
  printf '%s\n' "$pid"
}
kafka_running() { kafka_pid >/dev/null; }

write_kafka_config() {
  mkdir -p "$KAFKA_DIR"
  cat >"$KAFKA_PROPS.tmp" <<EOF
# Generated by deploy/local/services.sh -- rewritten on every start.
# Single-node KRaft broker+controller for local development and tests.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,SASL_SSL://127.0.0.1:$KAFKA_SECURE_PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,SASL_SSL://127.0.0.1:$KAFKA_SECURE_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL
log.dirs=$KAFKA_DATA

# The secured listener: TLS (PEM keystore: key, certificate, CA) and
# SCRAM-SHA-512 users stored in the cluster metadata.  No client
# certificates, no authorizer: any authenticated user may do anything.
sasl.enabled.mechanisms=$SASL_MECHANISM
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$TLS_DIR/broker-keystore.pem
listener.name.sasl_ssl.ssl.client.auth=none

# One replica of everything.
num.partitions=4
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
auto.create.topics.enable=true
delete.topic.enable=true

# Fast and small: no initial rebalance delay, few threads, small cleaner
# buffer so -Xmx512m is plenty.
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
log.cleaner.threads=1
log.cleaner.dedupe.buffer.size=16777216
log.segment.bytes=67108864
offsets.topic.segment.bytes=16777216
transaction.state.log.segment.bytes=16777216
log.retention.hours=168
EOF
  mv "$KAFKA_PROPS.tmp" "$KAFKA_PROPS"
}

format_kafka_storage() {
  [ -f "$KAFKA_DATA/meta.properties" ] && return 0
  local cluster_id
  cluster_id="$(python3 -c '
import base64, uuid
while True:
    cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not cid.startswith("-"):
        print(cid)
        break
')"
  log "formatting Kafka storage (cluster id $cluster_id)"
  # With a static controller.quorum.voters, Kafka 4.1's StorageTool needs no
  # --standalone/--initial-controllers flag (those are for dynamic quorums
  # and require controller.quorum.voters to be absent).
  # (No log4j2 config here: log4j's default prints only errors, to stderr.)
  # The SCRAM user goes into the bootstrap metadata: no extra JVM run later.
  java -cp "$KAFKA_LIB/*" kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_PROPS" \
      --add-scram "$SASL_MECHANISM=[name=$SASL_USER,password=$(cat "$SASL_PASSWORD_FILE")]" \
      >&2 9>&- || die "kafka StorageTool format failed"
  touch "$SCRAM_MARKER"
}

# A throw-away CA and a broker certificate signed by it, for localhost and
# 127.0.0.1.  Made when missing or when the broker certificate expires within
# a day (a state dir may live for years on a laptop).
ensure_tls_material() {
  if [ -s "$TLS_DIR/broker-keystore.pem" ] && [ -s "$TLS_DIR/ca.pem" ] &&
     openssl x509 -checkend 86400 -noout -in "$TLS_DIR/broker-cert.pem" >/dev/null 2>&1; then
    return
  fi
  command -v openssl >/dev/null 2>&1 || die "openssl is needed to make the test TLS certificates"
  log "generating a throw-away CA and broker certificate in $TLS_DIR"
  rm -rf "$TLS_DIR"
  mkdir -p "$TLS_DIR"
  chmod 700 "$TLS_DIR"
  (
    cd "$TLS_DIR"
    umask 077
    openssl req -x509 -newkey rsa:2048 -nodes -days 825 -sha256 \
        -subj "/CN=license-telemetry local test CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout ca-key.pem -out ca.pem
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
        -keyout broker-key.pem -out broker.csr
    printf '%s\n' "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth" \
        "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        "subjectKeyIdentifier=hash" \
        "authorityKeyIdentifier=keyid,issuer" >broker.ext
    openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca-key.pem -set_serial "0x$(openssl rand -hex 16)" \
        -days 825 -sha256 -extfile broker.ext -out broker-cert.pem
    # Kafka's PEM keystore: the unencrypted PKCS#8 key, then the chain.
    cat broker-key.pem broker-cert.pem ca.pem >broker-keystore.pem
    rm -f broker.csr broker.ext
  ) >"$KAFKA_DIR/tls.log" 2>&1 || { cat "$KAFKA_DIR/tls.log" >&2; die "openssl could not make the TLS certificates"; }
}

ensure_sasl_password() {
  [ -s "$SASL_PASSWORD_FILE" ] && return
  # A new password means the cluster does not know it yet.
  rm -f "$SCRAM_MARKER"
  (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(18))' >"$SASL_PASSWORD_FILE")
}

# For a state dir formatted before the secured listener existed: register the
# SCRAM user with kafka-configs (ConfigCommand) over the PLAINTEXT listener.
ensure_scram_user() {
  [ -f "$SCRAM_MARKER" ] && return
  log "creating the SCRAM user $SASL_USER (kafka-configs)"
  java -cp "$KAFKA_LIB/*" kafka.admin.ConfigCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" \
      --alter --entity-type users --entity-name "$SASL_USER" \
      --add-config "$SASL_MECHANISM=[password=$(cat "$SASL_PASSWORD_FILE")]" \
      </dev/null >&2 9>&- || die "kafka-configs could not create the SCRAM user $SASL_USER"
  touch "$SCRAM_MARKER"
}

# True when the running broker was started with the secured listener (a broker
# started by an older version of this script has none until it restarts).
secure_listener_running() {
  [ -n "$KAFKA_SECURE_PORT" ] && kafka_running &&
    grep -qF "SASL_SSL://127.0.0.1:$KAFKA_SECURE_PORT," "$KAFKA_PROPS" 2>/dev/null &&
    [ -f "$SCRAM_MARKER" ] && [ -s "$SASL_PASSWORD_FILE" ]
}

write_secure_env() {
  if secure_listener_running; then
    (umask 077 && secure_env_lines >"$SECURE_ENV_FILE.tmp")
    mv "$SECURE_ENV_FILE.tmp" "$SECURE_ENV_FILE"
  else
    rm -f "$SECURE_ENV_FILE"
    if kafka_running; then
      log "the running Kafka has no SASL_SSL listener (started by an older version of this script); restart it (stop-kafka, start-kafka) to get one"
    fi
  fi
}

start_kafka() {
  if kafka_running; then log "Kafka already running (pid $(kafka_pid)) on 127.0.0.1:$KAFKA_PORT"; return; fi
  mkdir -p "$KAFKA_DIR"
  ensure_tls_material
  ensure_sasl_password
  write_kafka_config
  format_kafka_storage
  [ -f "$KAFKA_LOG" ] && mv -f "$KAFKA_LOG" "$KAFKA_LOG.prev"
  log "starting Kafka on 127.0.0.1:$KAFKA_PORT (controller $CONTROLLER_PORT)"
  # setsid: own session, so Ctrl-C in the caller's terminal doesn't hit it.
  # All fds point at files (never the caller's pipes): `$(services.sh start)`
  # must not hang waiting for the daemon's stdout to close.
  # shellcheck disable=SC2086
  nohup setsid java ${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m} \
      -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
      -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$LOG4J_CONFIG" \
      -Dkafka.logs.dir="$KAFKA_DIR" \
      -cp "$KAFKA_LIB/*" \
      kafka.Kafka "$KAFKA_PROPS" \
      </dev/null >"$KAFKA_OUT" 2>&1 9>&- &
  local pid=$!
  echo "$pid" >"$KAFKA_PID"

  local timeout="${KAFKA_START_TIMEOUT:-90}" waited=0
  while :; do
    if grep -q 'Kafka Server started' "$KAFKA_LOG" 2>/dev/null; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      kafka_fail "Kafka exited during startup"
    fi
    if [ "$waited" -ge $((timeout * 5)) ]; then
      kafka_fail "Kafka did not log 'Kafka Server started' within ${timeout}s" "$pid"
    fi
    sleep 0.2
    waited=$((waited + 1))
  done
  log "Kafka started (pid $pid); SASL_SSL on 127.0.0.1:$KAFKA_SECURE_PORT"
  ensure_scram_user
}

kafka_fail() {
  local msg="$1" pid="${2:-}"
  {
    echo "----- last 50 lines of $KAFKA_LOG -----"
    tail -n 50 "$KAFKA_LOG" 2>/dev/null || echo "(no log)"
    if [ -s "$KAFKA_OUT" ]; then
      echo "----- last 20 lines of $KAFKA_OUT -----"
      tail -n 20 "$KAFKA_OUT"
    fi
    echo "-----"
  } >&2
  if [ -n "$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$KAFKA_PID"
  die "$msg"
}

stop_kafka() {
  local pid
  if ! pid="$(kafka_pid)"; then
    rm -f "$KAFKA_PID"
    log "Kafka not running"
    return
  fi
  log "stopping Kafka (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local i
  for i in $(seq 1 150); do   # 30 s
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "Kafka did not stop within 30s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$KAFKA_PID"
  log "Kafka stopped"
}

# ----------------------------------------------------------------- Postgres
pg_running() {
  [ -f "$PG_DATA/PG_VERSION" ] || return 1
  [ -n "${PG_BIN:-}" ] || find_pg_bin
  [ -n "$PG_BIN" ] || return 1
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1
}

init_postgres() {
  mkdir -p "$PG_DIR"
  if is_root; then
    chown postgres: "$PG_DIR"
    chmod 700 "$PG_DIR"
    chmod a+x "$STATE_DIR"
    runuser -u postgres -- test -w "$PG_DIR" 2>/dev/null || die \
      "user 'postgres' cannot reach $PG_DIR: every parent directory must be traversable (o+x) by it; choose another STATE_DIR"
  fi
  [ -f "$PG_DATA/PG_VERSION" ] && return 0
  rm -rf "$PG_DATA"
  log "initdb $PG_DATA"
  as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U "$PG_SUPERUSER" --auth=trust \
      --encoding=UTF8 --no-locale >"$PG_DIR/initdb.log" 2>&1 9>&- || {
    cat "$PG_DIR/initdb.log" >&2
    die "initdb failed"
  }
}

# A CA and a server certificate for 127.0.0.1/localhost, made once per
# STATE_DIR.  The CA's key is deleted once it has signed: nothing else is ever
# signed with it.  Postgres insists that its key is private to its user.
make_postgres_tls() {
  [ -s "$PG_TLS_DIR/server.crt" ] && [ -s "$PG_TLS_DIR/server.key" ] && [ -s "$PG_TLS_DIR/ca.crt" ] && return 0
  command -v openssl >/dev/null 2>&1 || die "openssl is needed for Postgres' TLS certificate (apt-get install -y openssl)"
  log "making a throw-away CA and server certificate in $PG_TLS_DIR"
  rm -rf "$PG_TLS_DIR"
  mkdir -p "$PG_TLS_DIR"
  local tmp="$PG_TLS_DIR/tmp"
  mkdir -p "$tmp"
  (
    umask 077
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
        -keyout "$tmp/ca.key" -out "$PG_TLS_DIR/ca.crt" -days 3650 \
        -subj "/CN=license-telemetry local test CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
        -keyout "$PG_TLS_DIR/server.key" -out "$tmp/server.csr" -subj "/CN=localhost"
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$tmp/ext"
    openssl x509 -req -in "$tmp/server.csr" -CA "$PG_TLS_DIR/ca.crt" -CAkey "$tmp/ca.key" \
        -CAcreateserial -out "$PG_TLS_DIR/server.crt" -days 3650 -extfile "$tmp/ext"
  ) >"$PG_TLS_DIR/openssl.log" 2>&1 || { cat "$PG_TLS_DIR/openssl.log" >&2; die "openssl failed"; }
  rm -rf "$tmp" "$PG_TLS_DIR/openssl.log" "$PG_TLS_DIR/ca.srl"
  chmod 644 "$PG_TLS_DIR/ca.crt" "$PG_TLS_DIR/server.crt"
  chmod 600 "$PG_TLS_DIR/server.key"
  if is_root; then chown postgres: "$PG_TLS_DIR/server.key" "$PG_TLS_DIR/server.crt"; fi
}

# Rewritten on every start.  hostssl and hostnossl: TLS and plain connections
# are both accepted, with the same rules.  `replication`: the superuser may
# stream WAL, so a test can make a streaming replica with pg_basebackup -R
# (tests/integration/replica.py).
write_pg_hba() {
  as_pg tee "$PG_DATA/pg_hba.conf" >/dev/null <<EOF
# Generated by deploy/local/services.sh -- rewritten on every start.
# TYPE     DATABASE  USER      ADDRESS        METHOD
local      all       all                      trust
hostssl    all       postgres  127.0.0.1/32   trust
hostnossl  all       postgres  127.0.0.1/32   trust
hostssl    all       all       127.0.0.1/32   scram-sha-256
hostnossl  all       all       127.0.0.1/32   scram-sha-256
host       replication postgres 127.0.0.1/32  trust
EOF
}

start_postgres() {
  init_postgres
  make_postgres_tls
  if pg_running; then log "Postgres already running on 127.0.0.1:$PG_PORT"; else
    write_pg_hba
    # The unix socket lives in PG_DIR unless that path is too long for
    # sun_path (107 bytes); clients here use TCP anyway.
    local sockdir="$PG_DIR"
    if [ $(( ${#PG_DIR} + 20 )) -gt 100 ]; then sockdir=""; fi
    log "starting Postgres on 127.0.0.1:$PG_PORT"
    # fsync/synchronous_commit/full_page_writes off: this is a throwaway
    # dev/test cluster; a crash may lose or corrupt it, which is fine here
    # (`clean` and start again).  Never use these settings for real data.
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k '$sockdir' -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 -c ssl=on -c ssl_cert_file='$PG_TLS_DIR/server.crt' -c ssl_key_file='$PG_TLS_DIR/server.key'" \
        start </dev/null >&2 9>&- || {
      echo "----- last 30 lines of $PG_LOG -----" >&2
      tail -n 30 "$PG_LOG" >&2 2>/dev/null || true
      die "Postgres failed to start"
    }
  fi
  local exists
  exists="$("$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_SUPERUSER" -d postgres -XtAq \
      -c "select 1 from pg_database where datname = '$PG_DB'" </dev/null)" ||
    die "cannot connect to Postgres on 127.0.0.1:$PG_PORT"
  if [ "$exists" != 1 ]; then
    log "creating database $PG_DB"
    "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_SUPERUSER" "$PG_DB" </dev/null >&2
  fi
}

stop_postgres() {
  if ! pg_running; then log "Postgres not running"; return; fi
  log "stopping Postgres"
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop </dev/null >&2 9>&-
}

# ---------------------------------------------------------------- PgBouncer
find_pgbouncer() {
  if [ -n "${PGBOUNCER_BIN:-}" ]; then
    [ -x "$PGBOUNCER_BIN" ] || die "PGBOUNCER_BIN=$PGBOUNCER_BIN is not executable"
    return
  fi
  PGBOUNCER_BIN="$(command -v pgbouncer 2>/dev/null || true)"
  if [ -z "$PGBOUNCER_BIN" ] && [ -x /usr/sbin/pgbouncer ]; then PGBOUNCER_BIN=/usr/sbin/pgbouncer; fi
}

# True when pgbouncer is there (installed now with SERVICES_AUTO_INSTALL=1);
# otherwise says so: the PgBouncer tests skip then (and fail under CI=true).
require_pgbouncer() {
  find_pgbouncer
  [ -n "$PGBOUNCER_BIN" ] && return 0
  if apt_install pgbouncer; then find_pgbouncer; fi
  [ -n "$PGBOUNCER_BIN" ] && return 0
  log "PgBouncer (pgbouncer) not found: not started; the PgBouncer tests skip (and fail under CI=true).
    apt-get install -y pgbouncer
(or rerun as root with SERVICES_AUTO_INSTALL=1)"
  return 1
}

# Run PgBouncer as the postgres user when we are root (it refuses root).
as_pgb() {
  if is_root; then
    (cd "$PGB_DIR" && runuser -u postgres -- "$@")
  else
    (cd "$PGB_DIR" && "$@")
  fi
}

pgbouncer_pid() {
  [ -f "$PGB_PID" ] || return 1
  local pid
  pid="$(cat "$PGB_PID" 2>/dev/null || true)"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$PGB_CONFIG" || return 1
  printf '%s\n' "$pid"
}
pgbouncer_running() { pgbouncer_pid >/dev/null; }

# Rewritten on every start.  Transaction pooling, as in production
# (docs/scaling.md, "PgBouncer"); small pools and a short idle timeout: the
# tests make many databases, and every (database, user) pair has its pool.
write_pgbouncer_config() {
  mkdir -p "$PGB_DIR"
  if is_root; then chown postgres: "$PGB_DIR"; chmod 700 "$PGB_DIR"; fi
  as_pgb tee "$PGB_CONFIG" >/dev/null <<EOF
; Generated by deploy/local/services.sh -- rewritten on every start.
[databases]
; Every database of the local Postgres, under the name the client asks for.
* = host=127.0.0.1 port=$PG_PORT

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGBOUNCER_PORT
unix_socket_dir =
pidfile = $PGB_PID
logfile = $PGB_LOG
pool_mode = transaction
; Clients as Postgres authenticates them (its pg_hba.conf): postgres is
; trusted; other roles' SCRAM verifiers come from pg_shadow (auth_query as
; auth_user), and SCRAM is passed through to Postgres.
auth_type = hba
auth_hba_file = $PGB_DIR/hba.conf
auth_file = $PGB_DIR/userlist.txt
auth_user = $PG_SUPERUSER
admin_users = $PG_SUPERUSER
default_pool_size = 20
max_client_conn = 500
server_idle_timeout = 30
; In transaction mode PgBouncer runs it only with server_reset_query_always;
; it matters in session mode.
server_reset_query = DISCARD ALL
; Sent by some drivers at start-up, harmless to drop. Not plan_cache_mode:
; the worker does not send it with DATABASE_STATEMENT_CACHE_SIZE=0.
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
EOF
  as_pgb tee "$PGB_DIR/hba.conf" >/dev/null <<EOF
# Generated by deploy/local/services.sh: PgBouncer's clients, as Postgres' own.
host  all  $PG_SUPERUSER  127.0.0.1/32  trust
host  all  all       127.0.0.1/32  scram-sha-256
EOF
  # The auth_user itself must be known to PgBouncer; no password (Postgres trusts it).
  printf '"%s" ""\n' "$PG_SUPERUSER" | as_pgb tee "$PGB_DIR/userlist.txt" >/dev/null
}

start_pgbouncer() {
  if pgbouncer_running; then log "PgBouncer already running on 127.0.0.1:$PGBOUNCER_PORT"; return; fi
  write_pgbouncer_config
  if [ -f "$PGB_LOG" ]; then as_pgb mv -f "$PGB_LOG" "$PGB_LOG.prev"; fi
  log "starting PgBouncer on 127.0.0.1:$PGBOUNCER_PORT (pool_mode=transaction)"
  as_pgb "$PGBOUNCER_BIN" -d "$PGB_CONFIG" </dev/null >&2 9>&- || {
    tail -n 20 "$PGB_LOG" >&2 2>/dev/null || true
    die "PgBouncer failed to start"
  }
  local i
  for i in $(seq 1 50); do   # 10 s
    if "$PG_BIN/psql" -h 127.0.0.1 -p "$PGBOUNCER_PORT" -U "$PG_SUPERUSER" -d "$PG_DB" -XtAq \
        -c 'select 1' </dev/null >/dev/null 2>&1; then
      log "PgBouncer started (pid $(pgbouncer_pid || echo '?'))"
      return
    fi
    sleep 0.2
  done
  tail -n 20 "$PGB_LOG" >&2 2>/dev/null || true
  die "PgBouncer does not answer on 127.0.0.1:$PGBOUNCER_PORT"
}

stop_pgbouncer() {
  local pid
  if ! pid="$(pgbouncer_pid)"; then
    log "PgBouncer not running"
    return
  fi
  log "stopping PgBouncer (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local i
  for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  log "PgBouncer stopped"
}

# --------------------------------------------------------------------- ports
# For a fresh STATE_DIR pick new free ports.  For an existing one reuse the
# saved ports of the services about to start (NAMES); with STRICT=1
# (start-kafka/start-postgres: "same ports") they must be free, otherwise a
# taken port is replaced by a new one.
choose_ports() {
  local strict="$1"; shift
  if load_ports; then
    local name new
    for name in "$@"; do
      case "$name" in
        KAFKA_PORT|CONTROLLER_PORT|KAFKA_SECURE_PORT) kafka_running && continue ;;
        PG_PORT) pg_running && continue ;;
        PGBOUNCER_PORT) pgbouncer_running && continue ;;
      esac
      if [ -z "${!name}" ]; then
        # A state dir from before the secured listener or PgBouncer: give it
        # a port now.
        new="$(free_ports 1)"
        log "choosing port $new for $name"
        printf -v "$name" '%s' "$new"
      elif ! port_free "${!name}"; then
        [ "$strict" = 1 ] && die "port ${!name} ($name) is in use by another process"
        new="$(free_ports 1)"
        log "port ${!name} ($name) is taken; using $new"
        printf -v "$name" '%s' "$new"
      fi
    done
  else
    read -r KAFKA_PORT CONTROLLER_PORT PG_PORT KAFKA_SECURE_PORT PGBOUNCER_PORT \
      <<<"$(free_ports 5)"
  fi
  save_ports
}

write_env() {
  ensure_pseudonym_key
  env_lines >"$ENV_FILE.tmp"
  mv "$ENV_FILE.tmp" "$ENV_FILE"
}

require_state() {
  [ -f "$MARKER" ] && load_ports || die "no services state in $STATE_DIR (run: $0 start $STATE_DIR)"
}

# ------------------------------------------------------------------ commands
cmd_start() {
  take_lock
  touch "$MARKER"
  if load_ports && kafka_running && pg_running && { pgbouncer_running || ! require_pgbouncer; }; then
    log "already running in $STATE_DIR"
    write_env
    write_secure_env
    env_lines
    return
  fi
  require_java_maven
  require_postgres
  local with_pgbouncer=0
  if require_pgbouncer; then with_pgbouncer=1; fi
  fetch_kafka_lib
  choose_ports 0 KAFKA_PORT CONTROLLER_PORT KAFKA_SECURE_PORT PG_PORT PGBOUNCER_PORT
  local t0=$SECONDS
  start_postgres
  if [ "$with_pgbouncer" = 1 ]; then start_pgbouncer; fi
  start_kafka
  write_env
  write_secure_env
  log "ready in $((SECONDS - t0))s; env written to $ENV_FILE"
  env_lines
}

cmd_stop() {
  if [ ! -d "$STATE_DIR" ]; then
    log "nothing in $STATE_DIR"
    return
  fi
  take_lock
  stop_kafka
  stop_pgbouncer
  stop_postgres
  if [ "$CLEAN" = 1 ]; then
    if [ -f "$MARKER" ] || [ -z "$(ls -A "$STATE_DIR" | grep -v '^\.lock$' || true)" ]; then
      log "removing $STATE_DIR"
      rm -rf "$STATE_DIR"
    else
      die "$STATE_DIR does not look like a services state dir (no $MARKER); not removing it"
    fi
  fi
}

cmd_env() {
  load_ports 2>/dev/null || die "services not started in $STATE_DIR"
  kafka_running || die "Kafka is not running (state $STATE_DIR)"
  pg_running || die "Postgres is not running (state $STATE_DIR)"
  ensure_pseudonym_key
  env_lines
}

cmd_env_secure() {
  load_ports 2>/dev/null || die "services not started in $STATE_DIR"
  secure_listener_running || die "Kafka is not running with a SASL_SSL listener (state $STATE_DIR)"
  secure_env_lines
}

cmd_status() {
  local ok=0
  if ! load_ports 2>/dev/null; then log "no services in $STATE_DIR"; return 1; fi
  if kafka_running; then log "Kafka: running (pid $(kafka_pid)) 127.0.0.1:$KAFKA_PORT, SASL_SSL 127.0.0.1:${KAFKA_SECURE_PORT:-none}"; else log "Kafka: stopped"; ok=1; fi
  if pg_running; then log "Postgres: running 127.0.0.1:$PG_PORT"; else log "Postgres: stopped"; ok=1; fi
  if pgbouncer_running; then log "PgBouncer: running (pid $(pgbouncer_pid)) 127.0.0.1:$PGBOUNCER_PORT"; else log "PgBouncer: stopped"; fi
  return $ok
}

case "$CMD" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  clean) CLEAN=1; cmd_stop ;;
  env) cmd_env ;;
  env-secure) cmd_env_secure ;;
  status) cmd_status ;;
  stop-postgres)
    require_state; take_lock; require_postgres; stop_postgres ;;
  start-postgres)
    require_state; take_lock; require_postgres; choose_ports 1 PG_PORT; start_postgres ;;
  stop-kafka)
    require_state; take_lock; stop_kafka ;;
  start-kafka)
    require_state; take_lock; require_java_maven; fetch_kafka_lib
    choose_ports 1 KAFKA_PORT CONTROLLER_PORT KAFKA_SECURE_PORT; start_kafka; write_secure_env ;;
  require-libreoffice) require_libreoffice ;;
  -h|--help|help) usage ;;
  *) die "unknown command: $CMD (start|stop|clean|env|env-secure|status|stop-postgres|start-postgres|stop-kafka|start-kafka|require-libreoffice)" ;;
esac
