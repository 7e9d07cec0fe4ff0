"""Prometheus metrics of the operator, served over HTTP inside the Kopf event loop.

Why its own module and registry: handlers and the webhook only call the small ``record_*`` /
``observe_*`` functions below, so instrumentation stays one line at each call site and the
builders stay pure. A private :class:`CollectorRegistry` (not prometheus_client's global one)
keeps library defaults (process/GC collectors of whatever imported prometheus_client first)
out of our exposition and lets unit tests build a fresh :class:`OperatorMetrics` each time.

Why aiohttp in the Kopf loop rather than prometheus_client's threaded server: aiohttp is
already the webhook's server, every replica serves it beside the webhook and the health
endpoints (main.Replica starts and stops them, leader or not), and a bind failure stops the
operator at start-up.

Why one module: the metric set, the store gauges computed from the status and the
/metrics server share one private registry; callers only ever see the record_*/observe_*
functions, and a second module would have to reach into that registry.

Labels are low-cardinality by construction: handler ids, outcomes and reasons come from fixed
sets; only the per-store gauges carry namespace and store names (one series per store, never
anything from a Secret).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .builders import reasons as r
from .builders import rotation as rot
from .httpserver import AppServer
from .spec import SpecError
from .views import condition, meta, section

log = logging.getLogger("resultstore.metrics")

# --- fixed label values ---------------------------------------------------------------------

SUCCESS = "success"
TEMPORARY_ERROR = "temporary_error"
PERMANENT_ERROR = "permanent_error"
OUTCOMES = (SUCCESS, TEMPORARY_ERROR, PERMANENT_ERROR)

#: Kopf handler ids that reconcile or finalise a store ("timer" is the per-store tick).
HANDLERS = ("create", "resume", "spec", "rotate", "timer", "finalize")

MUTATED = "mutated"
UNCHANGED = "unchanged"
ERROR = "error"
ADMISSION_OUTCOMES = (MUTATED, UNCHANGED, ERROR)

ROTATION_TRIGGERS = ("requested", "scheduled")
READY_STATUSES = ("True", "False", "Unknown")
UNEXPECTED = "Unexpected"

RECONCILE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ADMISSION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def classify(exc: BaseException | None) -> str:
    """The outcome label of a reconcile that ended with `exc` (None: it succeeded).

    An invalid spec is permanent (not retried until the spec changes); everything else that
    the operator catches is retried with backoff, hence temporary.
    """
    if exc is None:
        return SUCCESS
    if isinstance(exc, SpecError):
        return PERMANENT_ERROR
    try:
        import kopf
    except ModuleNotFoundError:  # pragma: no cover - kopf ships with the operator extra
        return TEMPORARY_ERROR
    if isinstance(exc, kopf.PermanentError):
        return PERMANENT_ERROR
    return TEMPORARY_ERROR


def error_reason(exc: BaseException) -> str:
    """The condition reason of a failure (a fixed vocabulary), for the errors counter."""
    if isinstance(exc, SpecError):
        return r.INVALID_SPEC
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason.isidentifier() and len(reason) <= 64:
        return reason
    from .kube import KubeError

    if isinstance(exc, KubeError):
        return r.KUBERNETES_ERROR
    return UNEXPECTED


# --- what a store's status says ---------------------------------------------------------------


@dataclass(frozen=True)
class StoreSnapshot:
    """The parts of a ResultStore's status that the gauges report (pure data)."""

    namespace: str
    name: str
    ready: str = "Unknown"
    rotating: bool = False
    cleanup_succeeded: bool | None = None
    cleanup_finished: float | None = None
    #: status.connections (builders.connections): sessions of the store's roles, and
    #: spec.connections.limit as the operator last reported it (None: not reported / none)
    connections_in_use: int | None = None
    connection_limit: int | None = None


def _epoch(text: Any) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def snapshot_of(body: Mapping[str, Any]) -> StoreSnapshot:
    """Read a ResultStore object (as the API returns it) into a :class:`StoreSnapshot`."""
    m = meta(body)
    status = section(body, "status")
    ready_condition = condition(body, r.READY)
    ready = "Unknown"
    if ready_condition is not None:
        value = ready_condition.get("status")
        ready = value if value in READY_STATUSES else "Unknown"
    phase = section(status, "credentials").get("phase")
    cleanup = section(status, "lastCleanup")
    succeeded = cleanup.get("succeeded")
    connections = section(status, "connections")
    return StoreSnapshot(
        namespace=m.namespace,
        name=m.name,
        ready=ready,
        rotating=phase in (rot.ROTATING, rot.DRAINING),
        cleanup_succeeded=succeeded if isinstance(succeeded, bool) else None,
        cleanup_finished=_epoch(cleanup.get("finishedAt") or cleanup.get("startedAt")),
        connections_in_use=_count(connections.get("inUse")),
        connection_limit=_count(connections.get("limit")),
    )


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class StoreCollector(Collector):
    """Gauges computed at scrape time from the last status seen of every store.

    Fed by a Kopf event handler (every watch event carries the whole object), so the gauges
    follow the API, including stores whose reconcile never ran in this process. The last
    successful cleanup time is kept across a later failed run (the status reports only the
    last run); it is lost on restart until the next successful run is reported.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stores: dict[tuple[str, str], StoreSnapshot] = {}
        self._last_success: dict[tuple[str, str], float] = {}

    def observe(self, snap: StoreSnapshot) -> None:
        key = (snap.namespace, snap.name)
        with self._lock:
            self._stores[key] = snap
            if snap.cleanup_succeeded and snap.cleanup_finished is not None:
                previous = self._last_success.get(key, 0.0)
                self._last_success[key] = max(previous, snap.cleanup_finished)

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._stores.pop((namespace, name), None)
            self._last_success.pop((namespace, name), None)

    def describe(self) -> Iterable[Metric]:
        return self._families(())

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            stores = list(self._stores.values())
            last_success = dict(self._last_success)
        return self._families(stores, last_success)

    @staticmethod
    def _families(stores: Iterable[StoreSnapshot],
                  last_success: Mapping[tuple[str, str], float] | None = None
                  ) -> Iterator[Metric]:
        last_success = last_success or {}
        counts = GaugeMetricFamily(
            "resultstore_stores", "ResultStores by namespace and Ready condition status "
            "(Unknown: no Ready condition yet).", labels=["namespace", "ready"])
        ready = GaugeMetricFamily(
            "resultstore_store_ready", "1 when the store's Ready condition is True, else 0.",
            labels=["namespace", "resultstore"])
        rotating = GaugeMetricFamily(
            "resultstore_credential_rotations_in_progress",
            "Stores whose credential rotation is in progress (Rotating or Draining).",
            labels=["namespace"])
        cleanup_ok = GaugeMetricFamily(
            "resultstore_cleanup_last_run_succeeded",
            "1 when the last cleanup run reported in the store's status succeeded, else 0.",
            labels=["namespace", "resultstore"])
        cleanup_ts = GaugeMetricFamily(
            "resultstore_cleanup_last_success_timestamp_seconds",
            "When the last successful cleanup run seen by this operator finished (Unix time).",
            labels=["namespace", "resultstore"])
        in_use = GaugeMetricFamily(
            "resultstore_connections_in_use",
            "PostgreSQL sessions of the store's login roles at the operator's last check "
            "(pg_stat_activity).", labels=["namespace", "resultstore"])
        limit = GaugeMetricFamily(
            "resultstore_connection_limit",
            "The store roles' CONNECTION LIMIT (spec.connections.limit); absent when the "
            "store sets none.", labels=["namespace", "resultstore"])
        per_ns: dict[str, dict[str, int]] = {}
        rotating_ns: dict[str, int] = {}
        for snap in sorted(stores, key=lambda s: (s.namespace, s.name)):
            tally = per_ns.setdefault(snap.namespace, dict.fromkeys(READY_STATUSES, 0))
            tally[snap.ready] += 1
            rotating_ns[snap.namespace] = rotating_ns.get(snap.namespace, 0) + snap.rotating
            ready.add_metric([snap.namespace, snap.name], 1.0 if snap.ready == "True" else 0.0)
            if snap.cleanup_succeeded is not None:
                cleanup_ok.add_metric([snap.namespace, snap.name],
                                      1.0 if snap.cleanup_succeeded else 0.0)
            when = last_success.get((snap.namespace, snap.name))
            if when is not None:
                cleanup_ts.add_metric([snap.namespace, snap.name], when)
            if snap.connections_in_use is not None:
                in_use.add_metric([snap.namespace, snap.name], float(snap.connections_in_use))
            if snap.connection_limit is not None:
                limit.add_metric([snap.namespace, snap.name], float(snap.connection_limit))
        for namespace, tally in per_ns.items():
            for status, count in tally.items():
                counts.add_metric([namespace, status], float(count))
        for namespace, count in rotating_ns.items():
            rotating.add_metric([namespace], float(count))
        yield from (counts, ready, rotating, cleanup_ok, cleanup_ts, in_use, limit)


# --- the metric set ----------------------------------------------------------------------------


class OperatorMetrics:
    """Every metric of one operator process, on a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.reconciliations = Counter(
            "resultstore_reconciliations", "Reconciles and finalisations by Kopf handler and "
            "outcome (success, temporary_error: retried with backoff, permanent_error: "
            "invalid spec, not retried until edited).", ["handler", "outcome"], registry=reg)
        self.reconcile_duration = Histogram(
            "resultstore_reconcile_duration_seconds", "Duration of reconciles and "
            "finalisations by handler and outcome.", ["handler", "outcome"],
            buckets=RECONCILE_BUCKETS, registry=reg)
        self.reconcile_errors = Counter(
            "resultstore_reconcile_errors", "Failed reconciles by condition reason "
            "(AdminAuthFailed, DatabaseUnreachable, InvalidSpec, ...).", ["reason"],
            registry=reg)
        self.rotations_started = Counter(
            "resultstore_credential_rotations_started", "Credential rotations started, by "
            "trigger (requested: annotation, scheduled: rotateEvery).", ["trigger"],
            registry=reg)
        self.rotations_completed = Counter(
            "resultstore_credential_rotations_completed",
            "Credential rotations completed (previous role removed).", registry=reg)
        self.admissions = Counter(
            "resultstore_webhook_admission_requests", "Pod admission requests answered by the "
            "injection webhook, by outcome (mutated, unchanged, error: admitted unchanged "
            "after an internal error or a malformed review).", ["outcome"], registry=reg)
        self.admission_duration = Histogram(
            "resultstore_webhook_admission_duration_seconds",
            "Time to answer a pod admission request, by outcome.", ["outcome"],
            buckets=ADMISSION_BUCKETS, registry=reg)
        self.stores = StoreCollector()
        reg.register(self.stores)
        # Series exist from the start, so rate() and absence alerts work before the first
        # error or rotation.
        for handler in HANDLERS:
            for outcome in OUTCOMES:
                self.reconciliations.labels(handler, outcome)
        for trigger in ROTATION_TRIGGERS:
            self.rotations_started.labels(trigger)
        for outcome in ADMISSION_OUTCOMES:
            self.admissions.labels(outcome)

    def record_reconcile(self, handler: str, exc: BaseException | None,
                         seconds: float) -> str:
        outcome = classify(exc)
        self.reconciliations.labels(handler, outcome).inc()
        self.reconcile_duration.labels(handler, outcome).observe(max(0.0, seconds))
        if exc is not None:
            self.reconcile_errors.labels(error_reason(exc)).inc()
        return outcome

    def record_admission(self, outcome: str, seconds: float) -> None:
        self.admissions.labels(outcome).inc()
        self.admission_duration.labels(outcome).observe(max(0.0, seconds))

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition (text format, or OpenMetrics when the scraper asks) and its type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


#: The process-wide instance the call sites below report to.
METRICS = OperatorMetrics()


def record_reconcile(handler: str, exc: BaseException | None, seconds: float) -> str:
    """Count one reconcile/finalisation; returns the outcome label."""
    return METRICS.record_reconcile(handler, exc, seconds)


def record_rotation_started(trigger: str) -> None:
    METRICS.rotations_started.labels(
        trigger if trigger in ROTATION_TRIGGERS else "scheduled").inc()


def record_rotation_completed() -> None:
    METRICS.rotations_completed.inc()


def record_admission(outcome: str, seconds: float) -> None:
    METRICS.record_admission(outcome, seconds)


def observe_store(body: Mapping[str, Any], event_type: str | None) -> None:
    """Feed a watch event of a ResultStore into the gauges (DELETED forgets the store)."""
    snap = snapshot_of(body)
    if not snap.namespace or not snap.name:
        return
    if event_type == "DELETED":
        METRICS.stores.forget(snap.namespace, snap.name)
    else:
        METRICS.stores.observe(snap)


# --- the HTTP endpoint ---------------------------------------------------------------------------


class MetricsServer:
    """GET <path> -> the exposition of `metrics`; nothing else is served."""

    def __init__(self, metrics: OperatorMetrics, host: str, port: int,
                 path: str = "/metrics") -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self.path = path
        self._server = AppServer()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(self.path, self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.render(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def start(self) -> None:
        await self._server.start(self.app(), self.host, self.port)
        log.info("metrics serving on http://%s:%d%s", self.host, self.port, self.path)

    async def stop(self) -> None:
        await self._server.stop()

