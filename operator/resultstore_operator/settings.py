"""Operator settings, read once from the environment at start-up.

Why a frozen dataclass: handlers run for months; reading the environment in a hot path
would let a half-applied change of the Deployment produce an operator that behaves
differently per handler. Everything tunable lives here and is fixed for the process life.

Why one module: it is one snapshot of one environment, taken at one moment. The operator's,
the webhook's and the leader election's parts are parsed together by the same env parsers
(one TRUTHY/FALSY set, one error type naming the variable), so that any malformed
`RESULTSTORE_*` fails start-up the same way before anything runs; split across modules, the
parts would each grow their own parsing.
"""

from __future__ import annotations

import os
import secrets
import socket
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

ENV_PREFIX = "RESULTSTORE_"


class SettingsError(ValueError):
    """A malformed operator setting (names the variable, never echoes secret values)."""


#: The words a boolean setting (or a `"true"` annotation) may be spelt with; one set for
#: every part of the operator.
TRUTHY = frozenset({"1", "true", "yes", "on"})
FALSY = frozenset({"0", "false", "no", "off"})


def env_text(env: Mapping[str, str], key: str) -> str | None:
    """The stripped value of `key`, None when unset or blank."""
    value = env.get(key, "").strip()
    return value or None


def env_int(env: Mapping[str, str], key: str, default: int, minimum: int = 0) -> int:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise SettingsError(f"{key} must be an integer, got {raw!r}") from exc
    if value < minimum:
        raise SettingsError(f"{key} must be >= {minimum}, got {value}")
    return value


def env_float(env: Mapping[str, str], key: str, default: float, minimum: float = 0.0,
              maximum: float | None = None) -> float:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise SettingsError(f"{key} must be a number, got {raw!r}") from exc
    if maximum is not None and not minimum <= value <= maximum:
        raise SettingsError(f"{key} must be within [{minimum}, {maximum}], got {value}")
    if value < minimum:
        raise SettingsError(f"{key} must be >= {minimum}, got {value}")
    return value


def env_flag(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = env.get(key, "").strip().lower()
    if not raw:
        return default
    if raw in TRUTHY:
        return True
    if raw in FALSY:
        return False
    raise SettingsError(f"{key} must be true or false, got {raw!r}")


def env_list(env: Mapping[str, str], key: str) -> tuple[str, ...]:
    """A comma-separated list, blanks dropped."""
    return tuple(n.strip() for n in env.get(key, "").split(",") if n.strip())


def parse_image_allowlist(key: str, raw: str) -> tuple[str, ...]:
    """Comma- or whitespace-separated image references; `<repository>:*` allows any tag.

    A bare `*`, or a wildcard anywhere but a trailing `:*`, is refused: a prefix pattern
    like `registry/team*` would also admit `registry/team-evil/...`.
    """
    entries = tuple(dict.fromkeys(e for e in raw.replace(",", " ").split() if e))
    for entry in entries:
        stem = entry[:-2] if entry.endswith(":*") else entry
        if "*" in stem or not stem or stem.endswith((":", "@", "/")):
            raise SettingsError(
                f"{key}: {entry!r} is not an image reference or <repository>:* pattern")
    return entries


def image_allowed(image: str, default: str, allowlist: tuple[str, ...]) -> bool:
    """Whether `image` is the default image or matches an allow-list entry (pure)."""
    if image == default or image in allowlist:
        return True
    for entry in allowlist:
        if entry.endswith(":*"):
            repo = entry[:-2]
            rest = image[len(repo):] if image.startswith(repo) else ""
            if rest[:1] == ":" and "/" not in rest and "@" not in rest and len(rest) > 1:
                return True
            if rest.startswith("@sha256:") and len(rest) > len("@sha256:"):
                return True
    return False


def parse_listen_address(key: str, raw: str) -> tuple[str, int] | None:
    """`host:port` (IPv6 as `[::]:port`; an empty host means all IPv4 interfaces) -> a
    (host, port) pair, or None when `raw` is empty (the endpoint is disabled)."""
    raw = raw.strip()
    if not raw:
        return None
    host, sep, port_text = raw.rpartition(":")
    if not sep or not port_text.isdigit():
        raise SettingsError(f"{key} must be host:port, got {raw!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise SettingsError(f"{key}: port must be between 1 and 65535, got {port}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise SettingsError(f"{key} must be host:port, got {raw!r}")
    elif ":" in host:  # an IPv6 address needs brackets, or the port is ambiguous
        raise SettingsError(f"{key} must be host:port ([addr]:port for IPv6), got {raw!r}")
    if any(ch.isspace() or ch in "[]/" for ch in host):
        raise SettingsError(f"{key} must be host:port, got {raw!r}")
    return host or "0.0.0.0", port


# --- the pod-injection webhook --------------------------------------------------------------

WEBHOOK_PATH = "/mutate-pods"
WEBHOOK_COMPONENT = "resultstore-webhook"
DEFAULT_WEBHOOK_CONFIG_NAME = "resultstore-injector"
DEFAULT_WEBHOOK_SERVICE = "resultstore-webhook"
DEFAULT_WEBHOOK_TLS_SECRET = "resultstore-webhook-tls"
#: Namespaces the webhook never mutates, whatever the settings say.
ALWAYS_EXCLUDED = ("kube-system",)


@dataclass(frozen=True)
class ServiceRef:
    """Where the API server reaches the webhook in-cluster (a Service in front of the operator)."""

    namespace: str
    name: str = DEFAULT_WEBHOOK_SERVICE
    port: int = 443
    path: str = WEBHOOK_PATH


@dataclass(frozen=True)
class WebhookSettings:
    """Webhook settings, parsed once at start-up with the operator's (`OperatorSettings.webhook`).

    ``url`` set (``RESULTSTORE_WEBHOOK_URL``, e.g. ``https://127.0.0.1:9443/mutate-pods``)
    selects URL mode for local control planes; otherwise the configuration points at the
    Service ``service_name`` in ``operator_namespace``. ``cert_file``/``key_file`` set selects
    externally managed certificates (cert-manager); otherwise a self-signed CA is kept in the
    Secret ``tls_secret``. ``manage_config`` false leaves the configuration to the installer.
    """

    operator_namespace: str = "resultstore-system"
    enabled: bool = True
    listen_host: str = "0.0.0.0"
    listen_port: int = 9443
    config_name: str = DEFAULT_WEBHOOK_CONFIG_NAME
    manage_config: bool = True
    url: str | None = None
    service_name: str = DEFAULT_WEBHOOK_SERVICE
    service_port: int = 443
    tls_secret: str = DEFAULT_WEBHOOK_TLS_SECRET
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    cert_dir: str | None = None
    timeout_seconds: int = 5
    lookup_timeout: float = 2.0
    excluded_namespaces: tuple[str, ...] = ()
    resync_interval: float = 300.0
    event_dedup_seconds: float = 60.0
    #: Distinct (namespace, store, reason) Event aggregates kept in memory (oldest dropped).
    event_cache_size: int = 1024
    #: PEM CA file; when set, callers must present a client certificate it signed (mutual
    #: TLS: configure the API server's AdmissionConfiguration kubeConfigFile to send one).
    client_ca_file: str | None = None
    #: Events' ``reportingInstance``: the pod's name (``HOSTNAME``), read once at start-up.
    instance: str = WEBHOOK_COMPONENT

    @classmethod
    def from_env(cls, env: Mapping[str, str], operator_namespace: str) -> WebhookSettings:
        """Parse ``RESULTSTORE_WEBHOOK_*`` (and ``HOSTNAME``) from the start-up snapshot."""
        p = ENV_PREFIX + "WEBHOOK_"
        url = env_text(env, p + "URL")
        if url is not None:
            parsed = urllib.parse.urlsplit(url)
            if parsed.scheme != "https" or not parsed.hostname:
                raise SettingsError(f"{p}URL must be an https:// URL, got {url!r}")
        cert_file, key_file = env_text(env, p + "CERT_FILE"), env_text(env, p + "KEY_FILE")
        if (cert_file is None) != (key_file is None):
            raise SettingsError(f"{p}CERT_FILE and {p}KEY_FILE go together")
        timeout = int(env_float(env, p + "TIMEOUT_SECONDS", cls.timeout_seconds, 1, 30))
        return cls(
            operator_namespace=operator_namespace,
            enabled=env_flag(env, p + "ENABLED", cls.enabled),
            listen_host=env_text(env, p + "HOST") or cls.listen_host,
            listen_port=int(env_float(env, p + "PORT", cls.listen_port, 1, 65535)),
            config_name=env_text(env, p + "CONFIG_NAME") or cls.config_name,
            manage_config=env_flag(env, p + "MANAGE_CONFIG", cls.manage_config),
            url=url,
            service_name=env_text(env, p + "SERVICE_NAME") or cls.service_name,
            service_port=int(env_float(env, p + "SERVICE_PORT", cls.service_port, 1, 65535)),
            tls_secret=env_text(env, p + "TLS_SECRET") or cls.tls_secret,
            cert_file=cert_file,
            key_file=key_file,
            ca_file=env_text(env, p + "CA_FILE"),
            cert_dir=env_text(env, p + "CERT_DIR"),
            timeout_seconds=timeout,
            # Leave a margin inside the API server's timeout for the reply itself.
            lookup_timeout=env_float(env, p + "LOOKUP_TIMEOUT", min(2.0, timeout * 0.6),
                                     0.1, 30),
            excluded_namespaces=env_list(env, p + "EXCLUDED_NAMESPACES"),
            resync_interval=env_float(env, p + "RESYNC_INTERVAL", cls.resync_interval, 1,
                                      86400),
            event_dedup_seconds=env_float(env, p + "EVENT_DEDUP_SECONDS",
                                          cls.event_dedup_seconds, 0, 86400),
            event_cache_size=int(env_float(env, p + "EVENT_CACHE_SIZE", cls.event_cache_size,
                                           1, 1_000_000)),
            client_ca_file=env_text(env, p + "CLIENT_CA_FILE"),
            instance=(env_text(env, "HOSTNAME") or WEBHOOK_COMPONENT)[:128],
        )

    @property
    def external_certs(self) -> bool:
        return self.cert_file is not None

    @property
    def excluded(self) -> frozenset[str]:
        """Namespaces never mutated: kube-system, the operator's own, and any configured."""
        return frozenset((*ALWAYS_EXCLUDED, self.operator_namespace, *self.excluded_namespaces))

    def service_ref(self) -> ServiceRef | None:
        if self.url is not None:
            return None
        return ServiceRef(self.operator_namespace, self.service_name, self.service_port)


# --- leader election (docs/ARCHITECTURE.md, "Leadership") ------------------------------------

DEFAULT_LEASE_NAME = "resultstore-operator-leader"


@dataclass(frozen=True)
class LeaderSettings:
    """The Lease that elects the one reconciling replica (`OperatorSettings.leader`).

    Off by default for the binary (one developer process needs no Lease and no RBAC for it);
    the manifests and the chart turn it on. `identity` is the pod's name (downward API
    `POD_NAME`, else the hostname) plus a random suffix drawn once at start-up, so a
    restarted container never takes its predecessor's record for its own.
    """

    enabled: bool = False
    namespace: str = "resultstore-system"
    lease_name: str = DEFAULT_LEASE_NAME
    identity: str = "resultstore-operator"
    lease_duration: float = 10.0
    renew_deadline: float = 6.0
    retry_period: float = 2.0

    @classmethod
    def from_env(cls, env: Mapping[str, str], operator_namespace: str) -> LeaderSettings:
        p = ENV_PREFIX
        lease_duration = env_float(env, p + "LEASE_DURATION", cls.lease_duration, 1, 3600)
        renew_deadline = env_float(env, p + "RENEW_DEADLINE", cls.renew_deadline, 0.5, 3600)
        retry_period = env_float(env, p + "RETRY_PERIOD", cls.retry_period, 0.1, 3600)
        if not retry_period < renew_deadline < lease_duration:
            raise SettingsError(
                f"{p}RETRY_PERIOD < {p}RENEW_DEADLINE < {p}LEASE_DURATION is required "
                f"(got {retry_period:g} / {renew_deadline:g} / {lease_duration:g}): the leader "
                "must stop acting before a standby may start")
        base = (env_text(env, "POD_NAME") or env_text(env, "HOSTNAME")
                or socket.gethostname() or "resultstore-operator")
        lease_name = env_text(env, p + "LEASE_NAME") or cls.lease_name
        return cls(
            enabled=env_flag(env, p + "LEADER_ELECTION", cls.enabled),
            namespace=operator_namespace,
            lease_name=lease_name,
            identity=f"{base[:100]}_{secrets.token_hex(4)}",
            lease_duration=lease_duration,
            renew_deadline=renew_deadline,
            retry_period=retry_period,
        )


# --- the operator ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatorSettings:
    """Everything the operator needs to know about its environment.

    `namespaces` empty means cluster-wide. Intervals are seconds. `webhook` is the injection
    webhook's part, parsed from the same environment at the same moment (no part of the
    operator reads the environment later).
    """

    namespaces: tuple[str, ...] = ()
    operator_namespace: str = "resultstore-system"
    tick_interval: float = 5.0
    drift_interval: float = 60.0
    #: Seconds after a Secret switch during which an idle previous role is kept anyway: a
    #: kubelet refreshes a mounted Secret on its pod resync, its sync period (60 s) with up to
    #: 50 % jitter, so up to ~90 s; measured on a real kubelet: 62-85 s (docs/CONTROLPLANE.md).
    #: 120 s leaves 30 s above the worst case (90 s left under 10 s in one measured run).
    rotation_grace: float = 120.0
    retry_backoff_base: float = 2.0
    retry_backoff_max: float = 300.0
    #: The cleanup CronJobs' default image: the operator's own (the chart and manifests set
    #: it from the operator's image), so a store needs no image to be trusted.
    cleanup_image: str = "celery-resultstore:0.1.0"
    cleanup_image_pull_policy: str = "IfNotPresent"
    #: Images a ResultStore may name in spec.cleanupJob.image besides the default: exact
    #: references, or `<repository>:*` for any tag / digest of one repository. Empty (the
    #: default) means only the default image: creating a ResultStore must not become
    #: "run any image in this namespace".
    cleanup_image_allowlist: tuple[str, ...] = ()
    #: Whether spec.cleanupJob.serviceAccountName is honoured. Off by default: the cleanup
    #: pod needs no API access (its token is not even mounted), and naming a ServiceAccount
    #: would let a store's author run with that account's permissions.
    cleanup_allow_service_account: bool = False
    #: Whether spec.cleanupJob.hostNetwork is honoured. Off by default: a hostNetwork pod
    #: shares the node's network namespace (its loopback services and interfaces, outside
    #: the namespace's NetworkPolicies), which creating a ResultStore must not grant.
    cleanup_allow_host_network: bool = False
    health_address: str = "0.0.0.0:8080"
    #: host:port of the Prometheus endpoint; empty disables it (the chart sets it when
    #: metrics.enabled). Validated at start-up, like every other setting.
    metrics_address: str = ""
    metrics_path: str = "/metrics"
    workers: int = 16
    db_connect_timeout: int = 5
    log_level: str = "INFO"
    #: The injection webhook's settings (RESULTSTORE_WEBHOOK_*), parsed with the rest.
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    #: Leader election (RESULTSTORE_LEADER_ELECTION, _LEASE_*, POD_NAME).
    leader: LeaderSettings = field(default_factory=LeaderSettings)

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @property
    def standalone(self) -> bool:
        """Kopf never peers: leader election is ours (`leader`), so Kopf runs standalone."""
        return True

    @property
    def liveness_endpoint(self) -> str | None:
        if not self.health_address:
            return None
        return f"http://{self.health_address}/healthz"

    @property
    def metrics_listen(self) -> tuple[str, int] | None:
        """(host, port) of the metrics endpoint, or None when disabled."""
        return parse_listen_address(ENV_PREFIX + "METRICS_ADDRESS", self.metrics_address)

    def backoff(self, failures: int) -> float:
        """Exponential retry delay after `failures` consecutive failures (>= 1)."""
        exponent = max(0, failures - 1)
        delay = self.retry_backoff_base * (2 ** min(exponent, 30))
        return float(min(self.retry_backoff_max, delay))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        """Parse settings from an environment mapping (os.environ by default)."""
        env = os.environ if env is None else env
        p = ENV_PREFIX
        namespaces = env_list(env, p + "WATCH_NAMESPACES")
        operator_namespace = (
            env.get(p + "OPERATOR_NAMESPACE", "").strip()
            or env.get("POD_NAMESPACE", "").strip()
            or cls.operator_namespace
        )
        pull_policy = env.get(p + "CLEANUP_IMAGE_PULL_POLICY", "").strip() or "IfNotPresent"
        if pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise SettingsError(
                f"{p}CLEANUP_IMAGE_PULL_POLICY must be Always, IfNotPresent or Never"
            )
        if env_text(env, p + "PEERING"):
            raise SettingsError(f"{p}PEERING: Kopf peering is not supported (equal priorities "
                                f"freeze every replica); use {p}LEADER_ELECTION=true")
        metrics_address = env.get(p + "METRICS_ADDRESS", "").strip()
        parse_listen_address(p + "METRICS_ADDRESS", metrics_address)
        metrics_path = env.get(p + "METRICS_PATH", "").strip() or cls.metrics_path
        if not metrics_path.startswith("/") or any(ch.isspace() for ch in metrics_path):
            raise SettingsError(f"{p}METRICS_PATH must be a path starting with /")
        return cls(
            namespaces=namespaces,
            operator_namespace=operator_namespace,
            tick_interval=env_float(env, p + "TICK_INTERVAL", cls.tick_interval, 0.2),
            drift_interval=env_float(env, p + "DRIFT_INTERVAL", cls.drift_interval, 0.5),
            rotation_grace=env_float(env, p + "ROTATION_GRACE", cls.rotation_grace, 0.0),
            retry_backoff_base=env_float(env, p + "RETRY_BACKOFF_BASE", cls.retry_backoff_base,
                                         0.1),
            retry_backoff_max=env_float(env, p + "RETRY_BACKOFF_MAX", cls.retry_backoff_max, 0.1),
            cleanup_image=env.get(p + "CLEANUP_IMAGE", "").strip() or cls.cleanup_image,
            cleanup_image_pull_policy=pull_policy,
            cleanup_image_allowlist=parse_image_allowlist(
                p + "CLEANUP_IMAGE_ALLOWLIST", env.get(p + "CLEANUP_IMAGE_ALLOWLIST", "")),
            cleanup_allow_service_account=env_flag(
                env, p + "CLEANUP_ALLOW_SERVICE_ACCOUNT", cls.cleanup_allow_service_account),
            cleanup_allow_host_network=env_flag(
                env, p + "CLEANUP_ALLOW_HOST_NETWORK", cls.cleanup_allow_host_network),
            health_address=env.get(p + "HEALTH_ADDRESS", cls.health_address).strip(),
            metrics_address=metrics_address,
            metrics_path=metrics_path,
            workers=env_int(env, p + "WORKERS", cls.workers, 1),
            db_connect_timeout=env_int(env, p + "DB_CONNECT_TIMEOUT", cls.db_connect_timeout, 1),
            log_level=(env.get(p + "LOG_LEVEL", "").strip() or cls.log_level).upper(),
            webhook=WebhookSettings.from_env(env, operator_namespace),
            leader=LeaderSettings.from_env(env, operator_namespace),
        )

    def with_overrides(self, **changes: object) -> OperatorSettings:
        """A copy with command-line overrides applied (still frozen)."""
        from dataclasses import replace

        return replace(self, **changes)  # type: ignore[arg-type]

