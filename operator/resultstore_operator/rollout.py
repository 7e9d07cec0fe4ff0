"""Roll stock-mode workers when their ResultStore's Secret changes (credential rotation).

Why: a worker in ``resultstore.dev/mode: stock`` gets ``CELERY_RESULT_BACKEND`` from the
Secret's ``result_backend`` key through ``valueFrom``, which the kubelet resolves once at
container start. After a credential rotation those workers keep the old password until they
restart, and the operator's drain step then waits for them. Workloads that opt in with the
label ``resultstore.dev/rollout: "true"`` get a pod-template annotation holding a hash of the
keys that reach the environment; when the Secret changes, the hash changes, and the Deployment /
StatefulSet / DaemonSet controller performs its ordinary rolling update. The opt-in is a
label on the workload (not an annotation) so that the watches and the listing select on the
API server: workloads that did not opt in never reach the operator.

Only env-consumed keys are hashed: an engine-option change rewrites ``engine_options.json``,
which file-mode workers reload by themselves, and must not restart every stock worker.

A Secret event does not list workloads: the workload watches (already selected on the
server by the opt-in label) keep a :class:`WorkloadIndex` of the opted-in workloads by store
and their current hash, and a Secret event patches only the ones of its store whose hash
differs. At 1000 stores, three LISTs per Secret event were 3000 requests of a burst for no
workload at all. A workload event that comes before its store's Secret was seen reads that
Secret itself (:func:`sync_workload`), so the order of the watches' initial listings does
not matter.

Pure: :func:`secret_hash`, :func:`store_of_secret`, :func:`workload_store`,
:func:`rollout_patch`, :class:`WorkloadIndex`. I/O: through the operator's one client
(:class:`~resultstore_operator.kube.Kube`, the :class:`WorkloadClient` calls). Wiring:
:func:`register` (Kopf event handlers, which store no state on the user's objects).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import threading
from collections.abc import Mapping
from typing import Any, Protocol

from .api import (
    BINDING_SECRET_TYPE,
    CORE_VERSION,
    HASH_ANNOTATION,
    INJECT_LABEL,
    ROLLOUT_LABEL,
    ROLLOUT_SELECTOR,
    WORKLOAD_PLURALS,
)
from .builders.names import SECRET_SUFFIX, secret_name
from .builders.ownership import controller_of, is_resultstore_ref
from .injection import STOCK_KEY
from .kube import WORKLOAD_CLIENT_NAMES, Kube, meta, new_api_client, pod_template
from .settings import OperatorSettings

log = logging.getLogger("resultstore.rollout")

__all__ = ["HASH_ANNOTATION", "ROLLOUT_LABEL", "ROLLOUT_SELECTOR", "WORKLOAD_CLIENT_NAMES",
           "WORKLOAD_KINDS", "WorkloadClient", "WorkloadIndex", "register",
           "roll_indexed_workloads",
           "rollout_patch", "secret_hash", "store_of_secret", "sync_workload", "workload_store"]

HASHED_KEYS = (STOCK_KEY,)
WORKLOAD_KINDS = WORKLOAD_PLURALS


class WorkloadClient(Protocol):
    """The calls of :class:`~resultstore_operator.kube.Kube` the rollout makes (the seam a
    unit test fills with an in-memory stand-in)."""

    def read_secret(self, namespace: str, name: str) -> Mapping[str, Any] | None: ...

    def patch_workload(self, plural: str, namespace: str, name: str,
                       patch: Mapping[str, Any]) -> None: ...


def secret_hash(data: Mapping[str, str] | None) -> str | None:
    """A short stable hash of the env-consumed keys (base64 ``data`` as the API returns it).

    None when none of those keys is present (nothing to roll on).
    """
    data = data or {}
    digest = hashlib.sha256()
    found = False
    for key in HASHED_KEYS:
        if key not in data:
            continue
        try:
            value = base64.b64decode(data[key], validate=True)
        except (binascii.Error, ValueError):
            value = data[key].encode()
        digest.update(key.encode() + b"\0" + value + b"\0")
        found = True
    return digest.hexdigest()[:20] if found else None


def store_of_secret(secret: Mapping[str, Any]) -> str | None:
    """The ResultStore a Secret belongs to, if it is one the operator writes.

    The name and type alone prove nothing (anyone may create ``<store>-resultstore``): the
    Secret must also be controlled by the ResultStore of that name, as the operator's own
    Secrets are. A foreign Secret of the same name never rolls anybody's workers.
    """
    name = meta(secret).name
    if secret.get("type") != BINDING_SECRET_TYPE or not name.endswith(SECRET_SUFFIX):
        return None
    store = name[: -len(SECRET_SUFFIX)]
    controller = controller_of(secret)
    if not store or controller is None or not is_resultstore_ref(controller) \
            or controller.get("name") != store:
        return None
    return store


def workload_store(workload: Mapping[str, Any]) -> str | None:
    """The store an opted-in workload's pods are injected with (None: not opted in)."""
    # exactly the value the server-side selector (ROLLOUT_SELECTOR) matches
    if meta(workload).labels.get(ROLLOUT_LABEL) != "true":
        return None
    store = meta(pod_template(workload)).labels.get(INJECT_LABEL)
    if store is None:
        return None
    return str(store).strip() or None


def rollout_patch(workload: Mapping[str, Any], digest: str | None) -> dict[str, Any] | None:
    """The merge patch that records ``digest`` on the pod template, or None if up to date."""
    if digest is None or workload_store(workload) is None:
        return None
    current = meta(pod_template(workload)).annotations.get(HASH_ANNOTATION)
    if current == digest:
        return None
    return {"spec": {"template": {"metadata": {"annotations": {HASH_ANNOTATION: digest}}}}}


class WorkloadIndex:
    """The opted-in workloads as their watches last showed them: by (namespace, store), each
    with the hash its pod template carries. Only what a roll needs is kept (no bodies).
    Thread-safe: Kopf runs the (sync) event handlers that feed and read it in its threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: (namespace, store) -> {(kind, name): current hash annotation or None}
        self._stores: dict[tuple[str, str], dict[tuple[str, str], str | None]] = {}
        #: (kind, namespace, name) -> the store it was indexed under
        self._where: dict[tuple[str, str, str], str] = {}

    def observe(self, kind: str, workload: Mapping[str, Any], event_type: str | None) -> None:
        """A watch event of a workload (DELETED, or no longer opted in, forgets it)."""
        m = meta(workload)
        key = (kind, m.namespace, m.name)
        store = workload_store(workload)
        current = meta(pod_template(workload)).annotations.get(HASH_ANNOTATION)
        with self._lock:
            previous = self._where.pop(key, None)
            if previous is not None:
                members = self._stores.get((m.namespace, previous), {})
                members.pop((kind, m.name), None)
                if not members:
                    self._stores.pop((m.namespace, previous), None)
            if event_type == "DELETED" or store is None:
                return
            self._stores.setdefault((m.namespace, store), {})[(kind, m.name)] = current
            self._where[key] = store

    def of_store(self, namespace: str, store: str) -> list[tuple[str, str, str | None]]:
        """(kind, name, current hash) of the store's opted-in workloads, sorted."""
        with self._lock:
            members = dict(self._stores.get((namespace, store), {}))
        return sorted((kind, name, digest) for (kind, name), digest in members.items())

    def record(self, kind: str, namespace: str, name: str, digest: str) -> None:
        """A patch of ours landed: until the watch says otherwise, the workload has it."""
        with self._lock:
            store = self._where.get((kind, namespace, name))
            if store is not None:
                self._stores[(namespace, store)][(kind, name)] = digest


def roll_indexed_workloads(kube: WorkloadClient, index: WorkloadIndex, namespace: str,
                           store: str, data: Mapping[str, str] | None) -> list[str]:
    """Patch the store's opted-in workloads (from the index, no listing) whose hash differs
    from the Secret's; return their names."""
    digest = secret_hash(data)
    if digest is None:
        return []
    rolled = []
    for kind, name, current in index.of_store(namespace, store):
        if current == digest:
            continue
        kube.patch_workload(kind, namespace, name, {
            "spec": {"template": {"metadata": {"annotations": {HASH_ANNOTATION: digest}}}}})
        index.record(kind, namespace, name, digest)
        rolled.append(f"{kind}/{name}")
    return rolled


def sync_workload(kube: WorkloadClient, kind: str, workload: Mapping[str, Any]) -> bool:
    """Bring one opted-in workload's hash up to date with its store's Secret; True if patched."""
    store = workload_store(workload)
    if store is None:
        return False
    m = meta(workload)
    secret = kube.read_secret(m.namespace, secret_name(store))
    if secret is None or store_of_secret(secret) != store:
        return False  # absent, or a Secret of that name the operator did not write
    patch = rollout_patch(workload, secret_hash(secret.get("data")))
    if patch is None:
        return False
    kube.patch_workload(kind, m.namespace, m.name, patch)
    return True


def register(registry: Any, settings: OperatorSettings) -> None:
    """Add the rollout's Kopf event handlers (Secrets and the three workload kinds).

    The rollout has no settings of its own (it follows the namespaces Kopf watches); it takes
    `settings` for the one registration signature of main.py.

    Event handlers rather than create/update handlers: they keep no progress annotations on
    the users' workloads and are naturally level-triggered (initial listing included).
    """
    import kopf

    holder: dict[str, Kube] = {}
    index = WorkloadIndex()

    def client() -> Kube:
        if "k" not in holder:
            holder["k"] = Kube(new_api_client())
        return holder["k"]

    def is_store_secret(body: Mapping[str, Any], **_: Any) -> bool:
        return store_of_secret(body) is not None

    @kopf.on.event(CORE_VERSION, "secrets", registry=registry, when=is_store_secret,
                   id="resultstore-rollout-secret")
    def _on_secret(body: Mapping[str, Any], type: str | None, namespace: str | None,
                   **_: Any) -> None:
        if type == "DELETED" or not namespace:
            return
        store = store_of_secret(body)
        assert store is not None
        rolled = roll_indexed_workloads(client(), index, namespace, store, body.get("data"))
        if rolled:
            log.info("Secret %s/%s changed: rolling %s", namespace, meta(body).name,
                     ", ".join(rolled))

    @kopf.on.startup(registry=registry, id="resultstore-rollout-selectors")
    def _select(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Before the watches start: only opted-in workloads are streamed to this process.
        for kind in WORKLOAD_KINDS:
            settings.watching.label_selectors[("apps", kind)] = ROLLOUT_SELECTOR

    for kind in WORKLOAD_KINDS:
        # No `when` filter: a workload whose opt-in label was removed arrives as DELETED
        # from the selected watch, without the label, and must leave the index too.
        def _on_workload(body: Mapping[str, Any], type: str | None, kind: str = kind,
                         **_: Any) -> None:
            index.observe(kind, body, type)
            if type == "DELETED" or workload_store(body) is None:
                return
            if sync_workload(client(), kind, body):
                m = meta(body)
                log.info("%s %s/%s: pod template annotated with the Secret hash", kind,
                         m.namespace, m.name)

        kopf.on.event("apps", "v1", kind, registry=registry,
                      id=f"resultstore-rollout-{kind}")(_on_workload)
