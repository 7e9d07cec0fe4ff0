"""The pod-injection mutating admission webhook, served by the operator process over TLS.

Why we serve it ourselves (aiohttp, which Kopf already depends on) instead of Kopf's managed
admission: the MutatingWebhookConfiguration must have exact properties (failurePolicy Ignore,
an objectSelector on the inject label, a namespaceSelector excluding kube-system and the
operator's namespace, a 5 s timeout, reinvocation) and a caBundle that survives restarts;
Kopf's managed mode fixes a 30 s timeout, no namespaceSelector and a fresh CA per start.

Layers, as everywhere in the operator:

* pure: :func:`build_webhook_configuration` (reused by manifests/ and the chart),
  :class:`AdmissionRequest` parsing, :func:`review_response`, :func:`store_lookup_from_object`,
  :func:`build_event`, and the patch itself in :mod:`resultstore_operator.injection`;
* I/O: :class:`KubeGateway` (read a ResultStore, post an Event, apply the configuration,
  keep the TLS Secret), :class:`InjectionServer` (the HTTPS endpoint) and
  :class:`WebhookRuntime` (start-up, resync, shutdown);
* wiring: :func:`register` adds a Kopf startup/cleanup/probe handler to a registry so the
  webhook runs inside ``resultstore-operator``.

The webhook never refuses a pod: every failure path answers ``allowed: true`` without a patch,
with an admission warning and (when the user must act) an Event.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import ssl
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import metrics
from .injection import (
    INJECT_LABEL,
    InjectionPlan,
    StoreLookup,
    StoreState,
    plan_injection,
    requested_store,
)
from .kube import new_api_client
from .webhook_tls import (
    ServingNames,
    TlsBundle,
    ca_bundle_b64,
    ensure_tls_secret,
    read_bundle_files,
    service_names,
    write_bundle_files,
)

log = logging.getLogger("resultstore.webhook")

WEBHOOK_PATH = "/mutate-pods"
HEALTH_PATH = "/healthz"
WEBHOOK_NAME = "inject.resultstore.dev"
DEFAULT_CONFIG_NAME = "resultstore-injector"
DEFAULT_SERVICE_NAME = "resultstore-webhook"
DEFAULT_TLS_SECRET = "resultstore-webhook-tls"
ALWAYS_EXCLUDED = ("kube-system",)
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
COMPONENT = "resultstore-webhook"

GROUP = "resultstore.dev"
VERSION = "v1alpha1"
PLURAL = "resultstores"


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class WebhookSettingsError(ValueError):
    """A malformed RESULTSTORE_WEBHOOK_* variable (names the variable)."""


def _bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = env.get(key, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise WebhookSettingsError(f"{key} must be true or false, got {raw!r}")


def _number(env: Mapping[str, str], key: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise WebhookSettingsError(f"{key} must be a number, got {raw!r}") from exc
    if not lo <= value <= hi:
        raise WebhookSettingsError(f"{key} must be within [{lo}, {hi}], got {value}")
    return value


@dataclass(frozen=True)
class ServiceRef:
    """Where the API server reaches the webhook in-cluster (a Service in front of the operator)."""

    namespace: str
    name: str = DEFAULT_SERVICE_NAME
    port: int = 443
    path: str = WEBHOOK_PATH


@dataclass(frozen=True)
class WebhookSettings:
    """Webhook settings, parsed once at start-up from the operator's RESULTSTORE_* snapshot.

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
    config_name: str = DEFAULT_CONFIG_NAME
    manage_config: bool = True
    url: str | None = None
    service_name: str = DEFAULT_SERVICE_NAME
    service_port: int = 443
    tls_secret: str = DEFAULT_TLS_SECRET
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    cert_dir: str | None = None
    timeout_seconds: int = 5
    lookup_timeout: float = 2.0
    excluded_namespaces: tuple[str, ...] = ()
    resync_interval: float = 300.0
    event_dedup_seconds: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str], operator_namespace: str) -> WebhookSettings:
        """Parse ``RESULTSTORE_WEBHOOK_*`` from ``env`` (the operator's start-up snapshot)."""
        p = "RESULTSTORE_WEBHOOK_"

        def text(key: str) -> str | None:
            value = env.get(p + key, "").strip()
            return value or None

        url = text("URL")
        if url is not None:
            parsed = urllib.parse.urlsplit(url)
            if parsed.scheme != "https" or not parsed.hostname:
                raise WebhookSettingsError(f"{p}URL must be an https:// URL, got {url!r}")
        cert_file, key_file = text("CERT_FILE"), text("KEY_FILE")
        if (cert_file is None) != (key_file is None):
            raise WebhookSettingsError(f"{p}CERT_FILE and {p}KEY_FILE go together")
        timeout = int(_number(env, p + "TIMEOUT_SECONDS", cls.timeout_seconds, 1, 30))
        return cls(
            operator_namespace=operator_namespace,
            enabled=_bool(env, p + "ENABLED", cls.enabled),
            listen_host=text("HOST") or cls.listen_host,
            listen_port=int(_number(env, p + "PORT", cls.listen_port, 1, 65535)),
            config_name=text("CONFIG_NAME") or cls.config_name,
            manage_config=_bool(env, p + "MANAGE_CONFIG", cls.manage_config),
            url=url,
            service_name=text("SERVICE_NAME") or cls.service_name,
            service_port=int(_number(env, p + "SERVICE_PORT", cls.service_port, 1, 65535)),
            tls_secret=text("TLS_SECRET") or cls.tls_secret,
            cert_file=cert_file,
            key_file=key_file,
            ca_file=text("CA_FILE"),
            cert_dir=text("CERT_DIR"),
            timeout_seconds=timeout,
            # Leave a margin inside the API server's timeout for the reply itself.
            lookup_timeout=_number(env, p + "LOOKUP_TIMEOUT", min(2.0, timeout * 0.6), 0.1, 30),
            excluded_namespaces=tuple(
                n.strip() for n in env.get(p + "EXCLUDED_NAMESPACES", "").split(",") if n.strip()
            ),
            resync_interval=_number(env, p + "RESYNC_INTERVAL", cls.resync_interval, 1, 86400),
            event_dedup_seconds=_number(
                env, p + "EVENT_DEDUP_SECONDS", cls.event_dedup_seconds, 0, 86400),
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

    def serving_names(self) -> ServingNames:
        """The names the serving certificate must cover for this clientConfig."""
        if self.url is not None:
            host = urllib.parse.urlsplit(self.url).hostname or ""
            try:
                import ipaddress

                ipaddress.ip_address(host)
                return ServingNames(ips=(host,))
            except ValueError:
                return ServingNames(dns=(host,))
        return ServingNames(dns=service_names(self.service_name, self.operator_namespace))

    def configuration(self, ca_bundle: str | None) -> dict[str, Any]:
        return build_webhook_configuration(
            name=self.config_name,
            operator_namespace=self.operator_namespace,
            url=self.url,
            service=self.service_ref(),
            ca_bundle=ca_bundle,
            timeout_seconds=self.timeout_seconds,
            excluded_namespaces=self.excluded_namespaces,
        )


# --------------------------------------------------------------------------------------------
# Pure builders
# --------------------------------------------------------------------------------------------


def build_webhook_configuration(
    *,
    operator_namespace: str,
    name: str = DEFAULT_CONFIG_NAME,
    url: str | None = None,
    service: ServiceRef | None = None,
    ca_bundle: str | None = None,
    timeout_seconds: int = 5,
    excluded_namespaces: Sequence[str] = (),
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The MutatingWebhookConfiguration for pod injection.

    Exactly one of ``url`` (local control planes: ``https://127.0.0.1:PORT/mutate-pods``) and
    ``service`` (in-cluster). ``ca_bundle`` is the base64 CA PEM, or None when an injector
    fills it (cert-manager's ``cert-manager.io/inject-ca-from`` annotation, via
    ``annotations``). Why each property:

    * failurePolicy Ignore: a down webhook must never block pod creation (fail open);
    * objectSelector Exists on the label: the API server calls us only for opted-in pods;
    * namespaceSelector NotIn kube-system and the operator's namespace: system pods and the
      operator's own pod (which serves this webhook) are never subject to it;
    * sideEffects None: the only out-of-band write is an Event, skipped on dry-run requests;
    * reinvocationPolicy IfNeeded: if a later webhook adds containers, we are called again
      and inject them too (safe because the patch is idempotent).
    """
    if (url is None) == (service is None):
        raise ValueError("exactly one of url and service is required")
    client_config: dict[str, Any]
    if url is not None:
        client_config = {"url": url}
    else:
        assert service is not None
        client_config = {"service": {"namespace": service.namespace, "name": service.name,
                                     "port": service.port, "path": service.path}}
    if ca_bundle:
        client_config["caBundle"] = ca_bundle
    excluded = sorted({*ALWAYS_EXCLUDED, operator_namespace, *excluded_namespaces})
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {"app.kubernetes.io/name": "resultstore-operator",
                   "app.kubernetes.io/component": "webhook", **(labels or {})},
    }
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": metadata,
        "webhooks": [
            {
                "name": WEBHOOK_NAME,
                "admissionReviewVersions": ["v1"],
                "clientConfig": client_config,
                "rules": [{
                    "apiGroups": [""],
                    "apiVersions": ["v1"],
                    "operations": ["CREATE"],
                    "resources": ["pods"],
                    "scope": "Namespaced",
                }],
                "failurePolicy": "Ignore",
                "matchPolicy": "Equivalent",
                "sideEffects": "None",
                "timeoutSeconds": timeout_seconds,
                "reinvocationPolicy": "IfNeeded",
                "objectSelector": {
                    "matchExpressions": [{"key": INJECT_LABEL, "operator": "Exists"}],
                },
                "namespaceSelector": {
                    "matchExpressions": [{
                        "key": NAMESPACE_NAME_LABEL, "operator": "NotIn", "values": excluded,
                    }],
                },
            }
        ],
    }


@dataclass(frozen=True)
class AdmissionRequest:
    """The parts of an AdmissionReview v1 request the webhook uses."""

    uid: str
    namespace: str
    operation: str
    kind: str
    pod: Mapping[str, Any]
    dry_run: bool = False

    @classmethod
    def from_review(cls, review: Any) -> AdmissionRequest:
        if not isinstance(review, Mapping):
            raise ValueError("AdmissionReview must be an object")
        request = review.get("request")
        if not isinstance(request, Mapping) or not request.get("uid"):
            raise ValueError("AdmissionReview without request.uid")
        pod = request.get("object") or {}
        if not isinstance(pod, Mapping):
            raise ValueError("request.object must be an object")
        namespace = request.get("namespace") or (pod.get("metadata") or {}).get("namespace")
        return cls(
            uid=str(request["uid"]),
            namespace=str(namespace or ""),
            operation=str(request.get("operation") or ""),
            kind=str((request.get("kind") or {}).get("kind") or ""),
            pod=pod,
            dry_run=bool(request.get("dryRun")),
        )


MAX_WARNING = 240


def review_response(uid: str, plan: InjectionPlan) -> dict[str, Any]:
    """The AdmissionReview v1 answer: always allowed, with the JSONPatch when there is one."""
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if plan.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(plan.patch).encode()).decode()
    if plan.warnings:
        # Warnings are shown by kubectl; one line each, bounded (the API server truncates).
        response["warnings"] = [
            ("resultstore: " + w.replace("\n", " "))[:MAX_WARNING] for w in plan.warnings
        ]
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "response": response}


def store_lookup_from_object(obj: Mapping[str, Any] | None) -> StoreLookup:
    """Readiness from a ResultStore object: its ``Ready`` condition must be ``True``."""
    if obj is None:
        return StoreLookup(StoreState.MISSING)
    metadata = obj.get("metadata") or {}
    if metadata.get("deletionTimestamp"):
        return StoreLookup(StoreState.NOT_READY, "being deleted")
    conditions = (obj.get("status") or {}).get("conditions") or []
    for cond in conditions:
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            if cond.get("status") == "True":
                return StoreLookup(StoreState.READY)
            reason = str(cond.get("reason") or "")
            return StoreLookup(StoreState.NOT_READY, f"Ready={cond.get('status')}"
                               + (f", reason {reason}" if reason else ""))
    return StoreLookup(StoreState.NOT_READY, "no Ready condition yet")


def _event_name(base: str) -> str:
    base = base.strip("-.")[:200] or "pod"
    return f"{base}.{uuid.uuid4().hex[:12]}"


def involved_object(namespace: str, pod: Mapping[str, Any]) -> dict[str, Any]:
    """What an Event about an admitted pod refers to.

    A pod created by a controller has no name yet at admission (only ``generateName``) and no
    uid; its controlling owner (ReplicaSet, Job, ...) does, and ``kubectl describe`` of that
    owner shows the Event. A bare pod is referred to by its name.
    """
    metadata = pod.get("metadata") or {}
    for ref in metadata.get("ownerReferences") or []:
        if ref.get("controller") and ref.get("name"):
            return {"apiVersion": ref.get("apiVersion"), "kind": ref.get("kind"),
                    "name": ref.get("name"), "uid": ref.get("uid"), "namespace": namespace}
    name = metadata.get("name") or metadata.get("generateName") or ""
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "namespace": namespace}


def build_event(namespace: str, pod: Mapping[str, Any], plan: InjectionPlan,
                now: dt.datetime | None = None) -> dict[str, Any]:
    """A Warning Event saying why a labelled pod was admitted without injection."""
    now = now or dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    micro = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    involved = involved_object(namespace, pod)
    message = "; ".join(plan.warnings)[:1000]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": _event_name(str(involved["name"])), "namespace": namespace},
        "involvedObject": involved,
        "reason": plan.event_reason or "InjectionSkipped",
        "message": message,
        "type": "Warning",
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": os.environ.get("HOSTNAME", COMPONENT)[:128],
        "action": "Inject",
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "eventTime": micro,
        "count": 1,
    }


# --------------------------------------------------------------------------------------------
# Kubernetes I/O
# --------------------------------------------------------------------------------------------


class KubeGateway:
    """The webhook's few API calls (synchronous; the server runs them in threads)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        # Typed as Any: we pass plain dict bodies (which the client accepts) not model objects.
        self._api: Any = api_client
        self._core: Any = client.CoreV1Api(api_client)
        self._custom: Any = client.CustomObjectsApi(api_client)
        self._admission: Any = client.AdmissionregistrationV1Api(api_client)

    def read_store(self, namespace: str, name: str, timeout: float) -> StoreLookup:
        from kubernetes.client.exceptions import ApiException

        try:
            obj = self._custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=timeout)
        except ApiException as exc:
            if exc.status == 404:
                return StoreLookup(StoreState.MISSING)
            return StoreLookup(StoreState.UNKNOWN, f"API answered {exc.status}")
        return store_lookup_from_object(obj)

    def create_event(self, body: Mapping[str, Any]) -> None:
        self._core.create_namespaced_event(body["metadata"]["namespace"], dict(body))

    def ensure_tls(self, namespace: str, name: str, names: ServingNames) -> TlsBundle:
        return ensure_tls_secret(self._core, namespace, name, names)

    def apply_configuration(self, body: Mapping[str, Any]) -> bool:
        """Make our fields of the configuration equal ``body``; True if anything changed.

        A JSON merge patch, not a replace: the ``webhooks`` list is ours and is replaced whole
        (a strategic merge would blend a stale ``url`` with a new ``service``), while labels
        and annotations others set (kubectl's last-applied, Helm's) are left alone.
        """
        from kubernetes.client.exceptions import ApiException

        name = body["metadata"]["name"]
        for _ in range(5):
            try:
                current = self._api.sanitize_for_serialization(
                    self._admission.read_mutating_webhook_configuration(name))
            except ApiException as exc:
                if exc.status != 404:
                    raise
                try:
                    self._admission.create_mutating_webhook_configuration(dict(body))
                    return True
                except ApiException as exc2:
                    if exc2.status == 409:
                        continue
                    raise
            if _configuration_matches(current, body):
                return False
            patch = {"metadata": {"labels": dict(body["metadata"].get("labels") or {}),
                                  "resourceVersion": current["metadata"]["resourceVersion"]},
                     "webhooks": body["webhooks"]}
            if body["metadata"].get("annotations"):
                patch["metadata"]["annotations"] = dict(body["metadata"]["annotations"])
            try:
                self._admission.patch_mutating_webhook_configuration(
                    name, patch, _content_type="application/merge-patch+json")
                return True
            except ApiException as exc:
                if exc.status == 409:
                    continue
                raise
        raise RuntimeError(f"could not apply MutatingWebhookConfiguration {name}")


def _configuration_matches(current: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether every field we set has our value (the server adds defaults of its own)."""

    def subset(want: Any, have: Any) -> bool:
        if isinstance(want, Mapping):
            return isinstance(have, Mapping) and all(
                subset(v, have.get(k)) for k, v in want.items())
        if isinstance(want, list):
            return (isinstance(have, list) and len(want) == len(have)
                    and all(subset(w, h) for w, h in zip(want, have, strict=True)))
        return bool(want == have)

    want, have = desired["metadata"], current["metadata"]
    return (subset(desired.get("webhooks"), current.get("webhooks"))
            and subset(want.get("labels") or {}, have.get("labels") or {})
            and subset(want.get("annotations") or {}, have.get("annotations") or {}))


# --------------------------------------------------------------------------------------------
# The HTTPS server
# --------------------------------------------------------------------------------------------

LookupFn = Callable[[str, str], Awaitable[StoreLookup]]
EmitFn = Callable[[Mapping[str, Any]], Awaitable[None]]


@dataclass
class InjectionServer:
    """The admission endpoint. Stateless apart from an Event de-duplication window."""

    settings: WebhookSettings
    lookup: LookupFn
    emit: EmitFn
    _runner: web.AppRunner | None = None
    _recent_events: dict[tuple[str, str, str], float] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_post(WEBHOOK_PATH, self.handle_mutate)
        app.router.add_get(HEALTH_PATH, self.handle_health)
        return app

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def handle_mutate(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        try:
            review = await request.json()
            admission = AdmissionRequest.from_review(review)
        except (ValueError, UnicodeDecodeError) as exc:
            metrics.record_admission(metrics.ERROR, time.monotonic() - started)
            return web.Response(status=400, text=f"bad AdmissionReview: {exc}")
        try:
            plan = await self.admit(admission)
            outcome = metrics.MUTATED if plan.patch else metrics.UNCHANGED
        except Exception:  # never refuse: a bug here must not block pod creation
            log.exception("admission of a pod in %s failed; admitted unchanged",
                          admission.namespace)
            plan = InjectionPlan(store=None, warnings=("internal error; admitted unchanged",))
            outcome = metrics.ERROR
        response = web.json_response(review_response(admission.uid, plan))
        metrics.record_admission(outcome, time.monotonic() - started)
        return response

    async def admit(self, admission: AdmissionRequest) -> InjectionPlan:
        if (admission.kind != "Pod" or admission.operation != "CREATE"
                or admission.namespace in self.settings.excluded):
            return InjectionPlan(store=None)
        store = requested_store(admission.pod)
        if store is None:
            return InjectionPlan(store=None)
        lookup = StoreLookup(StoreState.UNKNOWN, "invalid name")
        if store.valid:
            try:
                lookup = await asyncio.wait_for(
                    self.lookup(admission.namespace, store.name), self.settings.lookup_timeout)
            except TimeoutError:
                lookup = StoreLookup(StoreState.UNKNOWN, "API lookup timed out")
            except Exception as exc:  # API down, RBAC, ...: fail open, say why
                lookup = StoreLookup(StoreState.UNKNOWN, type(exc).__name__)
        plan = plan_injection(admission.pod, lookup)
        pod_name = _pod_display(admission.pod)
        if plan.patch:
            log.info("injected ResultStore %s into pod %s/%s", plan.store, admission.namespace,
                     pod_name)
        elif plan.warnings:
            log.info("pod %s/%s admitted without injection: %s", admission.namespace, pod_name,
                     "; ".join(plan.warnings))
        if plan.event_reason and not admission.dry_run:
            self._schedule_event(admission.namespace, admission.pod, plan)
        return plan

    def _schedule_event(self, namespace: str, pod: Mapping[str, Any],
                        plan: InjectionPlan) -> None:
        """Post the Event after answering, at most once per owner and reason per window."""
        involved = involved_object(namespace, pod)
        key = (namespace, f"{involved['kind']}/{involved['name']}", plan.event_reason or "")
        now = time.monotonic()
        last = self._recent_events.get(key)
        if last is not None and now - last < self.settings.event_dedup_seconds:
            return
        self._recent_events[key] = now
        if len(self._recent_events) > 10000:  # bounded memory under pathological churn
            cutoff = now - self.settings.event_dedup_seconds
            self._recent_events = {k: v for k, v in self._recent_events.items() if v >= cutoff}
        body = build_event(namespace, pod, plan)

        async def post() -> None:
            try:
                await self.emit(body)
            except Exception as exc:
                log.warning("could not post Event in %s: %s", namespace, type(exc).__name__)

        task = asyncio.get_running_loop().create_task(post())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self, ssl_context: ssl.SSLContext) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.listen_host, self.settings.listen_port,
                           ssl_context=ssl_context, reuse_address=True)
        await site.start()
        log.info("webhook serving on https://%s:%d%s", self.settings.listen_host,
                 self.settings.listen_port, WEBHOOK_PATH)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for task in list(self._tasks):
            task.cancel()


def _pod_display(pod: Mapping[str, Any]) -> str:
    metadata = pod.get("metadata") or {}
    return str(metadata.get("name") or (metadata.get("generateName") or "") + "*")


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


# --------------------------------------------------------------------------------------------
# Runtime: start-up, periodic resync, shutdown
# --------------------------------------------------------------------------------------------


class WebhookRuntime:
    """Owns the server, the certificates and the configuration for the process lifetime.

    Start-up order matters: certificates, then the listening server, then the configuration,
    so the API server is never pointed at a CA or port that is not yet serving.
    """

    def __init__(self, settings: WebhookSettings, gateway: KubeGateway) -> None:
        self.settings = settings
        self.gateway = gateway
        self.server = InjectionServer(settings, self._lookup, self._emit)
        self.serving = False
        self._context: ssl.SSLContext | None = None
        self._bundle: TlsBundle | None = None
        self._cert_paths: tuple[str, str] | None = None
        self._external_mtimes: tuple[float, ...] = ()
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._config_ok = False

    async def _lookup(self, namespace: str, name: str) -> StoreLookup:
        return await asyncio.to_thread(
            self.gateway.read_store, namespace, name, self.settings.lookup_timeout)

    async def _emit(self, body: Mapping[str, Any]) -> None:
        await asyncio.to_thread(self.gateway.create_event, body)

    def _external_mtime(self) -> tuple[float, ...]:
        files = [f for f in (self.settings.cert_file, self.settings.key_file,
                             self.settings.ca_file) if f]
        return tuple(os.stat(f).st_mtime for f in files)

    async def _load_certificates(self) -> bool:
        """(Re)load the serving pair; True when it changed since the last load."""
        s = self.settings
        if s.external_certs:
            assert s.cert_file is not None and s.key_file is not None
            mtimes = self._external_mtime()
            if self._bundle is not None and mtimes == self._external_mtimes:
                return False
            bundle = read_bundle_files(s.cert_file, s.key_file, s.ca_file)
            self._external_mtimes = mtimes
            paths = (s.cert_file, s.key_file)
        else:
            bundle = await asyncio.to_thread(
                self.gateway.ensure_tls, s.operator_namespace, s.tls_secret, s.serving_names())
            if self._bundle == bundle:
                return False
            directory = s.cert_dir
            if directory is None:
                if self._tmpdir is None:
                    self._tmpdir = tempfile.TemporaryDirectory(prefix="resultstore-webhook-")
                directory = self._tmpdir.name
            paths = write_bundle_files(bundle, directory)
        if self._context is None:
            self._context = server_ssl_context(*paths)
        else:
            self._context.load_cert_chain(*paths)  # new handshakes use the new pair
        self._bundle = bundle
        self._cert_paths = paths
        return True

    async def _apply_configuration(self) -> None:
        if not self.settings.manage_config or self._bundle is None:
            return
        body = self.settings.configuration(ca_bundle_b64(self._bundle))
        changed = await asyncio.to_thread(self.gateway.apply_configuration, body)
        if changed:
            log.info("MutatingWebhookConfiguration %s applied", self.settings.config_name)

    async def start(self) -> None:
        await self._load_certificates()
        assert self._context is not None
        await self.server.start(self._context)
        self.serving = True
        await self._try_apply_configuration()

    async def _try_apply_configuration(self) -> None:
        """Apply the configuration; a failure (RBAC, API down) is logged and retried soon.

        Serving must not depend on it: an installer may own the configuration, and an
        existing one with the same CA keeps working while we cannot write it.
        """
        try:
            await self._apply_configuration()
            self._config_ok = True
        except Exception as exc:
            self._config_ok = False
            log.error("could not apply MutatingWebhookConfiguration %s (%s: %s); retrying",
                      self.settings.config_name, type(exc).__name__, exc)

    async def resync_forever(self) -> None:
        """Renew certificates and correct configuration drift, forever."""
        while True:
            interval = self.settings.resync_interval
            await asyncio.sleep(interval if self._config_ok else min(interval, 15.0))
            try:
                await self._load_certificates()
            except Exception as exc:
                log.warning("webhook certificate resync failed: %s", exc)
            await self._try_apply_configuration()

    async def stop(self) -> None:
        await self.server.stop()
        self.serving = False
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


async def run_webhook(settings: WebhookSettings,
                      gateway_factory: Callable[[], KubeGateway] | None = None,
                      started: Callable[[WebhookRuntime], None] | None = None) -> None:
    """Start the webhook (retrying with backoff until it serves), then resync until cancelled.

    Retrying here rather than failing the operator's start-up: the webhook fails open, so the
    ResultStore controllers should keep working while, say, the TLS Secret cannot be written.
    """
    factory = gateway_factory or (lambda: KubeGateway(new_api_client()))
    delay = 1.0
    runtime: WebhookRuntime | None = None
    try:
        while True:
            try:
                runtime = WebhookRuntime(settings, factory())
                await runtime.start()
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("webhook failed to start (%s: %s); retrying in %.0fs",
                          type(exc).__name__, exc, delay)
                if runtime is not None:
                    await runtime.stop()
                    runtime = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
        if started is not None:
            started(runtime)
        await runtime.resync_forever()
    finally:
        if runtime is not None:
            with contextlib.suppress(Exception):
                await runtime.stop()


# --------------------------------------------------------------------------------------------
# Kopf wiring
# --------------------------------------------------------------------------------------------


def register(registry: Any = None, operator_settings: Any = None) -> None:
    """Add the webhook's startup, cleanup and probe handlers to a Kopf registry.

    ``operator_settings`` is the operator's :class:`~resultstore_operator.settings.
    OperatorSettings` (read once at start-up); when omitted it is read at Kopf start-up.
    """
    import kopf

    state: dict[str, Any] = {}

    @kopf.on.startup(registry=registry, id="resultstore-webhook-start")
    async def _start_webhook(**_: Any) -> None:
        from .settings import OperatorSettings

        op = operator_settings or OperatorSettings.from_env()
        settings = WebhookSettings.from_env(op.raw, op.operator_namespace)
        if not settings.enabled:
            log.info("pod-injection webhook disabled")
            return

        def started(runtime: WebhookRuntime) -> None:
            state["runtime"] = runtime

        state["task"] = asyncio.get_running_loop().create_task(
            run_webhook(settings, started=started), name="resultstore-webhook")

    @kopf.on.cleanup(registry=registry, id="resultstore-webhook-stop")
    async def _stop_webhook(**_: Any) -> None:
        task: asyncio.Task[None] | None = state.pop("task", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    @kopf.on.probe(registry=registry, id="webhook")
    def _probe(**_: Any) -> str:
        runtime: WebhookRuntime | None = state.get("runtime")
        if "task" not in state:
            return "disabled"
        return "serving" if runtime is not None and runtime.serving else "starting"
