"""Operator settings, read once from the environment at start-up.

Why a frozen dataclass: handlers run for months; reading the environment in a hot path
would let a half-applied change of the Deployment produce an operator that behaves
differently per handler. Everything tunable lives here and is fixed for the process life.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

ENV_PREFIX = "RESULTSTORE_"


class SettingsError(ValueError):
    """A malformed operator setting (names the variable, never echoes secret values)."""


def _int(env: Mapping[str, str], key: str, default: int, minimum: int = 0) -> int:
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


def _float(env: Mapping[str, str], key: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise SettingsError(f"{key} must be a number, got {raw!r}") from exc
    if value < minimum:
        raise SettingsError(f"{key} must be >= {minimum}, got {value}")
    return value


def _flag(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = env.get(key, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{key} must be true or false, got {raw!r}")


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


@dataclass(frozen=True)
class OperatorSettings:
    """Everything the operator needs to know about its environment.

    `namespaces` empty means cluster-wide. Intervals are seconds. `raw` is a read-only
    snapshot of every RESULTSTORE_* variable so that optional modules (the webhook) can parse
    their own settings from the same start-up snapshot instead of reading os.environ later.
    """

    namespaces: tuple[str, ...] = ()
    operator_namespace: str = "resultstore-system"
    tick_interval: float = 5.0
    drift_interval: float = 60.0
    #: Seconds after a Secret switch during which an idle previous role is kept anyway:
    #: the kubelet needs up to its sync period (60 s) plus cache TTL to refresh volumes.
    rotation_grace: float = 90.0
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
    health_address: str = "0.0.0.0:8080"
    #: host:port of the Prometheus endpoint; empty disables it (the chart sets it when
    #: metrics.enabled). Validated at start-up, like every other setting.
    metrics_address: str = ""
    metrics_path: str = "/metrics"
    peering_name: str = ""
    workers: int = 16
    db_connect_timeout: int = 5
    log_level: str = "INFO"
    raw: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @property
    def standalone(self) -> bool:
        """Without a peering name the operator runs standalone (one replica, Recreate)."""
        return not self.peering_name

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
        namespaces = tuple(
            ns.strip() for ns in env.get(p + "WATCH_NAMESPACES", "").split(",") if ns.strip()
        )
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
        metrics_address = env.get(p + "METRICS_ADDRESS", "").strip()
        parse_listen_address(p + "METRICS_ADDRESS", metrics_address)
        metrics_path = env.get(p + "METRICS_PATH", "").strip() or cls.metrics_path
        if not metrics_path.startswith("/") or any(ch.isspace() for ch in metrics_path):
            raise SettingsError(f"{p}METRICS_PATH must be a path starting with /")
        # the pod's name too: Events say which replica reported them
        snapshot = {k: v for k, v in env.items() if k.startswith(p) or k == "HOSTNAME"}
        return cls(
            namespaces=namespaces,
            operator_namespace=operator_namespace,
            tick_interval=_float(env, p + "TICK_INTERVAL", cls.tick_interval, 0.2),
            drift_interval=_float(env, p + "DRIFT_INTERVAL", cls.drift_interval, 0.5),
            rotation_grace=_float(env, p + "ROTATION_GRACE", cls.rotation_grace, 0.0),
            retry_backoff_base=_float(env, p + "RETRY_BACKOFF_BASE", cls.retry_backoff_base, 0.1),
            retry_backoff_max=_float(env, p + "RETRY_BACKOFF_MAX", cls.retry_backoff_max, 0.1),
            cleanup_image=env.get(p + "CLEANUP_IMAGE", "").strip() or cls.cleanup_image,
            cleanup_image_pull_policy=pull_policy,
            cleanup_image_allowlist=parse_image_allowlist(
                p + "CLEANUP_IMAGE_ALLOWLIST", env.get(p + "CLEANUP_IMAGE_ALLOWLIST", "")),
            cleanup_allow_service_account=_flag(
                env, p + "CLEANUP_ALLOW_SERVICE_ACCOUNT", cls.cleanup_allow_service_account),
            health_address=env.get(p + "HEALTH_ADDRESS", cls.health_address).strip(),
            metrics_address=metrics_address,
            metrics_path=metrics_path,
            peering_name=env.get(p + "PEERING", "").strip(),
            workers=_int(env, p + "WORKERS", cls.workers, 1),
            db_connect_timeout=_int(env, p + "DB_CONNECT_TIMEOUT", cls.db_connect_timeout, 1),
            log_level=(env.get(p + "LOG_LEVEL", "").strip() or cls.log_level).upper(),
            raw=MappingProxyType(snapshot),
        )

    def with_overrides(self, **changes: object) -> OperatorSettings:
        """A copy with command-line overrides applied (still frozen)."""
        from dataclasses import replace

        return replace(self, **changes)  # type: ignore[arg-type]

