"""Typed read-only views of the API objects the operator reads (plain JSON dicts).

Why: reads return the API's own JSON so that comparisons with the builders' output need no
model classes, but walking that JSON by hand (`(obj.get("metadata") or {}).get(...)`) at every
use repeats the same None handling everywhere and gets it subtly different each time. These
accessors do it once: a missing or null section reads as empty, never raises. Pure (no
import at all), so the pure modules may use them as well as the I/O ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_EMPTY: Mapping[str, Any] = {}


def section(obj: Mapping[str, Any] | None, key: str) -> Mapping[str, Any]:
    """`obj[key]` when it is an object (metadata, spec, status, data, ...), else empty."""
    value = (obj or _EMPTY).get(key)
    return value if isinstance(value, Mapping) else _EMPTY


def items(obj: Mapping[str, Any] | None, key: str) -> tuple[Any, ...]:
    """`obj[key]` when it is a list (containers, volumes, env, ...), else empty."""
    value = (obj or _EMPTY).get(key)
    return tuple(value) if isinstance(value, list | tuple) else ()


@dataclass(frozen=True)
class ObjectMeta:
    """An object's metadata; absent strings read as "" (uid and resourceVersion as None, so
    a body built from them says "not known" rather than "empty")."""

    name: str
    namespace: str
    generate_name: str
    uid: str | None
    resource_version: str | None
    labels: Mapping[str, Any]
    annotations: Mapping[str, Any]
    owner_references: tuple[Mapping[str, Any], ...]
    deletion_timestamp: str | None

    @property
    def controller(self) -> Mapping[str, Any] | None:
        """The controlling ownerReference, if any (at most one per object)."""
        for ref in self.owner_references:
            if ref.get("controller"):
                return ref
        return None


def meta(obj: Mapping[str, Any] | None) -> ObjectMeta:
    """The typed metadata of `obj` (a Secret, a ResultStore, a pod, a pod template...)."""
    m = section(obj, "metadata")
    uid, rv, deleted = m.get("uid"), m.get("resourceVersion"), m.get("deletionTimestamp")
    return ObjectMeta(
        name=str(m.get("name") or ""),
        namespace=str(m.get("namespace") or ""),
        generate_name=str(m.get("generateName") or ""),
        uid=None if uid is None else str(uid),
        resource_version=None if rv is None else str(rv),
        labels=section(m, "labels"),
        annotations=section(m, "annotations"),
        owner_references=tuple(r for r in items(m, "ownerReferences")
                               if isinstance(r, Mapping)),
        deletion_timestamp=None if not deleted else str(deleted),
    )


def conditions(obj: Mapping[str, Any] | None) -> tuple[Mapping[str, Any], ...]:
    """`status.conditions`, the well-formed entries only."""
    return tuple(c for c in items(section(obj, "status"), "conditions")
                 if isinstance(c, Mapping))


def condition(obj: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    """The condition of this type in `status.conditions`, or None."""
    for cond in conditions(obj):
        if cond.get("type") == type_:
            return cond
    return None


def pod_template(workload: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A Deployment's (StatefulSet's, DaemonSet's) `spec.template`."""
    return section(section(workload, "spec"), "template")
