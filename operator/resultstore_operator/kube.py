"""Kubernetes I/O for the operator: read, create-or-replace, server-side apply, events.

Handlers call these with objects built by the pure builders. Reads return plain dicts (the
API's own JSON, camelCase) so that comparisons with builder output need no model classes.
Every write is idempotent: a Secret is replaced only when it differs, a CronJob is
server-side applied (a no-op when unchanged), status is merge-patched.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .builders.conditions import timestamp
from .builders.ownership import foreign_owner, is_owned_by
from .spec import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)

FIELD_MANAGER = "resultstore-operator"
REQUEST_TIMEOUT = 30.0
#: Ask the API server for an object's metadata only (no `data` leaves the server).
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


class KubeError(Exception):
    """An API call failed; `transient` tells the caller whether a retry may help."""

    def __init__(self, message: str, status: int | None = None,
                 transient: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient


class NotOwnedError(KubeError):
    """An object of the name we manage exists but is not ours: it is left as it was.

    Not transient in the retry sense (waiting does not help), but the operator re-checks on
    its timer so that deleting the foreign object lets it create its own.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, status=None, transient=False)


def _owner_uid(desired: Mapping[str, Any]) -> str:
    refs = (desired.get("metadata") or {}).get("ownerReferences") or []
    return str(refs[0].get("uid") or "") if refs else ""


def new_api_client() -> Any:
    """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def _api_error(exc: Exception, what: str) -> KubeError:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", "") or exc.__class__.__name__
    detail = ""
    body = getattr(exc, "body", None)
    if body:
        try:
            detail = json.loads(body).get("message", "")
        except (ValueError, AttributeError):
            detail = ""
    transient = status is None or status in (409, 429) or status >= 500
    msg = f"{what}: API answered {status} {reason}"
    if detail:
        msg += f": {detail}"
    return KubeError(msg, status=status, transient=transient)


class Kube:
    """The operator's API calls (synchronous; handlers run them in worker threads)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.api: Any = api_client
        self.core: Any = client.CoreV1Api(api_client)
        self.batch: Any = client.BatchV1Api(api_client)
        self.custom: Any = client.CustomObjectsApi(api_client)

    # --- reads -------------------------------------------------------------------------------

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        data = response.data if hasattr(response, "data") else response.read()
        return dict(json.loads(data))

    def _read(self, call: Any, what: str, *args: Any) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._json(call(*args, _preload_content=False,
                                   _request_timeout=REQUEST_TIMEOUT))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _api_error(exc, what) from None

    def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read(self.core.read_namespaced_secret, f"read Secret {name}", name,
                          namespace)

    def read_secret_metadata(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Secret's metadata only (PartialObjectMetadata): its data is never transferred.

        Used to check the admin Secret's opt-in label before the data is read at all.
        """
        from kubernetes.client.exceptions import ApiException

        try:
            return self._json(self.core.read_namespaced_secret(
                name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT,
                _headers={"Accept": METADATA_ONLY}))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _api_error(exc, f"read metadata of Secret {name}") from None

    def read_cronjob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read(self.batch.read_namespaced_cron_job, f"read CronJob {name}", name,
                          namespace)

    def read_store(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._json(self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _api_error(exc, f"read ResultStore {name}") from None

    # --- writes ------------------------------------------------------------------------------

    def put_secret(self, desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> str:
        """Create, or replace the live Secret with `desired`; returns 'created'/'replaced'.

        A replace (not a patch) so that keys someone added are removed too. The live
        object's resourceVersion makes a concurrent edit fail with 409 (retried later)
        instead of being silently overwritten. Labels/annotations others added are kept.
        A live Secret that is not controlled by the owner in `desired` (same uid) is never
        replaced or deleted: NotOwnedError, and the object stays exactly as it was.
        """
        from kubernetes.client.exceptions import ApiException

        meta = desired["metadata"]
        body = json.loads(json.dumps(desired))
        if live is not None and not is_owned_by(live, _owner_uid(desired)):
            raise NotOwnedError(foreign_owner({"kind": "Secret", **live}, _owner_uid(desired))
                                or f"Secret {meta['name']} is not ours")
        try:
            if live is None:
                self.core.create_namespaced_secret(meta["namespace"], body,
                                                   _request_timeout=REQUEST_TIMEOUT)
                return "created"
            if live.get("type") != desired["type"]:
                # The type of a Secret is immutable: recreate it. The preconditions make
                # the delete hit exactly the (owned) object inspected above, not one that
                # replaced it meanwhile.
                live_meta = live.get("metadata") or {}
                self.core.delete_namespaced_secret(
                    meta["name"], meta["namespace"], body={"preconditions": {
                        "uid": live_meta.get("uid"),
                        "resourceVersion": live_meta.get("resourceVersion")}},
                    _request_timeout=REQUEST_TIMEOUT)
                self.core.create_namespaced_secret(meta["namespace"], body,
                                                   _request_timeout=REQUEST_TIMEOUT)
                return "replaced"
            live_meta = live.get("metadata") or {}
            body["metadata"]["resourceVersion"] = live_meta.get("resourceVersion")
            body["metadata"]["labels"] = {**(live_meta.get("labels") or {}),
                                          **meta.get("labels", {})}
            body["metadata"]["annotations"] = {**(live_meta.get("annotations") or {}),
                                               **meta.get("annotations", {})}
            self.core.replace_namespaced_secret(meta["name"], meta["namespace"], body,
                                                _request_timeout=REQUEST_TIMEOUT)
            return "replaced"
        except ApiException as exc:
            raise _api_error(exc, f"write Secret {meta['name']}") from None

    def apply_cronjob(self, desired: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """Server-side apply; returns ('created'|'updated'|None, live object).

        Forced apply takes back any field someone else changed (kubectl edit), and an
        unchanged apply is a no-op on the server (the resourceVersion does not move). A live
        CronJob not controlled by the owner in `desired` is never applied over (forced apply
        would take it over): NotOwnedError, and it stays exactly as it was.
        """
        from kubernetes.client.exceptions import ApiException

        meta = desired["metadata"]
        before = self.read_cronjob(meta["namespace"], meta["name"])
        if before is not None and not is_owned_by(before, _owner_uid(desired)):
            raise NotOwnedError(foreign_owner(before, _owner_uid(desired))
                                or f"CronJob {meta['name']} is not ours")
        body = json.loads(json.dumps(desired))
        if before is not None:
            # A uid in the body is a precondition: if our CronJob was replaced by a foreign
            # one since the read above, the API server answers 409 instead of us adopting it.
            body["metadata"]["uid"] = (before.get("metadata") or {}).get("uid")
        try:
            response = self.batch.patch_namespaced_cron_job(
                meta["name"], meta["namespace"], body,
                field_manager=FIELD_MANAGER, force=True,
                _content_type="application/apply-patch+yaml", _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            raise _api_error(exc, f"apply CronJob {meta['name']}") from None
        live = self._json(response)
        if before is None:
            return "created", live
        old_rv = (before.get("metadata") or {}).get("resourceVersion")
        new_rv = (live.get("metadata") or {}).get("resourceVersion")
        return ("updated" if old_rv != new_rv else None), live

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """JSON merge patch of the status subresource (None values delete keys)."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, {"status": dict(status)},
                _content_type="application/merge-patch+json",
                _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return  # deleted meanwhile: nothing to report on
            raise _api_error(exc, f"patch status of {name}") from None

    def post_event(self, store: Mapping[str, Any], type_: str, reason: str,
                   message: str) -> None:
        """A core/v1 Event on the ResultStore. Best effort: a lost Event is only logged."""
        meta = store.get("metadata") or {}
        namespace = meta.get("namespace", "default")
        now = datetime.now(UTC)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{meta.get('name', 'resultstore')}.{uuid.uuid4().hex[:16]}",
                "namespace": namespace,
            },
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "ResultStore",
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
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
                        meta.get("name"), exc.__class__.__name__)
