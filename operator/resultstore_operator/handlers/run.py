"""One reconcile's view of a ResultStore, and the status and Events it produces.

Why its own module: every step of a reconcile (database, credentials, CronJob, deletion)
reports through the same object, which batches the conditions into one status patch at the
end while rotation state is written at once (the next step must survive a crash).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

from ..builders import conditions as c
from ..builders import reasons as r
from ..builders import rotation as rot
from ..builders.ownership import owner_reference

log = logging.getLogger("resultstore.operator")


class StoreApi(Protocol):
    """The Kubernetes calls the controller makes (`kube.Kube`; tests: an in-memory fake)."""

    def read_store(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def read_secret_metadata(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def put_secret(self, desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> str: ...

    def apply_cronjob(self, desired: Mapping[str, Any]
                      ) -> tuple[str | None, dict[str, Any]]: ...

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None: ...

    def post_event(self, store: Mapping[str, Any], type_: str, reason: str,
                   message: str) -> None: ...


class StoreError(Exception):
    """A reconcile failure with a reason for the conditions (message is password-free)."""

    def __init__(self, reason: str, message: str,
                 affects: tuple[str, ...] = (r.SCHEMA_READY, r.CREDENTIALS_READY)) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.affects = affects


class Run:
    """One reconcile's view of the object plus the status and events it produces."""

    def __init__(self, kube: StoreApi, obj: Mapping[str, Any], now: datetime) -> None:
        self.kube = kube
        self.obj = obj
        self.now = now
        meta = obj.get("metadata") or {}
        self.name: str = meta["name"]
        self.namespace: str = meta["namespace"]
        self.uid: str = meta["uid"]
        self.generation: int | None = meta.get("generation")
        self.annotations: Mapping[str, str] = meta.get("annotations") or {}
        self.status: Mapping[str, Any] = obj.get("status") or {}
        self.updates: list[c.Condition] = []
        self.patch: dict[str, Any] = {}
        self.owner = owner_reference(self.name, self.uid)
        #: the store's Secret did not exist when its ownership was checked: the credential
        #: observation then needs no read of it (a Secret created in between makes the
        #: create a Conflict, retried, never an overwrite)
        self.secret_absent = False

    @property
    def conditions(self) -> Any:
        return self.status.get("conditions")

    def cond(self, type_: str, ok: bool | str, reason: str, message: str) -> None:
        self.updates.append(c.condition(type_, ok, reason, message, self.generation, self.now))

    def event(self, type_: str, reason: str, message: str) -> None:
        log.log(logging.WARNING if type_ == "Warning" else logging.INFO,
                "%s/%s: %s: %s", self.namespace, self.name, reason, message)
        self.kube.post_event(self.obj, type_, reason, message)

    def failure_changed(self, reason: str, message: str, type_: str) -> bool:
        old = c.get_condition(self.conditions, type_)
        return old is None or old.get("reason") != reason or old.get("message") != message

    def persist_credentials(self, state: rot.CredentialState) -> None:
        """Write rotation state right away: the next step must survive a crash."""
        self.kube.patch_status(self.namespace, self.name, {"credentials": state.to_status()})
        self.patch["credentials"] = state.to_status()

    def finish(self, rotation_phase: str | None) -> None:
        merged = c.merge_conditions(self.conditions, self.updates)
        ready = c.ready_condition(merged, self.generation, self.now)
        merged = c.merge_conditions(merged, [ready])
        new_ready = c.get_condition(merged, r.READY) or ready
        self.patch.update({
            "conditions": merged,
            "phase": c.phase_for(merged, rotation_phase),
            "observedGeneration": self.generation,
        })
        self.kube.patch_status(self.namespace, self.name, self.patch)
        event = c.ready_event(c.get_condition(self.conditions, r.READY), new_ready)
        if event is not None:
            self.event(*event)
