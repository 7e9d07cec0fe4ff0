"""Roll stock-mode workers when their ResultStore's Secret changes (credential rotation).

Why: a worker in ``resultstore.dev/mode: stock`` gets ``CELERY_RESULT_BACKEND`` from the
Secret's ``result_backend`` key through ``valueFrom``, which the kubelet resolves once at
container start. After a credential rotation those workers keep the old password until they
restart, and the operator's drain step then waits for them. Workloads that opt in with
``resultstore.dev/rollout: "true"`` get a pod-template annotation holding a hash of the keys
that reach the environment; when the Secret changes, the hash changes, and the Deployment /
StatefulSet / DaemonSet controller performs its ordinary rolling update.

Only env-consumed keys are hashed: an engine-option change rewrites ``engine_options.json``,
which file-mode workers reload by themselves, and must not restart every stock worker.

Pure: :func:`secret_hash`, :func:`store_of_secret`, :func:`workload_store`,
:func:`rollout_patch`. I/O: :class:`RolloutGateway`. Wiring: :func:`register` (Kopf event
handlers, which store no state on the user's objects).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import Mapping
from typing import Any

from .builders.names import SECRET_SUFFIX, secret_name
from .builders.ownership import controller_of, is_resultstore_ref
from .injection import INJECT_LABEL, STOCK_KEY

log = logging.getLogger("resultstore.rollout")

ROLLOUT_ANNOTATION = "resultstore.dev/rollout"
HASH_ANNOTATION = "resultstore.dev/secret-hash"
HASHED_KEYS = (STOCK_KEY,)
BINDING_TYPE = "servicebinding.io/postgresql"
WORKLOAD_KINDS = ("deployments", "statefulsets", "daemonsets")
# kubernetes-client method suffixes per plural (list_namespaced_<x>, patch_namespaced_<x>).
_CLIENT_NAMES = {"deployments": "deployment", "statefulsets": "stateful_set",
                 "daemonsets": "daemon_set"}
_TRUE = frozenset({"true", "1", "yes", "on"})
MERGE_PATCH = "application/merge-patch+json"


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
    name = str((secret.get("metadata") or {}).get("name") or "")
    if secret.get("type") != BINDING_TYPE or not name.endswith(SECRET_SUFFIX):
        return None
    store = name[: -len(SECRET_SUFFIX)]
    controller = controller_of(secret)
    if not store or controller is None or not is_resultstore_ref(controller) \
            or controller.get("name") != store:
        return None
    return store


def workload_store(workload: Mapping[str, Any]) -> str | None:
    """The store an opted-in workload's pods are injected with (None: not opted in)."""
    annotations = (workload.get("metadata") or {}).get("annotations") or {}
    if str(annotations.get(ROLLOUT_ANNOTATION, "")).strip().lower() not in _TRUE:
        return None
    template = (workload.get("spec") or {}).get("template") or {}
    labels = (template.get("metadata") or {}).get("labels") or {}
    store = labels.get(INJECT_LABEL)
    if store is None:
        return None
    return str(store).strip() or None


def rollout_patch(workload: Mapping[str, Any], digest: str | None) -> dict[str, Any] | None:
    """The merge patch that records ``digest`` on the pod template, or None if up to date."""
    if digest is None or workload_store(workload) is None:
        return None
    template = (workload.get("spec") or {}).get("template") or {}
    current = ((template.get("metadata") or {}).get("annotations") or {}).get(HASH_ANNOTATION)
    if current == digest:
        return None
    return {"spec": {"template": {"metadata": {"annotations": {HASH_ANNOTATION: digest}}}}}


class RolloutGateway:
    """Reads Secrets, lists and patches workloads (sync: Kopf runs sync handlers in threads)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self._api: Any = api_client
        self._core: Any = client.CoreV1Api(api_client)
        self._apps: Any = client.AppsV1Api(api_client)

    def secret(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            secret = self._core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(self._api.sanitize_for_serialization(secret))

    def workloads(self, namespace: str) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        for kind in WORKLOAD_KINDS:
            listing = getattr(self._apps, f"list_namespaced_{_CLIENT_NAMES[kind]}")(namespace)
            for item in listing.items:
                out.append((kind, self._api.sanitize_for_serialization(item)))
        return out

    def patch(self, kind: str, namespace: str, name: str, body: Mapping[str, Any]) -> None:
        getattr(self._apps, f"patch_namespaced_{_CLIENT_NAMES[kind]}")(
            name, namespace, dict(body), _content_type=MERGE_PATCH)


def roll_workloads_for_secret(gateway: RolloutGateway, namespace: str, store: str,
                              data: Mapping[str, str] | None) -> list[str]:
    """Annotate every opted-in workload of ``store`` with the Secret's hash; return their names."""
    digest = secret_hash(data)
    if digest is None:
        return []
    rolled = []
    for kind, workload in gateway.workloads(namespace):
        if workload_store(workload) != store:
            continue
        patch = rollout_patch(workload, digest)
        if patch is not None:
            name = workload["metadata"]["name"]
            gateway.patch(kind, namespace, name, patch)
            rolled.append(f"{kind}/{name}")
    return rolled


def sync_workload(gateway: RolloutGateway, kind: str, workload: Mapping[str, Any]) -> bool:
    """Bring one opted-in workload's hash up to date with its store's Secret; True if patched."""
    store = workload_store(workload)
    if store is None:
        return False
    metadata = workload.get("metadata") or {}
    namespace = str(metadata.get("namespace") or "")
    secret = gateway.secret(namespace, secret_name(store))
    if secret is None or store_of_secret(secret) != store:
        return False  # absent, or a Secret of that name the operator did not write
    patch = rollout_patch(workload, secret_hash(secret.get("data")))
    if patch is None:
        return False
    gateway.patch(kind, namespace, str(metadata.get("name")), patch)
    return True


def register(registry: Any = None, operator_settings: Any = None) -> None:
    """Add the rollout's Kopf event handlers (Secrets and the three workload kinds).

    ``operator_settings`` is accepted for the uniform plug-in hook of ``main.py``; the
    rollout has no settings of its own (it follows the namespaces Kopf watches).

    Event handlers rather than create/update handlers: they keep no progress annotations on
    the users' workloads and are naturally level-triggered (initial listing included).
    """
    import kopf

    from .kube import new_api_client

    holder: dict[str, RolloutGateway] = {}

    def gateway() -> RolloutGateway:
        if "g" not in holder:
            holder["g"] = RolloutGateway(new_api_client())
        return holder["g"]

    def is_store_secret(body: Mapping[str, Any], **_: Any) -> bool:
        return store_of_secret(body) is not None

    @kopf.on.event("v1", "secrets", registry=registry, when=is_store_secret,
                   id="resultstore-rollout-secret")
    def _on_secret(body: Mapping[str, Any], type: str | None, namespace: str | None,
                   **_: Any) -> None:
        if type == "DELETED" or not namespace:
            return
        store = store_of_secret(body)
        assert store is not None
        rolled = roll_workloads_for_secret(gateway(), namespace, store, body.get("data"))
        if rolled:
            log.info("Secret %s/%s changed: rolling %s", namespace,
                     body["metadata"]["name"], ", ".join(rolled))

    def opted_in(body: Mapping[str, Any], **_: Any) -> bool:
        return workload_store(body) is not None

    for kind in WORKLOAD_KINDS:
        def _on_workload(body: Mapping[str, Any], type: str | None, kind: str = kind,
                         **_: Any) -> None:
            if type == "DELETED":
                return
            if sync_workload(gateway(), kind, body):
                log.info("%s %s/%s: pod template annotated with the Secret hash", kind,
                         body["metadata"].get("namespace"), body["metadata"].get("name"))

        kopf.on.event("apps", "v1", kind, registry=registry, when=opted_in,
                      id=f"resultstore-rollout-{kind}")(_on_workload)
