"""`Kube`: the operator's one Kubernetes client (handlers, webhook, rollout, TLS keeper).

Callers pass objects built by the pure builders. Reads return plain dicts (the API's own
JSON, camelCase) so that comparisons with builder output need no model classes; a missing
object reads as None. Every failure is a member of `kube.errors` (never the client's own
exception). Every write is idempotent: a Secret is replaced only when it differs, a CronJob
is server-side applied (a no-op when unchanged), status is merge-patched.

Synchronous, as the kubernetes client is: Kopf runs sync handlers in worker threads, the
webhook calls it through `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from ..api import (
    API_VERSION,
    APPLY_PATCH,
    FIELD_MANAGER,
    GROUP,
    KIND,
    MERGE_PATCH,
    METADATA_ONLY,
    PLURAL,
    VERSION,
)
from ..builders.conditions import timestamp
from ..builders.ownership import foreign_owner, is_owned_by
from ..views import meta
from .errors import NotFound, NotOwnedError, Unavailable, api_errors

log = logging.getLogger("resultstore_operator.kube")

REQUEST_TIMEOUT = 30.0
#: kubernetes-client method suffixes per workload plural (list_namespaced_<x>, patch_...).
WORKLOAD_CLIENT_NAMES = {"deployments": "deployment", "statefulsets": "stateful_set",
                         "daemonsets": "daemon_set"}


def _owner_uid(desired: Mapping[str, Any]) -> str:
    refs = meta(desired).owner_references
    return str(refs[0].get("uid") or "") if refs else ""


def _copy(body: Mapping[str, Any]) -> dict[str, Any]:
    """A deep, JSON-only copy: the client is never handed (and never mutates) a caller's dict."""
    return dict(json.loads(json.dumps(body)))


#: Connections kept to the API server by a client made without `pool_size`: above the
#: thread counts that share one (16 reconcile threads, 16 Kopf workers by default).
POOL_SIZE = 32


def new_api_client(pool_size: int = POOL_SIZE) -> Any:
    """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG).

    `pool_size`: the kubernetes client keeps 5 connections per CPU by default (10 on two
    CPUs); a thread beyond that opens a new TLS connection for its request and drops it
    afterwards ("Connection pool is full, discarding connection"), a TLS handshake per call
    on both sides once 16 threads share the client.
    """
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = max(pool_size,
                                                configuration.connection_pool_maxsize or 0)
    return client.ApiClient(configuration)


class Kube:
    """The operator's API calls (synchronous; handlers run them in worker threads)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        # Typed as Any: we pass plain dict bodies (which the client accepts), not models.
        self.api: Any = api_client
        self.core: Any = client.CoreV1Api(api_client)
        self.batch: Any = client.BatchV1Api(api_client)
        self.apps: Any = client.AppsV1Api(api_client)
        self.custom: Any = client.CustomObjectsApi(api_client)
        self.admission: Any = client.AdmissionregistrationV1Api(api_client)
        self.coordination: Any = client.CoordinationV1Api(api_client)

    # --- reads -------------------------------------------------------------------------------

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        data = response.data if hasattr(response, "data") else response.read()
        return dict(json.loads(data))

    def _get(self, call: Any, what: str, *args: Any, timeout: float = REQUEST_TIMEOUT,
             **kwargs: Any) -> dict[str, Any] | None:
        """One read as raw JSON; None when the API answers 404."""
        try:
            with api_errors(what):
                return self._json(call(*args, _preload_content=False,
                                       _request_timeout=timeout, **kwargs))
        except NotFound:
            return None

    def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(self.core.read_namespaced_secret, f"read Secret {name}", name,
                         namespace)

    def read_secret_metadata(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Secret's metadata only (PartialObjectMetadata): its data is never transferred.

        Used to check the admin Secret's opt-in label before the data is read at all.
        """
        return self._get(self.core.read_namespaced_secret,
                         f"read metadata of Secret {name}", name, namespace,
                         _headers={"Accept": METADATA_ONLY})

    def read_cronjob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(self.batch.read_namespaced_cron_job, f"read CronJob {name}", name,
                         namespace)

    def read_store(self, namespace: str, name: str,
                   timeout: float = REQUEST_TIMEOUT) -> dict[str, Any] | None:
        """The ResultStore, or None; `timeout` is short for the webhook's admission lookup."""
        return self._get(self.custom.get_namespaced_custom_object, f"read {KIND} {name}",
                         GROUP, VERSION, namespace, PLURAL, name, timeout=timeout)

    def read_webhook_configuration(self, name: str) -> dict[str, Any] | None:
        return self._get(self.admission.read_mutating_webhook_configuration,
                         f"read MutatingWebhookConfiguration {name}", name)

    # --- writes ------------------------------------------------------------------------------

    def create_secret(self, namespace: str, body: Mapping[str, Any]) -> None:
        with api_errors(f"create Secret {meta(body).name}"):
            self.core.create_namespaced_secret(namespace, _copy(body),
                                               _request_timeout=REQUEST_TIMEOUT)

    def replace_secret(self, namespace: str, name: str, body: Mapping[str, Any]) -> None:
        """Replace with `body` (its resourceVersion, when set, makes a concurrent edit a
        Conflict instead of a silent overwrite)."""
        with api_errors(f"replace Secret {name}"):
            self.core.replace_namespaced_secret(name, namespace, _copy(body),
                                                _request_timeout=REQUEST_TIMEOUT)

    def put_secret(self, desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> str:
        """Create, or replace the live Secret with `desired`; returns 'created'/'replaced'.

        A replace (not a patch) so that keys someone added are removed too. The live
        object's resourceVersion makes a concurrent edit fail with 409 (retried later)
        instead of being silently overwritten. Labels/annotations others added are kept.
        A live Secret that is not controlled by the owner in `desired` (same uid) is never
        replaced or deleted: NotOwnedError, and the object stays exactly as it was.
        """
        want = meta(desired)
        body = _copy(desired)
        if live is not None and not is_owned_by(live, _owner_uid(desired)):
            raise NotOwnedError(foreign_owner({"kind": "Secret", **live}, _owner_uid(desired))
                                or f"Secret {want.name} is not ours")
        with api_errors(f"write Secret {want.name}"):
            if live is None:
                self.core.create_namespaced_secret(want.namespace, body,
                                                   _request_timeout=REQUEST_TIMEOUT)
                return "created"
            have = meta(live)
            if live.get("type") != desired["type"]:
                # The type of a Secret is immutable: recreate it. The preconditions make
                # the delete hit exactly the (owned) object inspected above, not one that
                # replaced it meanwhile.
                self.core.delete_namespaced_secret(
                    want.name, want.namespace, body={"preconditions": {
                        "uid": have.uid, "resourceVersion": have.resource_version}},
                    _request_timeout=REQUEST_TIMEOUT)
                self.core.create_namespaced_secret(want.namespace, body,
                                                   _request_timeout=REQUEST_TIMEOUT)
                return "replaced"
            body["metadata"]["resourceVersion"] = have.resource_version
            body["metadata"]["labels"] = {**have.labels, **want.labels}
            body["metadata"]["annotations"] = {**have.annotations, **want.annotations}
            self.core.replace_namespaced_secret(want.name, want.namespace, body,
                                                _request_timeout=REQUEST_TIMEOUT)
            return "replaced"

    def apply_cronjob(self, desired: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """Server-side apply; returns ('created'|'updated'|None, live object).

        Forced apply takes back any field someone else changed (kubectl edit), and an
        unchanged apply is a no-op on the server (the resourceVersion does not move). A live
        CronJob not controlled by the owner in `desired` is never applied over (forced apply
        would take it over): NotOwnedError, and it stays exactly as it was.
        """
        want = meta(desired)
        before = self.read_cronjob(want.namespace, want.name)
        if before is not None and not is_owned_by(before, _owner_uid(desired)):
            raise NotOwnedError(foreign_owner(before, _owner_uid(desired))
                                or f"CronJob {want.name} is not ours")
        body = _copy(desired)
        if before is not None:
            # A uid in the body is a precondition: if our CronJob was replaced by a foreign
            # one since the read above, the API server answers 409 instead of us adopting it.
            body["metadata"]["uid"] = meta(before).uid
        with api_errors(f"apply CronJob {want.name}"):
            response = self.batch.patch_namespaced_cron_job(
                want.name, want.namespace, body,
                field_manager=FIELD_MANAGER, force=True,
                _content_type=APPLY_PATCH, _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT)
        live = self._json(response)
        if before is None:
            return "created", live
        changed = meta(before).resource_version != meta(live).resource_version
        return ("updated" if changed else None), live

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """JSON merge patch of the status subresource (None values delete keys)."""
        try:
            with api_errors(f"patch status of {name}"):
                self.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, PLURAL, name, {"status": dict(status)},
                    _content_type=MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT)
        except NotFound:
            return  # deleted meanwhile: nothing to report on

    def patch_workload(self, plural: str, namespace: str, name: str,
                       patch: Mapping[str, Any]) -> None:
        """JSON merge patch of a Deployment (StatefulSet, DaemonSet)."""
        method = getattr(self.apps, f"patch_namespaced_{WORKLOAD_CLIENT_NAMES[plural]}")
        with api_errors(f"patch {plural} {name}"):
            method(name, namespace, _copy(patch), _content_type=MERGE_PATCH,
                   _request_timeout=REQUEST_TIMEOUT)

    def create_webhook_configuration(self, body: Mapping[str, Any]) -> None:
        with api_errors(f"create MutatingWebhookConfiguration {meta(body).name}"):
            self.admission.create_mutating_webhook_configuration(
                _copy(body), _request_timeout=REQUEST_TIMEOUT)

    def patch_webhook_configuration(self, name: str, patch: Mapping[str, Any]) -> None:
        """JSON merge patch (a `resourceVersion` in it makes a concurrent edit a Conflict)."""
        with api_errors(f"patch MutatingWebhookConfiguration {name}"):
            self.admission.patch_mutating_webhook_configuration(
                name, _copy(patch), _content_type=MERGE_PATCH,
                _request_timeout=REQUEST_TIMEOUT)

    # --- the leader-election Lease (elector.py) ----------------------------------------------

    def _lease_call(self, what: str, call: Any, *args: Any, timeout: float) -> dict[str, Any]:
        """One Lease call as raw JSON. A connection that fails or times out is Unavailable
        too (not only an HTTP answer): the elector must see every failed renewal as one."""
        from urllib3.exceptions import HTTPError

        try:
            with api_errors(what):
                return self._json(call(*args, _preload_content=False,
                                       _request_timeout=timeout))
        except (HTTPError, OSError) as exc:
            raise Unavailable(f"{what}: {exc.__class__.__name__}") from None

    def read_lease(self, namespace: str, name: str,
                   timeout: float = REQUEST_TIMEOUT) -> dict[str, Any] | None:
        """The Lease as JSON, or None when there is none."""
        try:
            return self._lease_call(f"read Lease {name}", self.coordination.read_namespaced_lease,
                                    name, namespace, timeout=timeout)
        except NotFound:
            return None

    def create_lease(self, namespace: str, body: Mapping[str, Any],
                     timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
        """Create the Lease (Conflict: another replica created it first)."""
        return self._lease_call(f"create Lease {meta(body).name}",
                                self.coordination.create_namespaced_lease, namespace,
                                _copy(body), timeout=timeout)

    def replace_lease(self, namespace: str, name: str, body: Mapping[str, Any],
                      timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
        """Replace the Lease; `body` carries the observed resourceVersion, so a write by
        anyone since then is a Conflict (optimistic concurrency), never overwritten."""
        return self._lease_call(f"replace Lease {name}",
                                self.coordination.replace_namespaced_lease, name, namespace,
                                _copy(body), timeout=timeout)

    # --- events ------------------------------------------------------------------------------

    def create_event(self, body: Mapping[str, Any]) -> None:
        """Create a core/v1 Event built by a builder (the webhook's aggregated Events)."""
        with api_errors(f"create Event {meta(body).name}"):
            self.core.create_namespaced_event(meta(body).namespace, _copy(body),
                                              _request_timeout=REQUEST_TIMEOUT)

    def patch_event(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        """JSON merge patch of an Event (an aggregate's count, lastTimestamp, message)."""
        with api_errors(f"patch Event {name}"):
            self.core.patch_namespaced_event(name, namespace, _copy(patch),
                                             _content_type=MERGE_PATCH,
                                             _request_timeout=REQUEST_TIMEOUT)

    def post_event(self, store: Mapping[str, Any], type_: str, reason: str,
                   message: str) -> None:
        """A core/v1 Event on the ResultStore. Best effort: a lost Event is only logged."""
        m = meta(store)
        namespace = m.namespace or "default"
        now = datetime.now(UTC)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{m.name or 'resultstore'}.{uuid.uuid4().hex[:16]}",
                "namespace": namespace,
            },
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": m.name or None,
                "namespace": namespace,
                "uid": m.uid,
                "resourceVersion": m.resource_version,
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": FIELD_MANAGER,
            "action": reason,
            "firstTimestamp": timestamp(now),
            "lastTimestamp": timestamp(now),
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(namespace, body,
                                              _request_timeout=REQUEST_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - events are best effort by design
            log.warning("could not post event %s on %s/%s: %s", reason, namespace,
                        m.name, exc.__class__.__name__)
