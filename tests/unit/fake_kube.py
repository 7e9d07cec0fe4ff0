"""An in-memory API server for the controller's unit tests: the `handlers.StoreApi` seam.

It keeps the objects the controller reads and writes as the API's own JSON, and enforces the
rules the real client (resultstore_operator.kube) enforces, so that a test of the controller
can fail for the reasons a cluster would make it fail: a Secret or CronJob not controlled by
the store is never written (NotOwnedError), a replace carries the resourceVersion it read
(a stale one is a 409), the status is a JSON merge patch (None deletes a key), a CronJob
apply that changes nothing reports no action. Every effective write is recorded in
`writes`, every Event in `events`; `fail` makes the next calls of a method raise.

The e2e tests (tests/e2e) run the same controller against a real API server.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from resultstore_operator.builders.ownership import foreign_owner, is_owned_by
from resultstore_operator.kube import KubeError, NotOwnedError

Key = tuple[str, str]


def _owner_uid(desired: Mapping[str, Any]) -> str:
    refs = (desired.get("metadata") or {}).get("ownerReferences") or []
    return str(refs[0].get("uid") or "") if refs else ""


def merge_patch(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """RFC 7386, as the API server applies `application/merge-patch+json`."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


@dataclass
class Event:
    store: str
    type: str
    reason: str
    message: str


@dataclass
class FakeKube:
    stores: dict[Key, dict[str, Any]] = field(default_factory=dict)
    secrets: dict[Key, dict[str, Any]] = field(default_factory=dict)
    cronjobs: dict[Key, dict[str, Any]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    #: effective writes, e.g. ("secret", "created", "team/orders-resultstore")
    writes: list[tuple[str, str, str]] = field(default_factory=list)
    #: method name -> errors its next calls raise (one per call)
    fail: dict[str, list[Exception]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    _versions: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    # --- test set-up -------------------------------------------------------------------------

    def _stamp(self, obj: dict[str, Any]) -> None:
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{next(self._versions)}")
        meta["resourceVersion"] = str(next(self._versions))

    def add_store(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        stored = copy.deepcopy(dict(obj))
        self._stamp(stored)
        meta = stored["metadata"]
        self.stores[(meta["namespace"], meta["name"])] = stored
        return stored

    def add_secret(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        stored = copy.deepcopy(dict(obj))
        stored.setdefault("kind", "Secret")
        self._stamp(stored)
        meta = stored["metadata"]
        self.secrets[(meta["namespace"], meta["name"])] = stored
        return stored

    def _call(self, method: str) -> None:
        self.calls.append(method)
        pending = self.fail.get(method)
        if pending:
            raise pending.pop(0)

    # --- reads ---------------------------------------------------------------------------------

    def read_store(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._call("read_store")
        obj = self.stores.get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._call("read_secret")
        obj = self.secrets.get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def read_secret_metadata(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._call("read_secret_metadata")
        obj = self.secrets.get((namespace, name))
        if obj is None:
            return None
        return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                "metadata": copy.deepcopy(obj["metadata"])}

    # --- writes --------------------------------------------------------------------------------

    def put_secret(self, desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> str:
        self._call("put_secret")
        meta = desired["metadata"]
        key = (meta["namespace"], meta["name"])
        uid = _owner_uid(desired)
        if live is not None and not is_owned_by(live, uid):
            raise NotOwnedError(foreign_owner({"kind": "Secret", **live}, uid)
                                or f"Secret {meta['name']} is not ours")
        current = self.secrets.get(key)
        body = copy.deepcopy(dict(desired))
        if live is None:
            if current is not None:
                raise KubeError(f"create Secret {meta['name']}: API answered 409 AlreadyExists",
                                status=409)
            self._stamp(body)
            self.secrets[key] = body
            self.writes.append(("secret", "created", "/".join(key)))
            return "created"
        live_meta = live.get("metadata") or {}
        if current is None or current["metadata"]["resourceVersion"] != \
                live_meta.get("resourceVersion"):
            raise KubeError(f"write Secret {meta['name']}: API answered 409 Conflict",
                            status=409)
        body["metadata"]["uid"] = current["metadata"]["uid"]
        body["metadata"]["labels"] = {**(live_meta.get("labels") or {}),
                                      **meta.get("labels", {})}
        body["metadata"]["annotations"] = {**(live_meta.get("annotations") or {}),
                                           **meta.get("annotations", {})}
        self._stamp(body)
        self.secrets[key] = body
        self.writes.append(("secret", "replaced", "/".join(key)))
        return "replaced"

    def apply_cronjob(self, desired: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
        self._call("apply_cronjob")
        meta = desired["metadata"]
        key = (meta["namespace"], meta["name"])
        before = self.cronjobs.get(key)
        uid = _owner_uid(desired)
        if before is not None and not is_owned_by(before, uid):
            raise NotOwnedError(foreign_owner(before, uid) or f"CronJob {meta['name']} "
                                                              f"is not ours")
        body = copy.deepcopy(dict(desired))
        if before is not None:
            unchanged = {k: v for k, v in body.items() if k != "metadata"} == \
                {k: v for k, v in before.items() if k != "metadata"}
            if unchanged:
                return None, copy.deepcopy(before)
            body["metadata"]["uid"] = before["metadata"]["uid"]
        self._stamp(body)
        self.cronjobs[key] = body
        action = "created" if before is None else "updated"
        self.writes.append(("cronjob", action, "/".join(key)))
        return action, copy.deepcopy(body)

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self._call("patch_status")
        obj = self.stores.get((namespace, name))
        if obj is None:
            return
        merge_patch(obj.setdefault("status", {}), status)

    def post_event(self, store: Mapping[str, Any], type_: str, reason: str,
                   message: str) -> None:
        self._call("post_event")
        self.events.append(Event(store["metadata"]["name"], type_, reason, message))

    # --- assertions' helpers -------------------------------------------------------------------

    def reasons(self) -> list[str]:
        return [e.reason for e in self.events]

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return dict(self.stores[(namespace, name)].get("status") or {})
