"""The ResultStore CustomResourceDefinition, built from spec.py's limits and defaults.

One source of truth: manifests/crd.yaml (and the chart's crds/) are generated with
`python -m resultstore_operator.crd > manifests/crd.yaml`, and a unit test checks that the
committed files match what this module builds. Validation lives in the schema (types, ranges,
enums, patterns) and in CEL rules (identifier shape, immutability) so that a bad spec is
refused by the API server at `kubectl apply` time instead of failing later in the operator.

Why one module: it is one document, the CRD's OpenAPI schema, written top to bottom in the
order `kubectl explain` shows it; split by section, a reviewer could no longer compare it
with manifests/crd.yaml field by field.
"""

from __future__ import annotations

import sys
from typing import Any

from . import spec as s

Schema = dict[str, Any]

CONDITION_TYPES = ("Ready", "SchemaReady", "CredentialsReady", "CleanupScheduled",
                   "CredentialsRotating", "ConnectionBudget")


def _string(description: str, *, default: str | None = None, max_length: int = 253,
            pattern: str | None = None, enum: tuple[str, ...] | None = None,
            min_length: int | None = None) -> Schema:
    out: Schema = {"type": "string", "description": description}
    if enum is not None:
        out["enum"] = list(enum)
    else:
        out["maxLength"] = max_length
    if min_length is not None:
        out["minLength"] = min_length
    if pattern is not None:
        out["pattern"] = pattern
    if default is not None:
        out["default"] = default
    return out


def _integer(description: str, *, default: int | None, bounds: tuple[int, int]) -> Schema:
    out: Schema = {
        "type": "integer",
        "description": description,
        "minimum": bounds[0],
        "maximum": bounds[1],
    }
    if default is not None:
        out["default"] = default
    return out


def _cel_duration_literal(seconds: float) -> str:
    if seconds < 1 and seconds > 0:
        return f"{int(round(seconds * 1000))}ms"
    return f"{int(seconds)}s"


def _duration(description: str, *, default: str | None,
              bounds: tuple[float, float]) -> Schema:
    """A Go-style duration string with its range enforced by a CEL rule."""
    low, high = (_cel_duration_literal(b) for b in bounds)
    out = _string(description, default=default, max_length=32, pattern=s.DURATION_PATTERN)
    out["x-kubernetes-validations"] = [{
        "rule": f"duration(self) >= duration('{low}') && duration(self) <= duration('{high}')",
        "message": f"must be between {low} and {high}",
    }]
    return out


def _bool(description: str, default: bool) -> Schema:
    return {"type": "boolean", "description": description, "default": default}


def _object(description: str, properties: dict[str, Schema], *,
            required: tuple[str, ...] = (), default: dict[str, Any] | None = None,
            rules: list[dict[str, str]] | None = None) -> Schema:
    out: Schema = {"type": "object", "description": description, "properties": properties}
    if required:
        out["required"] = list(required)
    if default is not None:
        out["default"] = default
    if rules:
        out["x-kubernetes-validations"] = rules
    return out


def _quantity_map(description: str) -> Schema:
    return {
        "type": "object",
        "description": description,
        "additionalProperties": {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
                       r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
            "x-kubernetes-int-or-string": True,
        },
    }


def spec_schema() -> Schema:
    database = _object(
        "Where the store lives and how the operator logs in to provision it.",
        {
            "host": _string("PostgreSQL host: a DNS name or an IP address (immutable).",
                            min_length=1, max_length=s.HOST_MAX_LENGTH,
                            pattern=s.HOST_PATTERN),
            "port": _integer("PostgreSQL port.", default=s.DEFAULT_PORT, bounds=(1, 65535)),
            "name": _string("Database name (immutable).", min_length=1, max_length=63),
            "sslMode": _string("libpq sslmode for the operator and the workers. The "
                               "operator always authenticates with SCRAM-SHA-256 (channel "
                               "binding whenever TLS is required); with prefer it uses TLS "
                               "when the server offers it and, once it has, insists on it.",
                               default=s.DEFAULT_SSL_MODE, enum=s.SSL_MODES),
            "caSecretRef": _object(
                "Optional Secret holding the server CA certificate (PEM), copied into the "
                "binding Secret as ca.crt.",
                {
                    "name": _string("Secret name in the ResultStore's namespace.",
                                    min_length=1),
                    "key": _string("Key holding the PEM certificate.", default="ca.crt"),
                },
                required=("name",),
            ),
            "adminSecretRef": _object(
                "Secret with the credentials of a role allowed to create schemas and "
                "roles (CREATEROLE and CREATE on the database).",
                {
                    "name": _string("Secret name in the ResultStore's namespace.",
                                    min_length=1),
                    "usernameKey": _string("Key holding the user name.", default="username"),
                    "passwordKey": _string("Key holding the password.", default="password"),
                },
                required=("name",),
            ),
            "pooler": _object(
                "Optional connection pooler (PgBouncer, CloudNativePG's Pooler) in front of "
                "the server: the binding Secret then also carries pooler-host, pooler-port, "
                "pooler-mode, pooler-prepared-statements and pooled-uri, and the backend "
                "sends stores and reads through it (its LISTEN connection and the operator "
                "stay direct).",
                {
                    "host": _string("Pooler host: a DNS name or an IP address.",
                                    min_length=1, max_length=s.HOST_MAX_LENGTH,
                                    pattern=s.HOST_PATTERN),
                    "port": _integer("Pooler port.", default=s.DEFAULT_PORT,
                                     bounds=(1, 65535)),
                    "mode": _string("The pooler's pool mode: transaction (a server "
                                    "connection per transaction) or session.",
                                    default=s.DEFAULT_POOLER_MODE, enum=s.POOLER_MODES),
                    "preparedStatements": _bool(
                        "The pooler keeps protocol-level prepared statements in transaction "
                        "mode (PgBouncer >= 1.21 with max_prepared_statements > 0); false: "
                        "clients never prepare.", False),
                },
                required=("host",),
            ),
        },
        required=("host", "name", "adminSecretRef"),
        rules=[
            {"rule": "self.host == oldSelf.host", "message": "database.host is immutable"},
            {"rule": "self.name == oldSelf.name", "message": "database.name is immutable"},
        ],
    )
    schema = _string(
        "PostgreSQL schema holding this store's tables (immutable). Lower-case identifier, "
        "at most 48 characters, not pg_*, public or information_schema.",
        max_length=48, min_length=1,
    )
    schema["x-kubernetes-validations"] = [
        {"rule": f"self.matches('{s.SCHEMA_PATTERN}')",
         "message": "schema must be a lower-case identifier of at most 48 characters "
                    "(letters, digits, underscore; not starting with a digit)"},
        {"rule": "!self.startsWith('pg_') && !(self in "
                 + "[" + ", ".join(f"'{r}'" for r in s.RESERVED_SCHEMAS) + "])",
         "message": "schema must not be pg_*, public or information_schema"},
        {"rule": "self == oldSelf", "message": "schema is immutable"},
    ]
    tables = _object(
        "Table names (immutable; the defaults are Celery's stock names).",
        {
            "taskTable": _string("Task result table.", default=s.DEFAULT_TASK_TABLE,
                                 max_length=63, pattern=s.TABLE_PATTERN),
            "groupTable": _string("Group result table.", default=s.DEFAULT_GROUP_TABLE,
                                  max_length=63, pattern=s.TABLE_PATTERN),
        },
        default={"taskTable": s.DEFAULT_TASK_TABLE, "groupTable": s.DEFAULT_GROUP_TABLE},
        rules=[
            {"rule": "self == oldSelf", "message": "tables are immutable"},
            {"rule": "self.taskTable != self.groupTable",
             "message": "taskTable and groupTable must differ"},
        ],
    )
    engine = _object(
        "SQLAlchemy pool and connection settings written to engine_options.json.",
        {
            "poolSize": _integer("Connections kept open per process.",
                                 default=s.DEFAULT_POOL_SIZE, bounds=s.POOL_SIZE_RANGE),
            "maxOverflow": _integer("Extra connections allowed above poolSize.",
                                    default=s.DEFAULT_MAX_OVERFLOW,
                                    bounds=s.MAX_OVERFLOW_RANGE),
            "poolTimeout": _duration("How long to wait for a pooled connection.",
                                     default=s.DEFAULT_POOL_TIMEOUT,
                                     bounds=s.POOL_TIMEOUT_RANGE),
            "poolRecycle": _duration("Reconnect connections older than this.",
                                     default=s.DEFAULT_POOL_RECYCLE,
                                     bounds=s.POOL_RECYCLE_RANGE),
            "poolPrePing": _bool("Test connections before use.", True),
            "connectTimeout": _duration("TCP/TLS connect timeout.",
                                        default=s.DEFAULT_CONNECT_TIMEOUT,
                                        bounds=s.CONNECT_TIMEOUT_RANGE),
            "statementTimeout": _duration("Server-side statement_timeout (unset: none).",
                                          default=None, bounds=s.STATEMENT_TIMEOUT_RANGE),
            "applicationName": _string("application_name reported to PostgreSQL.",
                                       default=s.DEFAULT_APPLICATION_NAME, max_length=63),
        },
        default={},
    )
    retention = _object(
        "How long results are kept and when the cleanup job runs.",
        {
            "expires": _duration("Results older than this are deleted (0s: keep forever).",
                                 default=s.DEFAULT_EXPIRES, bounds=s.EXPIRES_RANGE),
            "schedule": _string("Cron schedule of the cleanup CronJob.",
                                default=s.DEFAULT_SCHEDULE, max_length=100,
                                pattern=s.CRON_PATTERN),
            "batchSize": _integer("Rows deleted per transaction by the cleanup job.",
                                  default=s.DEFAULT_BATCH_SIZE, bounds=s.BATCH_SIZE_RANGE),
        },
        default={},
    )
    credentials = _object(
        "Login-role rotation.",
        {
            "rotateEvery": _duration("Rotate the login role this often (unset: only on "
                                     "request via the resultstore.dev/rotate annotation).",
                                     default=None, bounds=s.ROTATE_EVERY_RANGE),
            "drainTimeout": _duration("After a rotation, wait at most this long for sessions "
                                      "of the previous role to end before removing it.",
                                      default=s.DEFAULT_DRAIN_TIMEOUT,
                                      bounds=s.DRAIN_TIMEOUT_RANGE),
        },
        default={},
        rules=[{
            "rule": "!has(self.rotateEvery) || !has(self.drainTimeout) || "
                    "duration(self.rotateEvery) > duration(self.drainTimeout)",
            "message": "rotateEvery must be longer than drainTimeout",
        }],
    )
    toleration = _object(
        "A toleration (core/v1 Toleration).",
        {
            "key": _string("Taint key.", max_length=317),
            "operator": _string("Exists or Equal.", enum=("Exists", "Equal")),
            "value": _string("Taint value.", max_length=63),
            "effect": _string("Taint effect.", enum=("NoSchedule", "PreferNoSchedule",
                                                     "NoExecute")),
            "tolerationSeconds": {"type": "integer", "format": "int64",
                                  "description": "Seconds a NoExecute taint is tolerated."},
        },
    )
    cleanup_job = _object(
        "The cleanup CronJob's pod settings.",
        {
            "image": _string("Image with the `resultstore` command (default: the "
                             "operator's configured image).", max_length=512),
            "imagePullPolicy": _string("Image pull policy.", enum=s.PULL_POLICIES),
            "resources": _object(
                "Container resources (core/v1 ResourceRequirements).",
                {"limits": _quantity_map("Resource limits."),
                 "requests": _quantity_map("Resource requests.")},
            ),
            "nodeSelector": {"type": "object", "description": "Node selector.",
                             "additionalProperties": {"type": "string", "maxLength": 253}},
            "tolerations": {"type": "array", "description": "Tolerations.",
                            "maxItems": 50, "items": toleration},
            "serviceAccountName": _string("ServiceAccount of the job's pods.", max_length=253),
            "hostNetwork": _bool("Run the job's pods on the node's network (hostNetwork, "
                                 "dnsPolicy ClusterFirstWithHostNet), for a PostgreSQL "
                                 "reachable only from the host network.", False),
            "successfulJobsHistoryLimit": _integer("Finished jobs kept.",
                                                   default=s.DEFAULT_SUCCESS_HISTORY,
                                                   bounds=s.HISTORY_RANGE),
            "failedJobsHistoryLimit": _integer("Failed jobs kept.",
                                               default=s.DEFAULT_FAILED_HISTORY,
                                               bounds=s.HISTORY_RANGE),
            "suspend": _bool("Suspend the CronJob.", False),
        },
        default={},
    )
    return _object(
        "Desired state of a result store.",
        {
            "database": database,
            "schema": schema,
            "tables": tables,
            "extendedResults": _bool("Store task name, args, kwargs, worker, retries, "
                                     "queue (Celery result_extended).", False),
            "notifications": _bool("Stores NOTIFY waiting clients (PostgreSQL LISTEN/NOTIFY), "
                                   "so AsyncResult.get() returns as soon as a result is "
                                   "stored; off: waits poll the table.", True),
            "engine": engine,
            "retention": retention,
            "credentials": credentials,
            "cleanupJob": cleanup_job,
            "connections": _object(
                "The store's connection budget.",
                {"limit": _integer(
                    "Most PostgreSQL sessions each of the store's login roles may hold "
                    "(CONNECTION LIMIT, enforced by the server; absent: no limit). During a "
                    "rotation the previous and the next role each have it.",
                    default=None, bounds=s.CONNECTION_LIMIT_RANGE)},
                default={},
            ),
            "deletionPolicy": _string("Retain keeps schema and data and disables the "
                                      "login; Delete drops schema and roles.",
                                      default=s.DEFAULT_DELETION_POLICY,
                                      enum=s.DELETION_POLICIES),
            "schemaPolicy": _string("Exclusive refuses an existing schema that holds objects "
                                    "this store did not create; AdoptExisting shares it (the "
                                    "store's role is granted only the store's own tables, and "
                                    "deletion drops only those).",
                                    default=s.DEFAULT_SCHEMA_POLICY,
                                    enum=s.SCHEMA_POLICIES),
        },
        required=("database", "schema"),
    )


def status_schema() -> Schema:
    condition = _object(
        "A metav1.Condition.",
        {
            "type": _string("Condition type.", max_length=316),
            "status": _string("True, False or Unknown.", enum=("True", "False", "Unknown")),
            "reason": _string("CamelCase reason.", max_length=1024),
            "message": _string("Human-readable message.", max_length=32768),
            "lastTransitionTime": {"type": "string", "format": "date-time",
                                   "description": "When the status last changed."},
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0,
                                   "description": "Generation the condition was set for."},
        },
        required=("type", "status", "reason", "message", "lastTransitionTime"),
    )
    time = {"type": "string", "format": "date-time"}
    return _object(
        "Observed state, written by the operator.",
        {
            "observedGeneration": {"type": "integer", "format": "int64"},
            "phase": _string("Pending, Provisioning, Ready, Rotating, Failed or Deleting.",
                             max_length=32),
            "secretName": _string("The binding Secret.", max_length=253),
            "cronJobName": _string("The cleanup CronJob.", max_length=253),
            "schemaVersion": {"type": "integer", "description": "Schema version in the "
                              "database."},
            "conditions": {
                "type": "array",
                "items": condition,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "credentials": _object(
                "Login-role and rotation state (survives operator restarts).",
                {
                    "roleBase": _string("Prefix of the login roles.", max_length=63),
                    "activeRole": _string("Role in the Secret.", max_length=63),
                    "previousRole": _string("Role being drained.", max_length=63),
                    "nextRole": _string("Role being prepared.", max_length=63),
                    "phase": _string("Stable, Rotating or Draining.", max_length=32),
                    "rotationStartedAt": time,
                    "drainDeadline": time,
                    "secretSwitchedAt": time,
                    "lastRotationTime": time,
                    "handledRotateRequest": _string(
                        "Last value of the resultstore.dev/rotate annotation acted on.",
                        max_length=253),
                    "rotations": {"type": "integer"},
                },
            ),
            "lastCleanup": _object(
                "The most recent cleanup run recorded in the database.",
                {
                    "startedAt": time,
                    "finishedAt": time,
                    "succeeded": {"type": "boolean"},
                    "deleted": {"type": "integer"},
                    "message": _string("Outcome.", max_length=1024),
                },
            ),
            "database": _object(
                "Reachability as seen by the last check.",
                {"reachable": {"type": "boolean"}, "lastCheckTime": time,
                 "tls": {"type": "boolean",
                         "description": "The last admin session used TLS; from then on the "
                                        "operator refuses a connection without it."}},
            ),
            "connections": _object(
                "PostgreSQL sessions of the store's login roles, read from pg_stat_activity "
                "by the operator's periodic check.",
                {
                    "inUse": {"type": "integer", "description": "Sessions of the store's "
                              "roles (both roles of a rotation)."},
                    "active": {"type": "integer", "description": "Of those, running a "
                               "statement."},
                    "idle": {"type": "integer", "description": "Of those, idle (also idle "
                             "in a transaction)."},
                    "limit": {"type": "integer", "description": "spec.connections.limit "
                              "(absent: no limit)."},
                    "serverMax": {"type": "integer", "description": "The server's "
                                  "max_connections."},
                    "serverAvailable": {"type": "integer", "description": "Sessions the "
                                        "server can still open for ordinary roles "
                                        "(max_connections minus reserved slots minus every "
                                        "client session)."},
                    "summary": _string("In use / limit, for kubectl get.", max_length=64),
                    "observedAt": time,
                },
            ),
        },
    )


def build_crd() -> dict[str, Any]:
    """The complete apiextensions.k8s.io/v1 CustomResourceDefinition."""
    ready = '.status.conditions[?(@.type=="Ready")]'
    root = _object(
        "A PostgreSQL-backed Celery result store provisioned by the resultstore operator.",
        {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
        required=("spec",),
        rules=[{
            "rule": f"size(self.metadata.name) <= {s.MAX_NAME_LENGTH}",
            "message": f"name must be at most {s.MAX_NAME_LENGTH} characters (the cleanup "
                       "CronJob name derives from it)",
        }],
    )
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{s.PLURAL}.{s.GROUP}"},
        "spec": {
            "group": s.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": s.KIND,
                "listKind": f"{s.KIND}List",
                "plural": s.PLURAL,
                "singular": s.SINGULAR,
                "shortNames": list(s.SHORT_NAMES),
            },
            "versions": [{
                "name": s.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Ready", "type": "string", "jsonPath": f"{ready}.status"},
                    {"name": "Reason", "type": "string", "jsonPath": f"{ready}.reason"},
                    {"name": "Schema", "type": "string", "jsonPath": ".spec.schema"},
                    {"name": "Secret", "type": "string", "jsonPath": ".status.secretName"},
                    {"name": "Connections", "type": "string",
                     "jsonPath": ".status.connections.summary"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": root},
            }],
        },
    }


def render_yaml() -> str:
    import yaml

    header = ("# Generated by `python -m resultstore_operator.crd`; do not edit by hand.\n"
              "# Source: operator/resultstore_operator/crd.py\n")
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def main() -> None:
    sys.stdout.write(render_yaml())


if __name__ == "__main__":
    main()
