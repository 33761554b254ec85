"""The worker's configuration: one frozen object, read once from the environment at start-up."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from pydantic import Field, IPvAnyAddress, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.pseudonym_key import PseudonymKeyError, checked_key, event_id_key
from worker.trust.signing import SigningKeys, SigningKeysError, load_signing_keys

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
UnknownCustomers = Literal["refuse", "admit"]
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/license"


class Settings(BaseSettings):
    """Every variable is upper-case in the environment: `kafka_bootstrap_servers` is
    `KAFKA_BOOTSTRAP_SERVERS`. Defaults suit the local services of `deploy/local/services.sh`."""

    # hide_input_in_errors: a refused value may be, or sit next to, a secret.
    model_config = SettingsConfigDict(
        frozen=True, extra="ignore", env_file=None, hide_input_in_errors=True
    )

    database_url: SecretStr = SecretStr(DEFAULT_DATABASE_URL)
    # Container platforms mount secrets as files: the password is read from the file once,
    # at start-up, and put into DATABASE_URL (which must then carry none of its own).
    database_password_file: Path | None = None
    read_database_url: SecretStr | None = Field(
        default=None,
        description=(
            "Where `report usage` and `reconcile` read, e.g. a streaming replica: a long "
            "report's snapshot then holds back no vacuum on the primary. Unset: they read "
            "DATABASE_URL. Commands that write never use it (docs/operations.md, "
            "'Reports off the primary')"
        ),
    )
    read_database_password_file: Path | None = Field(
        default=None,
        description="file holding READ_DATABASE_URL's password (the URL then carries none)",
    )
    database_pool_size: int = Field(default=4, ge=1, le=100)
    background_pool_size: int = Field(default=4, ge=2, le=100)
    database_statement_cache_size: int = Field(
        default=64,
        ge=0,
        le=10_000,
        description=(
            "Statements each database connection keeps prepared. 0 turns the cache off: "
            "required through PgBouncer in transaction mode before 1.21; from 1.21 set "
            "PgBouncer's max_prepared_statements instead (docs/scaling.md, 'PgBouncer')"
        ),
    )
    leader_lease_seconds: float = Field(
        default=30.0,
        ge=1,
        le=3600,
        description=(
            "How long the sweeper's and the relay's leader lease lasts unless renewed (its "
            "holder renews it every third of this). A leader that died is replaced after at "
            "most this long; a leader that cannot renew stops acting before it expires "
            "(docs/scaling.md, 'Leader leases')"
        ),
    )

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: Path | None = None
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    kafka_ssl_check_hostname: bool = True

    heartbeat_topic: str = "agent.heartbeat.v1"
    lifecycle_topic: str = "agent.lifecycle.v1"
    dlq_topic: str = "agent.events.dlq.v1"
    dlq_retention_days: float = Field(
        default=7,
        gt=0,
        le=3650,
        description="retention.ms `create-topics` gives a new DLQ topic: dead letters are "
        "raw agent messages with personal data, out of reach of the purge and of erasure",
    )
    license_events_topic: str = "license.events.v1"
    topic_partitions: int = Field(
        default=24,
        ge=1,
        le=10_000,
        description=(
            "Partitions `create-topics` gives each topic it creates (its --partitions "
            "overrides it). The agent topics' count caps the consumer replicas that do work "
            "(KEDA's maxReplicaCount equals it) and cannot shrink later; adding partitions "
            "moves devices to other partitions. 24 leaves room to grow from 1 to 24 "
            "replicas and divides evenly among 2, 3, 4, 6, 8 and 12 (docs/operations.md)"
        ),
    )
    admin_topic: str = "tenant.admin.v1"
    consumer_group: str = "license-telemetry"
    admin_consumer_group: str = "license-telemetry-admin"
    admin_enabled: bool = True
    unknown_customers: UnknownCustomers = Field(
        default="refuse",
        description=(
            "Agent signals for a customer the console never created: `refuse` sends them to "
            "the DLQ (reason unknown_customer, replayable once the customer exists); `admit` "
            "creates the customer, for deployments without the console topic"
        ),
    )
    console_catch_up_wait_seconds: float = Field(
        default=600.0,
        ge=0,
        le=86_400,
        description=(
            "With UNKNOWN_CUSTOMERS=refuse: how long a batch holding signals of a customer "
            "not in the database waits while the console's consumer group has not applied "
            "every console message yet (the customer may be on its way) before its signals "
            "go to the DLQ as unknown_customer. 0: no wait (docs/ingestion.md)"
        ),
    )
    agent_signing_keys_file: Path | None = Field(
        default=None,
        description=(
            "JSON keys file of the agents' gateway (worker/trust/signing.py): when set, every "
            "agent message must carry a valid gateway signature, or goes to the DLQ "
            "(reason unauthenticated)"
        ),
    )
    console_signing_keys_file: Path | None = Field(
        default=None,
        description="The same for the console topic, with the console's own keys",
    )
    license_events_signing_key_file: Path | None = Field(
        default=None,
        description=(
            "JSON keys file (the format of AGENT_SIGNING_KEYS_FILE) the relay signs every "
            "license event with: its `current` key signs, headers sig.key_id and sig.hmac "
            "over the message key and value (worker/trust/license_events.py); billing "
            "verifies with every key listed"
        ),
    )

    migration_lock_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description=(
            "`migrate`: Postgres's lock_timeout for every migration statement. A migration "
            "waiting for a table lock queues every later query on that table behind it; "
            "past this it gives up with one line (exit 1), nothing of it applied, and can be "
            "run again (docs/migrations.md)"
        ),
    )
    migration_statement_timeout_seconds: float = Field(
        default=1800.0,
        gt=0,
        le=7 * 86_400,
        description=(
            "`migrate`: Postgres's statement_timeout for every migration statement; 30 "
            "minutes covers rewriting or indexing a table of 10 million devices with room "
            "to spare (docs/migrations.md)"
        ),
    )

    batch_max_records: int = Field(default=5000, ge=1, le=100_000)
    batch_max_wait_ms: int = Field(default=200, ge=1, le=60_000)
    # A batch's changes are written in up to this many transactions at once, each for its
    # own customers (each takes a connection of DATABASE_POOL_SIZE).
    write_concurrency: int = Field(default=2, ge=1, le=16)
    max_message_bytes: int = Field(default=65_536, ge=256, le=10_485_760)
    future_tolerance_seconds: float = Field(default=300.0, ge=0)
    rebalance_flush_timeout_seconds: float = Field(
        default=8.0,
        gt=0,
        le=30,
        description=(
            "How long a revocation waits for the batch in hand to commit. The group waits "
            "this + 2 s for a member to rejoin (rebalance_timeout_ms), also for a member "
            "that died while joining; it must stay under the 40 s a client waits for a "
            "JoinGroup answer (docs/operations.md)."
        ),
    )

    license_release_days: int = Field(default=30, ge=1, le=3650)
    last_seen_precision_seconds: float = Field(
        default=900.0,
        ge=0,
        le=86_400,
        description=(
            "A heartbeat that would only move a device's last seen (and its user's) forward "
            "by less than this is not written (docs/ingestion.md, 'Last-seen precision'). "
            "Licenses are released after LICENSE_RELEASE_DAYS plus this, so a release is "
            "never early and at most this late. 15 minutes: a few heartbeat intervals, so "
            "most heartbeats of a steady fleet are not written, and nothing against a "
            "30-day window. 0 writes every heartbeat."
        ),
    )
    last_seen_memory_devices: int = Field(
        default=250_000,
        ge=0,
        le=100_000_000,
        description=(
            "How many devices each replica remembers what it last wrote for, to skip "
            "heartbeats without a read (packed: about 50 bytes a device plus its device "
            "and user ids, about 100 in all: 250,000 take about 25 MB). When full, "
            "further devices are not remembered (their heartbeats are "
            "written); 0 writes every heartbeat."
        ),
    )
    allocation_settle_seconds: float = Field(
        default=300.0,
        ge=0,
        le=86_400,
        description=(
            "How long an allocation's event waits in the outbox before it is published: a "
            "decision about the same subject within that time (its device's kind arrives, "
            "a late event reorders the allowance) withdraws or re-dates it, so billing never "
            "receives an allocation that arrival order or batch boundaries alone caused. "
            "0 publishes at once."
        ),
    )
    personal_data_retention_days: int = Field(default=90, ge=1, le=3650)

    sweep_enabled: bool = True
    sweep_interval_seconds: float = Field(default=300.0, gt=0)
    sweep_page_size: int = Field(default=2000, ge=1, le=100_000)
    usage_snapshots_enabled: bool = True
    # Partitioned tables (migration 0015; docs/scaling.md, "Partitioning and retention"): the
    # sweeper creates monthly partitions ahead and drops those wholly past the retention.
    license_history_retention_months: int = Field(
        default=25,
        ge=2,
        le=1200,
        description="months of license history kept (billing's 25: two years and the month "
        "being billed); older months are dropped, each subject's latest change kept aside so "
        "that `report usage --as-of` stays exact within the kept range",
    )
    lifecycle_events_retention_months: int = Field(
        default=13,
        ge=2,
        le=1200,
        description="months of install and uninstall events kept, by event time (a year of "
        "audit and the month in progress; nothing else reads them)",
    )
    usage_snapshots_retention_months: int = Field(
        default=25,
        ge=2,
        le=1200,
        description="months of usage snapshot records kept, by day (as the history: "
        "`reconcile --from/--to` compares them with the history's as-of counts)",
    )
    partition_months_ahead: int = Field(
        default=3,
        ge=1,
        le=24,
        description="monthly partitions the sweeper keeps created ahead of the current month",
    )
    guard_max_release_share: float = Field(default=0.2, gt=0, le=1)
    guard_min_releases: int = Field(default=10, ge=1)
    guard_override: bool = False
    # The key of purged users' pseudonyms and of license event ids: at least 64 hexadecimal
    # digits (worker/pseudonym_key.py). From a mounted secret file; `run` and `sweep` refuse
    # to start without it.
    pseudonym_key: SecretStr | None = None
    pseudonym_key_file: Path | None = Field(
        default=None,
        description="file holding PSEUDONYM_KEY (hexadecimal text, `openssl rand -hex 32`)",
    )

    relay_enabled: bool = True
    relay_batch_size: int = Field(default=500, ge=1, le=10_000)
    relay_poll_seconds: float = Field(default=0.5, gt=0)
    outbox_retention_days: int = Field(
        default=7,
        ge=1,
        le=3650,
        description="published license events are deleted from the outbox this long after "
        "publication (the topic is billing's record; docs/operations.md, 'Outbox retention')",
    )
    outbox_prune_batch_size: int = Field(
        default=1000,
        ge=1,
        le=10_000,
        description="outbox rows the relay leader deletes per transaction while pruning",
    )

    retry_initial_seconds: float = Field(default=0.2, gt=0)
    retry_max_seconds: float = Field(default=30.0, gt=0)

    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="/metrics, /livez, /readyz; 0 disables them"
    )
    # Every interface by default: the kubelet's probes and Prometheus connect to the pod's
    # address, so a loopback default would fail every probe. 127.0.0.1 keeps a local run's
    # metrics to its own machine; a network policy keeps them inside the cluster.
    metrics_host: IPvAnyAddress = Field(
        default=IPv4Address("0.0.0.0"),  # noqa: S104
        description="address the /metrics, /livez, /readyz server binds to (an IP literal)",
    )
    monitor_interval_seconds: float = Field(default=10.0, gt=0)
    stuck_partition_seconds: float = Field(default=120.0, gt=0)
    liveness_slack_seconds: float = Field(default=120.0, gt=0)
    strict_security: bool = Field(
        default=False,
        description="refuse to start with a weak setting (worker/weak_settings.py) instead "
        "of logging security.weak_setting",
    )
    replica_id: str = Field(
        default_factory=lambda: os.environ.get("HOSTNAME") or socket.gethostname(),
        min_length=1,
        max_length=253,
        description="names this replica in every log line (`replica`): the pod's name by "
        "default (HOSTNAME, else the host name)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _read_password_files(cls, data: Any) -> Any:
        """Resolves the *_FILE variables into the secrets they name, before validation."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        database_file = data.get("database_password_file") or None
        data["database_password_file"] = database_file
        if database_file is not None:
            url = _plain(data.get("database_url", DEFAULT_DATABASE_URL))
            if _url_has_password(url):
                raise ValueError(
                    "DATABASE_URL carries a password and DATABASE_PASSWORD_FILE is set: "
                    "give the password one way only"
                )
            password = read_secret_file("DATABASE_PASSWORD_FILE", database_file)
            data["database_url"] = _url_with_password(url, password)
        data = _read_read_database_password(data)
        sasl_file = data.get("kafka_sasl_password_file") or None
        data["kafka_sasl_password_file"] = sasl_file
        if sasl_file is not None:
            if data.get("kafka_sasl_password") is not None:
                raise ValueError(
                    "KAFKA_SASL_PASSWORD and KAFKA_SASL_PASSWORD_FILE are both set: "
                    "give the password one way only"
                )
            data["kafka_sasl_password"] = read_secret_file("KAFKA_SASL_PASSWORD_FILE", sasl_file)
        return _read_pseudonym_key(data)

    @model_validator(mode="after")
    def _tls_files_are_readable(self) -> Settings:
        """A TLS file that is missing is a configuration mistake: say which, at start-up,
        instead of a traceback from the first connection."""
        for variable, path in (
            ("KAFKA_SSL_CAFILE", self.kafka_ssl_cafile),
            ("KAFKA_SSL_CERTFILE", self.kafka_ssl_certfile),
            ("KAFKA_SSL_KEYFILE", self.kafka_ssl_keyfile),
        ):
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"{variable}: cannot read {path!r}")
        return self

    @field_validator("database_url", "read_database_url")
    @classmethod
    def _database_url_is_a_postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        """`foo` or a URL of another scheme fails here, at start-up, naming the variable,
        not in the driver with a traceback. The message never quotes the value (a secret)."""
        if value is None:
            return value
        if urlsplit(value.get_secret_value()).scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql://USER@HOST:PORT/DATABASE URL")
        return value

    @field_validator("read_database_url", mode="before")
    @classmethod
    def _empty_url_is_unset(cls, value: Any) -> Any:
        """An empty READ_DATABASE_URL means none: the reports read DATABASE_URL."""
        return value or None

    @field_validator(
        "agent_signing_keys_file",
        "console_signing_keys_file",
        "license_events_signing_key_file",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """An empty variable means no signatures (a Job that needs no keys blanks them)."""
        return value or None

    @model_validator(mode="after")
    def _signing_keys_are_usable(self) -> Settings:
        """A keys file that is missing or malformed stops start-up with the setting's name."""
        for variable, path in (
            ("AGENT_SIGNING_KEYS_FILE", self.agent_signing_keys_file),
            ("CONSOLE_SIGNING_KEYS_FILE", self.console_signing_keys_file),
        ):
            if path is not None:
                load_signing_keys(path, variable)
        self.license_events_signing_keys()  # the relay signs: it needs `current`
        return self

    def agent_signing_keys(self) -> SigningKeys | None:
        """The gateway's keys, read from AGENT_SIGNING_KEYS_FILE (None: no signatures)."""
        path = self.agent_signing_keys_file
        return None if path is None else load_signing_keys(path, "AGENT_SIGNING_KEYS_FILE")

    def console_signing_keys(self) -> SigningKeys | None:
        """The console's keys, read from CONSOLE_SIGNING_KEYS_FILE (None: no signatures)."""
        path = self.console_signing_keys_file
        return None if path is None else load_signing_keys(path, "CONSOLE_SIGNING_KEYS_FILE")

    def license_events_signing_keys(self) -> SigningKeys | None:
        """The keys the relay signs license events with, read from
        LICENSE_EVENTS_SIGNING_KEY_FILE (None: events unsigned); `current` must name one."""
        path = self.license_events_signing_key_file
        if path is None:
            return None
        variable = "LICENSE_EVENTS_SIGNING_KEY_FILE"
        keys = load_signing_keys(path, variable)
        if keys.current is None:
            raise SigningKeysError(f"{variable}: name the key that signs in `current`")
        return keys

    def required_pseudonym_key(self) -> str:
        """The pseudonym key, or a ValueError naming the setting (commands that decide
        licenses or purge cannot run without it)."""
        if self.pseudonym_key is None:
            raise ValueError(
                "PSEUDONYM_KEY_FILE is not set: license event ids and the pseudonyms of "
                "purged users are keyed with it. Create one with "
                "`(umask 077; openssl rand -hex 32 > pseudonym.key)` and keep it in the "
                "secret store (docs/security.md, 'The pseudonym key')"
            )
        return self.pseudonym_key.get_secret_value()

    def report_database_url(self) -> str:
        """Where `report usage` and `reconcile` read: READ_DATABASE_URL, else DATABASE_URL."""
        url = self.read_database_url or self.database_url
        return url.get_secret_value()

    def report_database_variable(self) -> str:
        """The variable report_database_url() comes from, for the operator's messages."""
        return "DATABASE_URL" if self.read_database_url is None else "READ_DATABASE_URL"

    def event_id_key(self) -> bytes:
        """The key of license event ids (derived from the pseudonym key)."""
        return event_id_key(self.required_pseudonym_key())

    @property
    def future_tolerance(self) -> timedelta:
        return timedelta(seconds=self.future_tolerance_seconds)

    @property
    def license_window(self) -> timedelta:
        return timedelta(days=self.license_release_days)

    @property
    def last_seen_precision(self) -> timedelta:
        return timedelta(seconds=self.last_seen_precision_seconds)

    @property
    def release_window(self) -> timedelta:
        """The license window as the stored `last_seen_at` must be read: a stored last seen
        may be up to the last-seen precision older than the device's newest heartbeat, so a
        device is past the window for certain only once its stored last seen is older than
        the window plus the precision (docs/licensing.md, "Last-seen precision")."""
        return self.license_window + self.last_seen_precision

    @property
    def allocation_settle(self) -> timedelta:
        return timedelta(seconds=self.allocation_settle_seconds)

    @property
    def retention(self) -> timedelta:
        return timedelta(days=self.personal_data_retention_days)

    @property
    def agent_topics(self) -> tuple[str, str]:
        return (self.heartbeat_topic, self.lifecycle_topic)

    def kafka_client_options(self) -> dict[str, Any]:
        """Connection and security options shared by every aiokafka client we create."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.kafka_bootstrap_servers,
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = self._ssl_context()
        if self.kafka_security_protocol.startswith("SASL"):
            options["sasl_mechanism"] = self.kafka_sasl_mechanism or "SCRAM-SHA-512"
            options["sasl_plain_username"] = self.kafka_sasl_username
            password = self.kafka_sasl_password
            options["sasl_plain_password"] = password.get_secret_value() if password else None
        return options

    def _ssl_context(self) -> Any:
        from aiokafka.helpers import create_ssl_context  # noqa: PLC0415 - only with TLS

        context = create_ssl_context(
            cafile=self.kafka_ssl_cafile,
            certfile=self.kafka_ssl_certfile,
            keyfile=self.kafka_ssl_keyfile,
        )
        context.check_hostname = self.kafka_ssl_check_hostname
        return context

    def masked(self) -> dict[str, Any]:
        """The effective configuration for the start-up log, secrets masked."""
        shown = self.model_dump(mode="json")
        shown["database_url"] = _mask_url_password(self.database_url.get_secret_value())
        if self.read_database_url is not None:
            shown["read_database_url"] = _mask_url_password(
                self.read_database_url.get_secret_value()
            )
        return shown


_URL_PASSWORD_PARAMETERS = {"password", "sslpassword"}


def _plain(value: Any) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


def _read_read_database_password(data: dict[str, Any]) -> dict[str, Any]:
    """READ_DATABASE_PASSWORD_FILE into READ_DATABASE_URL, as DATABASE_PASSWORD_FILE."""
    password_file = data.get("read_database_password_file") or None
    data["read_database_password_file"] = password_file
    if password_file is None:
        return data
    url = _plain(data.get("read_database_url") or "")
    if not url:
        raise ValueError(
            "READ_DATABASE_PASSWORD_FILE is set but READ_DATABASE_URL is not set: "
            "give the replica's URL without its password"
        )
    if _url_has_password(url):
        raise ValueError(
            "READ_DATABASE_URL carries a password and READ_DATABASE_PASSWORD_FILE is set: "
            "give the password one way only"
        )
    password = read_secret_file("READ_DATABASE_PASSWORD_FILE", password_file)
    data["read_database_url"] = _url_with_password(url, password)
    return data


def _read_pseudonym_key(data: dict[str, Any]) -> dict[str, Any]:
    """PSEUDONYM_KEY_FILE into PSEUDONYM_KEY; either one checked (worker/pseudonym_key.py)."""
    key_file = data.get("pseudonym_key_file") or None
    data["pseudonym_key_file"] = key_file
    if key_file is not None:
        if data.get("pseudonym_key") is not None:
            raise ValueError(
                "PSEUDONYM_KEY and PSEUDONYM_KEY_FILE are both set: give the key one way only"
            )
        data["pseudonym_key"] = read_secret_file("PSEUDONYM_KEY_FILE", key_file)
    key = data.get("pseudonym_key") or None
    if key is not None:
        variable = "PSEUDONYM_KEY_FILE" if key_file is not None else "PSEUDONYM_KEY"
        try:
            data["pseudonym_key"] = checked_key(_plain(key))
        except PseudonymKeyError as error:
            raise ValueError(f"{variable}: the pseudonym key {error}") from None
    else:
        data["pseudonym_key"] = None
    return data


def read_secret_file(variable: str, path: str | Path) -> str:
    """The file's text without the one trailing newline that `echo` or an editor adds."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ValueError(f"{variable}: cannot read {path}: {reason}") from None
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret:
        raise ValueError(f"{variable}: {path} is empty")
    return secret


def _url_has_password(url: str) -> bool:
    parts = urlsplit(url)
    query_names = {name.lower() for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
    return parts.password is not None or "password" in query_names


def _url_with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def _mask_url_password(url: str) -> str:
    """Hides the password wherever a libpq URL can carry it: user info or `?password=`."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user_info, _, host = netloc.rpartition("@")
        netloc = f"{user_info.split(':', 1)[0]}:***@{host}"
    parameters = parse_qsl(parts.query, keep_blank_values=True)
    query = parts.query
    if any(name.lower() in _URL_PASSWORD_PARAMETERS for name, _ in parameters):
        masked = [
            (name, "***" if name.lower() in _URL_PASSWORD_PARAMETERS else value)
            for name, value in parameters
        ]
        # Paths (sslrootcert=/etc/...) stay readable.
        query = urlencode(masked, safe="*/:")
    return urlunsplit(parts._replace(netloc=netloc, query=query))
