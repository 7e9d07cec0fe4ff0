"""Typed ResultStore spec, parsed and validated from the custom resource's dict.

The API server already applies the CRD's defaults and validation (crd.py builds that schema
from the constants below), but the operator parses again because an object may have been
stored before a CRD upgrade, or by a server with validation disabled: a handler must be able
to trust every field it reads. Limits and defaults live here once; crd.py reads them.

Why one module: the limits, the typed sections and their parsers are one contract (the
CRD's fields, as crd.py renders them); each section's parser sits next to the limits it
checks, and parse_spec only calls them in the spec's order.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# The API's names, defined once in api.py; re-exported because handlers and crd.py read
# them from here.
from .api import (  # noqa: F401
    ANNOTATION_ROTATE,
    ANNOTATION_SKIP_DB_CLEANUP,
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
)

# --- shared limits and defaults (crd.py builds the OpenAPI schema from these) -------------

#: PostgreSQL identifiers are at most 63 bytes; role names are `rs_<schema>_<8 hex>_<a|b>`,
#: so the schema name keeps room for that decoration.
SCHEMA_PATTERN = r"^[a-z_][a-z0-9_]{0,47}$"
TABLE_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"
RESERVED_SCHEMAS = ("public", "information_schema")
#: CronJob names are limited to 52 characters; ours is `<name>-resultstore-cleanup`.
MAX_NAME_LENGTH = 32
DURATION_PATTERN = r"^([0-9]+(ms|s|m|h))+$"
CRON_PATTERN = (
    r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)"
    r"|(\S+\s+){4}\S+)$"
)
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
DELETION_POLICIES = ("Retain", "Delete")
#: Exclusive: an existing schema holding objects this store did not create is refused.
#: AdoptExisting: such a schema is shared; grants and deletion still cover only the store's
#: own tables and sequences (builders.marker).
SCHEMA_POLICY_EXCLUSIVE = "Exclusive"
SCHEMA_POLICY_ADOPT_EXISTING = "AdoptExisting"
SCHEMA_POLICIES = (SCHEMA_POLICY_EXCLUSIVE, SCHEMA_POLICY_ADOPT_EXISTING)
DEFAULT_SCHEMA_POLICY = SCHEMA_POLICY_EXCLUSIVE
#: spec.database.host: a DNS name (RFC 1123 labels) or an IPv4/IPv6 address, nothing else:
#: no libpq host list (`a,b`), no Unix socket directory, no URI, no spaces.
_DNS_LABEL = r"[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?"
HOST_PATTERN = (rf"^(({_DNS_LABEL})(\.{_DNS_LABEL})*"
                rf"|[0-9a-fA-F.]*:[0-9a-fA-F.]*:[0-9a-fA-F:.]*)$")  # IPv6: 2+ colons
HOST_MAX_LENGTH = 253
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
#: spec.database.pooler.mode: what a pooler keeps between a client's transactions (PgBouncer's
#: pool_mode; `statement` breaks multi-statement transactions and is not offered).
POOLER_MODES = ("session", "transaction")
DEFAULT_POOLER_MODE = "transaction"

DEFAULT_PORT = 5432
DEFAULT_SSL_MODE = "prefer"
DEFAULT_TASK_TABLE = "celery_taskmeta"
DEFAULT_GROUP_TABLE = "celery_tasksetmeta"
DEFAULT_POOL_SIZE = 5
DEFAULT_MAX_OVERFLOW = 10
DEFAULT_POOL_TIMEOUT = "30s"
DEFAULT_POOL_RECYCLE = "30m"
DEFAULT_CONNECT_TIMEOUT = "10s"
DEFAULT_APPLICATION_NAME = "celery-resultstore"
DEFAULT_EXPIRES = "24h"
DEFAULT_SCHEDULE = "17 * * * *"
DEFAULT_BATCH_SIZE = 1000
DEFAULT_DRAIN_TIMEOUT = "5m"
DEFAULT_SUCCESS_HISTORY = 3
DEFAULT_FAILED_HISTORY = 1
DEFAULT_DELETION_POLICY = "Retain"

POOL_SIZE_RANGE = (1, 200)
MAX_OVERFLOW_RANGE = (0, 1000)
BATCH_SIZE_RANGE = (1, 100_000)
HISTORY_RANGE = (0, 100)
#: (minimum, maximum) in seconds, also rendered as CEL duration() bounds in the CRD.
POOL_TIMEOUT_RANGE = (1.0, 600.0)
POOL_RECYCLE_RANGE = (1.0, 86_400.0)
CONNECT_TIMEOUT_RANGE = (1.0, 300.0)
STATEMENT_TIMEOUT_RANGE = (0.001, 86_400.0)
EXPIRES_RANGE = (0.0, 365 * 86_400.0)
ROTATE_EVERY_RANGE = (10.0, 365 * 86_400.0)
DRAIN_TIMEOUT_RANGE = (0.0, 86_400.0)
#: spec.connections.limit: the store roles' CONNECTION LIMIT (absent: -1, no limit). Above
#: 10000 no server has the max_connections to give (each backend is a process).
CONNECTION_LIMIT_RANGE = (1, 10_000)

_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class SpecError(ValueError):
    """The spec cannot be acted on; the message names the field (never a secret)."""


def parse_duration(value: str | int | float, path: str) -> float:
    """Parse a Go/Kubernetes style duration (`90s`, `1h30m`, `500ms`) into seconds.

    Integers are accepted as seconds for convenience; the CRD itself only admits strings.
    """
    if isinstance(value, bool):
        raise SpecError(f"{path}: expected a duration like '30s' or '1h', got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise SpecError(f"{path}: duration must not be negative")
        return float(value)
    text = str(value).strip()
    if not re.fullmatch(DURATION_PATTERN, text):
        raise SpecError(f"{path}: expected a duration like '30s', '5m' or '1h30m', got {text!r}")
    return sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))


def format_duration(seconds: float) -> str:
    """Inverse of parse_duration for whole seconds (used for defaults and messages)."""
    total = int(seconds)
    if total == 0:
        return "0s"
    parts = []
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if total >= size:
            parts.append(f"{total // size}{unit}")
            total %= size
    return "".join(parts)


# --- the typed spec ---------------------------------------------------------------------


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str


@dataclass(frozen=True)
class AdminSecretRef:
    name: str
    username_key: str = "username"
    password_key: str = "password"


@dataclass(frozen=True)
class PoolerSpec:
    """A connection pooler (PgBouncer, CloudNativePG's Pooler) in front of the server.

    Workers send stores and reads through it with the store's own role and database; the
    operator itself and the backend's LISTEN connection still go to `database.host`.
    """

    host: str
    port: int = DEFAULT_PORT
    mode: str = DEFAULT_POOLER_MODE
    #: the pooler keeps protocol-level prepared statements in transaction mode (PgBouncer
    #: >= 1.21 with max_prepared_statements > 0); false: clients must not prepare
    prepared_statements: bool = False


@dataclass(frozen=True)
class DatabaseSpec:
    host: str
    name: str
    admin_secret: AdminSecretRef
    port: int = DEFAULT_PORT
    ssl_mode: str = DEFAULT_SSL_MODE
    ca_secret: SecretKeyRef | None = None
    pooler: PoolerSpec | None = None


def validate_host(value: str, path: str = "spec.database.host") -> str:
    """A DNS name or an IP address: the admin password must go to one host, by name."""
    if len(value) > HOST_MAX_LENGTH or not re.fullmatch(HOST_PATTERN, value):
        raise SpecError(f"{path} must be a DNS name or an IP address, got {value[:64]!r}")
    if ":" in value:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            raise SpecError(f"{path} is not a valid IPv6 address: {value[:64]!r}") from None
    elif re.fullmatch(r"[0-9.]+", value):
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            raise SpecError(f"{path} is not a valid IPv4 address: {value[:64]!r}") from None
    return value


@dataclass(frozen=True)
class TablesSpec:
    task_table: str = DEFAULT_TASK_TABLE
    group_table: str = DEFAULT_GROUP_TABLE


@dataclass(frozen=True)
class EngineSpec:
    pool_size: int = DEFAULT_POOL_SIZE
    max_overflow: int = DEFAULT_MAX_OVERFLOW
    pool_timeout: float = 30.0
    pool_recycle: float = 1800.0
    pool_pre_ping: bool = True
    connect_timeout: float = 10.0
    statement_timeout: float | None = None
    application_name: str = DEFAULT_APPLICATION_NAME


@dataclass(frozen=True)
class RetentionSpec:
    #: seconds; 0 means results never expire (the cleanup job then deletes nothing)
    expires: float = 86_400.0
    schedule: str = DEFAULT_SCHEDULE
    batch_size: int = DEFAULT_BATCH_SIZE


@dataclass(frozen=True)
class CredentialsSpec:
    rotate_every: float | None = None
    drain_timeout: float = 300.0


@dataclass(frozen=True)
class CleanupJobSpec:
    image: str | None = None
    image_pull_policy: str | None = None
    resources: Mapping[str, Any] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    service_account_name: str | None = None
    #: the Job's pod on the node's network (hostNetwork, dnsPolicy ClusterFirstWithHostNet),
    #: for a PostgreSQL reachable only from the host network
    host_network: bool = False
    successful_jobs_history_limit: int = DEFAULT_SUCCESS_HISTORY
    failed_jobs_history_limit: int = DEFAULT_FAILED_HISTORY
    suspend: bool = False


@dataclass(frozen=True)
class ConnectionsSpec:
    """The store's connection budget: `limit` is its login roles' CONNECTION LIMIT, which
    PostgreSQL enforces per role (None: no limit, -1 in the catalog)."""

    limit: int | None = None

    @property
    def role_limit(self) -> int:
        """The value for CREATE/ALTER ROLE ... CONNECTION LIMIT (-1: none)."""
        return -1 if self.limit is None else self.limit


@dataclass(frozen=True)
class ResultStoreSpec:
    database: DatabaseSpec
    schema: str
    tables: TablesSpec = TablesSpec()
    extended_results: bool = False
    #: stores NOTIFY waiting clients (LISTEN/NOTIFY push waits); off: clients poll
    notifications: bool = True
    engine: EngineSpec = EngineSpec()
    retention: RetentionSpec = RetentionSpec()
    credentials: CredentialsSpec = CredentialsSpec()
    cleanup_job: CleanupJobSpec = CleanupJobSpec()
    deletion_policy: str = DEFAULT_DELETION_POLICY
    schema_policy: str = DEFAULT_SCHEMA_POLICY
    connections: ConnectionsSpec = ConnectionsSpec()


# --- parsing ------------------------------------------------------------------------------


def _obj(parent: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{path}.{key}: expected an object")
    return value


def _str(parent: Mapping[str, Any], key: str, path: str, default: str | None = None,
         required: bool = False) -> str:
    value = parent.get(key)
    if value is None or value == "":
        if required:
            raise SpecError(f"{path}.{key} is required")
        if default is None:
            return ""
        return default
    if not isinstance(value, str):
        raise SpecError(f"{path}.{key}: expected a string")
    return value


def _int(parent: Mapping[str, Any], key: str, path: str, default: int,
         bounds: tuple[int, int]) -> int:
    value = parent.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{path}.{key}: expected an integer")
    low, high = bounds
    if not low <= value <= high:
        raise SpecError(f"{path}.{key} must be between {low} and {high}, got {value}")
    return value


def _bool(parent: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    value = parent.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SpecError(f"{path}.{key}: expected true or false")
    return value


def _duration(parent: Mapping[str, Any], key: str, path: str, default: str | None,
              bounds: tuple[float, float]) -> float | None:
    value = parent.get(key, default)
    if value is None:
        return None
    seconds = parse_duration(value, f"{path}.{key}")
    low, high = bounds
    if not low <= seconds <= high:
        raise SpecError(
            f"{path}.{key} must be between {format_duration(low) if low >= 1 else f'{low}s'}"
            f" and {format_duration(high)}, got {value}"
        )
    return seconds


def _enum(parent: Mapping[str, Any], key: str, path: str, default: str,
          choices: tuple[str, ...]) -> str:
    value = _str(parent, key, path, default)
    if value not in choices:
        raise SpecError(f"{path}.{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def validate_schema_name(value: str, path: str = "spec.schema") -> str:
    if not re.fullmatch(SCHEMA_PATTERN, value):
        raise SpecError(
            f"{path} must match {SCHEMA_PATTERN} (lower-case letters, digits, underscore; "
            f"at most 48 characters)"
        )
    if value.startswith("pg_") or value in RESERVED_SCHEMAS:
        raise SpecError(f"{path} must not be a reserved schema name (pg_*, public, "
                        f"information_schema)")
    return value


def _database(raw: Mapping[str, Any]) -> DatabaseSpec:
    db = _obj(raw, "database", "spec")
    if not db:
        raise SpecError("spec.database is required")
    admin = _obj(db, "adminSecretRef", "spec.database")
    if not admin:
        raise SpecError("spec.database.adminSecretRef is required")
    ca_raw = _obj(db, "caSecretRef", "spec.database")
    ca = None
    if ca_raw:
        ca = SecretKeyRef(
            name=_str(ca_raw, "name", "spec.database.caSecretRef", required=True),
            key=_str(ca_raw, "key", "spec.database.caSecretRef", "ca.crt"),
        )
    database = DatabaseSpec(
        host=validate_host(_str(db, "host", "spec.database", required=True)),
        name=_str(db, "name", "spec.database", required=True),
        port=_int(db, "port", "spec.database", DEFAULT_PORT, (1, 65535)),
        ssl_mode=_enum(db, "sslMode", "spec.database", DEFAULT_SSL_MODE, SSL_MODES),
        ca_secret=ca,
        pooler=_pooler(db),
        admin_secret=AdminSecretRef(
            name=_str(admin, "name", "spec.database.adminSecretRef", required=True),
            username_key=_str(admin, "usernameKey", "spec.database.adminSecretRef", "username"),
            password_key=_str(admin, "passwordKey", "spec.database.adminSecretRef", "password"),
        ),
    )
    if len(database.name.encode()) > 63:
        raise SpecError("spec.database.name must be at most 63 bytes")
    return database


def _pooler(db: Mapping[str, Any]) -> PoolerSpec | None:
    """spec.database.pooler; its host is checked like the database's (one host, by name)."""
    raw = _obj(db, "pooler", "spec.database")
    if not raw:
        return None
    path = "spec.database.pooler"
    return PoolerSpec(
        host=validate_host(_str(raw, "host", path, required=True), f"{path}.host"),
        port=_int(raw, "port", path, DEFAULT_PORT, (1, 65535)),
        mode=_enum(raw, "mode", path, DEFAULT_POOLER_MODE, POOLER_MODES),
        prepared_statements=_bool(raw, "preparedStatements", path, False),
    )


def _connections(raw: Mapping[str, Any]) -> ConnectionsSpec:
    """spec.connections; a limit outside its range is refused, never clamped: a clamped
    budget would let more workers in than the user asked for."""
    conn = _obj(raw, "connections", "spec")
    if conn.get("limit") is None:
        return ConnectionsSpec()
    return ConnectionsSpec(limit=_int(conn, "limit", "spec.connections", 0,
                                      CONNECTION_LIMIT_RANGE))


def _tables(raw: Mapping[str, Any]) -> TablesSpec:
    tables_raw = _obj(raw, "tables", "spec")
    tables = TablesSpec(
        task_table=_str(tables_raw, "taskTable", "spec.tables", DEFAULT_TASK_TABLE),
        group_table=_str(tables_raw, "groupTable", "spec.tables", DEFAULT_GROUP_TABLE),
    )
    for key, value in (("taskTable", tables.task_table), ("groupTable", tables.group_table)):
        if not re.fullmatch(TABLE_PATTERN, value):
            raise SpecError(f"spec.tables.{key} must match {TABLE_PATTERN}")
    if tables.task_table == tables.group_table:
        raise SpecError("spec.tables.taskTable and spec.tables.groupTable must differ")
    return tables


def _engine(raw: Mapping[str, Any]) -> EngineSpec:
    eng = _obj(raw, "engine", "spec")
    statement_timeout = _duration(eng, "statementTimeout", "spec.engine", None,
                                  STATEMENT_TIMEOUT_RANGE)
    engine = EngineSpec(
        pool_size=_int(eng, "poolSize", "spec.engine", DEFAULT_POOL_SIZE, POOL_SIZE_RANGE),
        max_overflow=_int(eng, "maxOverflow", "spec.engine", DEFAULT_MAX_OVERFLOW,
                          MAX_OVERFLOW_RANGE),
        pool_timeout=_duration(eng, "poolTimeout", "spec.engine", DEFAULT_POOL_TIMEOUT,
                               POOL_TIMEOUT_RANGE) or 30.0,
        pool_recycle=_duration(eng, "poolRecycle", "spec.engine", DEFAULT_POOL_RECYCLE,
                               POOL_RECYCLE_RANGE) or 1800.0,
        pool_pre_ping=_bool(eng, "poolPrePing", "spec.engine", True),
        connect_timeout=_duration(eng, "connectTimeout", "spec.engine", DEFAULT_CONNECT_TIMEOUT,
                                  CONNECT_TIMEOUT_RANGE) or 10.0,
        statement_timeout=statement_timeout,
        application_name=_str(eng, "applicationName", "spec.engine", DEFAULT_APPLICATION_NAME),
    )
    if len(engine.application_name) > 63:
        raise SpecError("spec.engine.applicationName must be at most 63 characters")
    return engine


def _retention(raw: Mapping[str, Any]) -> RetentionSpec:
    ret = _obj(raw, "retention", "spec")
    schedule = _str(ret, "schedule", "spec.retention", DEFAULT_SCHEDULE)
    if not re.fullmatch(CRON_PATTERN, schedule.strip()):
        raise SpecError("spec.retention.schedule must be a cron expression (5 fields or @hourly)")
    return RetentionSpec(
        expires=_duration(ret, "expires", "spec.retention", DEFAULT_EXPIRES, EXPIRES_RANGE) or 0.0,
        schedule=schedule.strip(),
        batch_size=_int(ret, "batchSize", "spec.retention", DEFAULT_BATCH_SIZE, BATCH_SIZE_RANGE),
    )


def _credentials(raw: Mapping[str, Any]) -> CredentialsSpec:
    cred = _obj(raw, "credentials", "spec")
    credentials = CredentialsSpec(
        rotate_every=_duration(cred, "rotateEvery", "spec.credentials", None,
                               ROTATE_EVERY_RANGE),
        drain_timeout=_duration(cred, "drainTimeout", "spec.credentials", DEFAULT_DRAIN_TIMEOUT,
                                DRAIN_TIMEOUT_RANGE) or 0.0,
    )
    if (credentials.rotate_every is not None
            and credentials.rotate_every <= credentials.drain_timeout):
        raise SpecError("spec.credentials.rotateEvery must be longer than drainTimeout")
    return credentials


def _cleanup_job(raw: Mapping[str, Any]) -> CleanupJobSpec:
    job = _obj(raw, "cleanupJob", "spec")
    tolerations = job.get("tolerations") or []
    if not isinstance(tolerations, list) or not all(isinstance(t, Mapping) for t in tolerations):
        raise SpecError("spec.cleanupJob.tolerations: expected a list of objects")
    node_selector = job.get("nodeSelector") or {}
    if not isinstance(node_selector, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in node_selector.items()
    ):
        raise SpecError("spec.cleanupJob.nodeSelector: expected a map of strings")
    resources = job.get("resources") or {}
    if not isinstance(resources, Mapping):
        raise SpecError("spec.cleanupJob.resources: expected an object")
    pull = _str(job, "imagePullPolicy", "spec.cleanupJob") or None
    if pull is not None and pull not in PULL_POLICIES:
        raise SpecError("spec.cleanupJob.imagePullPolicy must be one of "
                        + ", ".join(PULL_POLICIES))
    return CleanupJobSpec(
        image=_str(job, "image", "spec.cleanupJob") or None,
        image_pull_policy=pull,
        resources=dict(resources),
        node_selector=dict(node_selector),
        tolerations=tuple(dict(t) for t in tolerations),
        service_account_name=_str(job, "serviceAccountName", "spec.cleanupJob") or None,
        host_network=_bool(job, "hostNetwork", "spec.cleanupJob", False),
        successful_jobs_history_limit=_int(job, "successfulJobsHistoryLimit", "spec.cleanupJob",
                                           DEFAULT_SUCCESS_HISTORY, HISTORY_RANGE),
        failed_jobs_history_limit=_int(job, "failedJobsHistoryLimit", "spec.cleanupJob",
                                       DEFAULT_FAILED_HISTORY, HISTORY_RANGE),
        suspend=_bool(job, "suspend", "spec.cleanupJob", False),
    )


def parse_spec(raw: Mapping[str, Any]) -> ResultStoreSpec:
    """Validate and type a ResultStore's `.spec`; raise SpecError naming the bad field.

    Sections are parsed in the order the spec lists them, so that the first error reported
    is the first bad field a reader meets.
    """
    if not isinstance(raw, Mapping):
        raise SpecError("spec: expected an object")
    database = _database(raw)
    schema = validate_schema_name(_str(raw, "schema", "spec", required=True))
    tables = _tables(raw)
    engine = _engine(raw)
    retention = _retention(raw)
    credentials = _credentials(raw)
    cleanup_job = _cleanup_job(raw)
    connections = _connections(raw)
    return ResultStoreSpec(
        database=database,
        schema=schema,
        tables=tables,
        extended_results=_bool(raw, "extendedResults", "spec", False),
        notifications=_bool(raw, "notifications", "spec", True),
        engine=engine,
        retention=retention,
        credentials=credentials,
        cleanup_job=cleanup_job,
        deletion_policy=_enum(raw, "deletionPolicy", "spec", DEFAULT_DELETION_POLICY,
                              DELETION_POLICIES),
        schema_policy=_enum(raw, "schemaPolicy", "spec", DEFAULT_SCHEMA_POLICY,
                            SCHEMA_POLICIES),
        connections=connections,
    )
