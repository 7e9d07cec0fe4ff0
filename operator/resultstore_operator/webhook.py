"""The pod-injection mutating admission webhook, served by the operator process over TLS.

Why we serve it ourselves (aiohttp, which Kopf already depends on) instead of Kopf's managed
admission: the MutatingWebhookConfiguration must have exact properties (failurePolicy Ignore,
an objectSelector on the inject label, a namespaceSelector excluding kube-system and the
operator's namespace, a 5 s timeout, reinvocation) and a caBundle that survives restarts;
Kopf's managed mode fixes a 30 s timeout, no namespaceSelector and a fresh CA per start.

Layers, as everywhere in the operator:

* pure: :func:`build_webhook_configuration` (reused by manifests/ and the chart),
  :class:`AdmissionRequest` parsing (with :func:`review_problem`, what a review must look like
  to be one the API server sent), :func:`review_response`, :func:`store_lookup_from_object`,
  :func:`event_reason_for`, :func:`build_event`, and the patch itself in
  :mod:`resultstore_operator.injection`;
* I/O: :class:`KubeGateway` (read a ResultStore, post an Event, apply the configuration,
  keep the TLS Secret), :class:`InjectionServer` (the HTTPS endpoint) and
  :class:`WebhookRuntime` (start-up, resync, shutdown);
* wiring: :func:`register` adds a Kopf startup/cleanup/probe handler to a registry so the
  webhook runs inside ``resultstore-operator``.

The webhook never refuses a pod: every failure path answers ``allowed: true`` without a patch,
with an admission warning and (when the user must act) an Event.

Events and forged reviews (issue 14). The endpoint is reachable by whatever can open a TCP
connection to it (the NetworkPolicy option narrows that to the API server; the optional
client-CA setting proves it cryptographically). An admission *warning* goes back only to
the caller, so answering a forged review costs nothing; an *Event* is written into a
namespace and would let a caller spam any namespace about objects it names. So an Event is
posted only when (a) the review has the exact shape the API server sends (AdmissionReview
v1, a Pod CREATE in the request's namespace, with userInfo; :func:`review_problem`), (b) it
is no dry run, (c) the ResultStore it names exists (looked up in the API, so a caller cannot
conjure Events about stores that are not there), and (d) it concerns that store, not an
object the caller named: the Event's involvedObject is the ResultStore. Repeats are
aggregated in one Event per (namespace, store, reason) whose ``count`` grows (at most one
API write per key and window), in a bounded in-memory cache: 301 reviews give one Event.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import re
import ssl
import tempfile
import time
import urllib.parse
import uuid
from collections import OrderedDict
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
    #: Distinct (namespace, store, reason) Event aggregates kept in memory (oldest dropped).
    event_cache_size: int = 1024
    #: PEM CA file; when set, callers must present a client certificate it signed (mutual
    #: TLS: configure the API server's AdmissionConfiguration kubeConfigFile to send one).
    client_ca_file: str | None = None
    #: Events' ``reportingInstance``: the pod's name (``HOSTNAME``), read once at start-up.
    instance: str = COMPONENT

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
            event_cache_size=int(_number(env, p + "EVENT_CACHE_SIZE", cls.event_cache_size,
                                         1, 1_000_000)),
            client_ca_file=text("CLIENT_CA_FILE"),
            instance=(env.get("HOSTNAME", "").strip() or COMPONENT)[:128],
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


_REVIEW_UID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                         r"[0-9a-fA-F]{12}$")
POD_KIND = {"group": "", "version": "v1", "kind": "Pod"}
POD_RESOURCE = {"group": "", "version": "v1", "resource": "pods"}


def review_problem(review: Mapping[str, Any]) -> str | None:
    """Why `review` is not a pod admission the API server would send us; None when it is.

    Shape only (the API server always sends all of it): AdmissionReview admission.k8s.io/v1,
    a UUID request uid, kind Pod / resource pods (v1), operation CREATE, a namespace that the
    object does not contradict, and the requesting user. A review failing this is answered
    (allowed, unchanged) but never mutated and never produces an Event.
    """
    if review.get("apiVersion") != "admission.k8s.io/v1" or \
            review.get("kind") != "AdmissionReview":
        return "not an admission.k8s.io/v1 AdmissionReview"
    request = review.get("request") or {}
    if not _REVIEW_UID.fullmatch(str(request.get("uid") or "")):
        return "request.uid is not a UUID"
    if request.get("kind") != POD_KIND or request.get("resource") != POD_RESOURCE:
        return "not a v1 Pod request"
    if request.get("subResource"):
        return "a subresource request"
    if request.get("operation") != "CREATE":
        return "not a CREATE"
    namespace = request.get("namespace")
    if not isinstance(namespace, str) or not namespace:
        return "request.namespace missing"
    obj_ns = ((request.get("object") or {}).get("metadata") or {}).get("namespace")
    if obj_ns not in (None, "", namespace):
        return "the pod's namespace differs from the request's"
    user = request.get("userInfo")
    if not isinstance(user, Mapping) or not user.get("username"):
        return "request.userInfo missing"
    return None


@dataclass(frozen=True)
class AdmissionRequest:
    """The parts of an AdmissionReview v1 request the webhook uses.

    ``problem`` is :func:`review_problem`'s verdict: set, the review is answered unchanged.
    """

    uid: str
    namespace: str
    operation: str
    kind: str
    pod: Mapping[str, Any]
    dry_run: bool = False
    problem: str | None = None

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
        kind = request.get("kind") or {}
        return cls(
            uid=str(request["uid"]),
            namespace=str(request.get("namespace") or ""),
            operation=str(request.get("operation") or ""),
            kind=str(kind.get("kind") or "") if isinstance(kind, Mapping) else "",
            pod=pod,
            dry_run=bool(request.get("dryRun")),
            problem=review_problem(review),
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
    base = base.strip("-.")[:200] or "resultstore"
    return f"{base}.{uuid.uuid4().hex[:12]}"


_KIND = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,62}$")
_OBJECT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def pod_description(pod: Mapping[str, Any]) -> str:
    """How a message names the admitted pod: its controller (a pod a controller creates has
    no name yet at admission) or its own name.

    Only what has the syntax of a Kubernetes kind and name is quoted: the text came with
    the review, and a review sent straight to the port must not put words of its own into
    an Event of the victim namespace (the API server would never send anything else)."""
    metadata = pod.get("metadata") or {}
    for ref in metadata.get("ownerReferences") or []:
        if isinstance(ref, Mapping) and ref.get("controller") and ref.get("name"):
            kind, name = str(ref.get("kind")), str(ref.get("name"))
            if _KIND.fullmatch(kind) and _OBJECT_NAME.fullmatch(name):
                return f"a pod of {kind} {name}"
            return "a pod"
    name = str(metadata.get("name") or "")
    if _OBJECT_NAME.fullmatch(name):
        return f"pod {name}"
    prefix = str(metadata.get("generateName") or "")
    if not name and _OBJECT_NAME.fullmatch(prefix.rstrip("-")):
        return f"pod {prefix}*"
    return "a pod"


#: Event reasons only for a store that exists (the lookup found it): a missing store or an
#: unanswered lookup gives the admission warning alone, never an Event.
EVENT_STATES = frozenset({StoreState.READY, StoreState.NOT_READY})


def event_reason_for(admission: AdmissionRequest, plan: InjectionPlan,
                     lookup: StoreLookup) -> str | None:
    """The reason of the Event this admission deserves, or None for no Event (pure)."""
    if admission.problem is not None or admission.dry_run or not plan.event_reason:
        return None
    if plan.store is None or lookup.state not in EVENT_STATES:
        return None
    return plan.event_reason


def build_event(namespace: str, store: str, reason: str, message: str, count: int = 1,
                now: dt.datetime | None = None, instance: str = COMPONENT) -> dict[str, Any]:
    """A Warning Event on the ResultStore saying why labelled pods went uninjected.

    The ResultStore (which exists: see :func:`event_reason_for`) is the involved object, not
    an object named in the review, and ``count`` aggregates repeats.
    """
    now = now or dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": _event_name(store), "namespace": namespace},
        "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ResultStore",
                           "name": store, "namespace": namespace},
        "reason": reason,
        "message": message[:1000],
        "type": "Warning",
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": instance[:128],
        "action": "Inject",
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": count,
    }


EventKey = tuple[str, str, str]  # (namespace, store, reason)
CreateFn = Callable[[Mapping[str, Any]], Awaitable[None]]
#: (namespace, event name, count, lastTimestamp, message) -> None
UpdateFn = Callable[[str, str, int, str, str], Awaitable[None]]


@dataclass
class _Aggregate:
    namespace: str
    store: str
    reason: str
    message: str
    count: int = 0
    posted: int = 0
    name: str | None = None
    last_post: float = float("-inf")
    task: asyncio.Task[None] | None = None


class EventAggregator:
    """One Event per (namespace, store, reason), its ``count`` following the occurrences.

    At most one API write per key and ``window`` seconds (the first occurrence is posted at
    once, later ones are folded into a count update), and at most ``max_keys`` keys in
    memory (least recently seen dropped): a flood of reviews costs a bounded number of API
    writes and bytes, whatever its size.
    """

    def __init__(self, create: CreateFn, update: UpdateFn | None, window: float,
                 max_keys: int = 1024, instance: str = COMPONENT) -> None:
        self._create = create
        self._instance = instance
        self._update = update
        self.window = window
        self.max_keys = max_keys
        self._entries: OrderedDict[EventKey, _Aggregate] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def count(self, key: EventKey) -> int:
        entry = self._entries.get(key)
        return entry.count if entry else 0

    def record(self, namespace: str, store: str, reason: str, message: str) -> None:
        key = (namespace, store, reason)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Aggregate(namespace, store, reason, message)
            while len(self._entries) > self.max_keys:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        entry.count += 1
        entry.message = message
        if entry.task is None:
            entry.task = asyncio.get_running_loop().create_task(self._flush(entry))

    async def _flush(self, entry: _Aggregate) -> None:
        """Bring the API's Event up to the entry's count; one writer per key at a time."""
        try:
            while entry.posted != entry.count:
                wait = entry.last_post + self.window - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                count = entry.count
                try:
                    if entry.name is None:
                        body = build_event(entry.namespace, entry.store, entry.reason,
                                           entry.message, count, instance=self._instance)
                        await self._create(body)
                        entry.name = body["metadata"]["name"]
                    elif self._update is not None:
                        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                        await self._update(entry.namespace, entry.name, count, stamp,
                                           entry.message[:1000])
                except Exception as exc:
                    # Best effort: the next occurrence tries again (a fresh Event if the
                    # old one expired or could not be updated).
                    log.warning("could not post Event %s in %s: %s", entry.reason,
                                entry.namespace, type(exc).__name__)
                    entry.name = None
                    entry.last_post = time.monotonic()
                    entry.posted = entry.count
                    return
                entry.posted = count
                entry.last_post = time.monotonic()
        finally:
            entry.task = None

    async def stop(self) -> None:
        tasks = [e.task for e in self._entries.values() if e.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


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

    def update_event(self, namespace: str, name: str, count: int, last: str,
                     message: str) -> None:
        """Fold repeats into the aggregate Event (merge patch of count/lastTimestamp)."""
        self._core.patch_namespaced_event(
            name, namespace, {"count": count, "lastTimestamp": last, "message": message},
            _content_type="application/merge-patch+json")

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
    """The admission endpoint. Stateless apart from the Event aggregates (bounded).

    ``emit`` creates an Event, ``update`` (optional) raises an existing one's count.
    """

    settings: WebhookSettings
    lookup: LookupFn
    emit: EmitFn
    update: UpdateFn | None = None
    _runner: web.AppRunner | None = None
    events: EventAggregator = field(init=False)

    def __post_init__(self) -> None:
        self.events = EventAggregator(self.emit, self.update,
                                      self.settings.event_dedup_seconds,
                                      self.settings.event_cache_size,
                                      self.settings.instance)

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
        if admission.problem is not None:
            # Not what the API server sends: answered, never mutated, no lookup, no Event.
            log.debug("review %s ignored: %s", admission.uid[:40], admission.problem)
            return InjectionPlan(store=None)
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
        reason = event_reason_for(admission, plan, lookup)
        if reason is not None and plan.store is not None:
            message = (f"{pod_description(admission.pod)} admitted without injection: "
                       + "; ".join(plan.warnings))
            self.events.record(admission.namespace, plan.store, reason, message)
        return plan

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
        await self.events.stop()


def _pod_display(pod: Mapping[str, Any]) -> str:
    metadata = pod.get("metadata") or {}
    return str(metadata.get("name") or (metadata.get("generateName") or "") + "*")


def server_ssl_context(cert_file: str, key_file: str,
                       client_ca_file: str | None = None) -> ssl.SSLContext:
    """TLS 1.2+ with our serving pair; with `client_ca_file`, mutual TLS: only a caller
    holding a certificate from that CA (the API server, configured through its
    AdmissionConfiguration kubeConfigFile) completes the handshake."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        context.load_verify_locations(cafile=client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
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
        self.server = InjectionServer(settings, self._lookup, self._emit, self._update)
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

    async def _update(self, namespace: str, name: str, count: int, last: str,
                      message: str) -> None:
        await asyncio.to_thread(self.gateway.update_event, namespace, name, count, last,
                                message)

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
            self._context = server_ssl_context(*paths, self.settings.client_ca_file)
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
