"""Pure pod-injection planning: from a pod dict and the ResultStore's state to a JSONPatch.

Why a pure module: the admission webhook must answer within a few seconds and must never
refuse a pod, so every decision (what to add, what to keep, why nothing was injected) is made
here without I/O, where it can be unit-tested exhaustively. The webhook server only reads the
ResultStore, calls :func:`plan_injection` and returns the patch and warnings.

The plan is idempotent: applying its patch and planning again yields an empty patch. That is
what makes ``reinvocationPolicy: IfNeeded`` safe and a second admission harmless.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Public names (docs/CONTRACTS.md "Pod injection"), defined once in api.py.
from .api import (
    CONTAINERS_ANNOTATION,
    INJECT_LABEL,
    MODE_ANNOTATION,
    OVERRIDE_ENV_ANNOTATION,
    STATUS_ANNOTATION,
)

# One definition of the Secret's name and mount path, shared with the Secret/CronJob builders.
from .builders.names import config_dir as mount_path
from .builders.names import secret_name
from .settings import TRUTHY
from .views import meta, section

ENV_NAME = "CELERY_RESULT_BACKEND"
STOCK_KEY = "result_backend"

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

JsonPatch = list[dict[str, Any]]


class Mode(enum.Enum):
    """How CELERY_RESULT_BACKEND is set: our config-directory URL, or stock Celery's URL."""

    RESULTSTORE = "resultstore"
    STOCK = "stock"


class StoreState(enum.Enum):
    """What the webhook learnt about the ResultStore named by the label."""

    READY = "Ready"
    NOT_READY = "NotReady"
    MISSING = "Missing"
    UNKNOWN = "Unknown"  # the API could not be asked in time


@dataclass(frozen=True)
class StoreLookup:
    """The ResultStore's state plus a human reason (never a secret) for warnings and events."""

    state: StoreState
    detail: str = ""


@dataclass(frozen=True)
class InjectionPlan:
    """The outcome of planning: a JSONPatch (possibly empty) plus warnings for the user.

    ``event_reason`` is set when the user should also see an Event (the store is not usable);
    plain informational warnings (a kept user variable) stay admission warnings only.
    """

    store: str | None
    patch: JsonPatch = field(default_factory=list)
    warnings: tuple[str, ...] = ()
    event_reason: str | None = None

    @property
    def injected(self) -> bool:
        return bool(self.patch)


@dataclass(frozen=True)
class RequestedStore:
    """The store a pod's label names, and whether that is a valid ResultStore name."""

    name: str
    valid: bool


def requested_store(pod: Mapping[str, Any]) -> RequestedStore | None:
    """The ResultStore named by the pod's inject label (None when the pod is not labelled)."""
    raw = meta(pod).labels.get(INJECT_LABEL)
    if raw is None:
        return None
    name = str(raw).strip()
    return RequestedStore(name, bool(name) and len(name) <= 253
                          and bool(_DNS_SUBDOMAIN.match(name)))


def backend_url(store: str) -> str:
    """The config-directory URL the backend reads (docs/CONTRACTS.md "Backend URLs")."""
    return f"resultstore://{mount_path(store)}"


def volume_name(store: str) -> str:
    """A volume name (a DNS label, at most 63 characters) that is stable for a store name.

    Store names are DNS subdomains (dots, up to 253 characters); volume names are not, so long
    or dotted names fall back to a hash-suffixed form. Stability matters for idempotency.
    """
    candidate = f"resultstore-{store}"
    if len(candidate) <= 63 and _DNS_LABEL.match(candidate):
        return candidate
    digest = hashlib.sha256(store.encode()).hexdigest()[:10]
    stem = re.sub(r"[^a-z0-9-]", "-", store)[: 63 - len("resultstore--") - 10].strip("-")
    return f"resultstore-{stem}-{digest}" if stem else f"resultstore-{digest}"


def pod_mode(annotations: Mapping[str, str]) -> Mode | None:
    """The injection mode from annotations; None for an unknown value (reported, not guessed)."""
    raw = annotations.get(MODE_ANNOTATION, Mode.RESULTSTORE.value).strip().lower()
    for mode in Mode:
        if mode.value == raw:
            return mode
    return None


def desired_env(store: str, mode: Mode) -> dict[str, Any]:
    if mode is Mode.STOCK:
        return {
            "name": ENV_NAME,
            "valueFrom": {"secretKeyRef": {"name": secret_name(store), "key": STOCK_KEY}},
        }
    return {"name": ENV_NAME, "value": backend_url(store)}


def desired_volume(store: str) -> dict[str, Any]:
    return {"name": volume_name(store), "secret": {"secretName": secret_name(store)}}


def desired_mount(store: str) -> dict[str, Any]:
    return {"name": volume_name(store), "mountPath": mount_path(store), "readOnly": True}


def _escape(token: str) -> str:
    """RFC 6901 escaping for a JSON Pointer token."""
    return token.replace("~", "~0").replace("/", "~1")


def _is_ours_env(entry: Mapping[str, Any], store: str) -> bool:
    """True when an existing CELERY_RESULT_BACKEND entry is one this webhook writes (any mode)."""
    if entry.get("value") == backend_url(store):
        return True
    ref = section(section(entry, "valueFrom"), "secretKeyRef")
    return bool(ref.get("name") == secret_name(store) and ref.get("key") == STOCK_KEY)


def _is_our_volume(volume: Mapping[str, Any], store: str) -> bool:
    return section(volume, "secret").get("secretName") == secret_name(store)


_TOKEN = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_.]{0,62}$")


def _token(value: Any) -> str:
    """A pod's annotation value as an Event may show it: quoted when it is one short word,
    else not at all (whoever reaches the webhook port must not write an Event's text)."""
    text = str(value)
    return repr(text) if _TOKEN.fullmatch(text) else "(a value that is not one word)"


def _skip(store: str | None, message: str, reason: str | None = None) -> InjectionPlan:
    return InjectionPlan(store=store, warnings=(message,), event_reason=reason)


_NOT_READY_WHY = {
    StoreState.MISSING: ("not found", "ResultStoreNotFound"),
    StoreState.NOT_READY: ("is not Ready", "ResultStoreNotReady"),
    StoreState.UNKNOWN: ("could not be read", "ResultStoreUnknown"),
}

Target = tuple[str, int, Mapping[str, Any]]  # (containers | initContainers, index, container)


def _unusable(requested: RequestedStore, lookup: StoreLookup) -> InjectionPlan | None:
    """The plan when the label names no usable store (None: the store is Ready)."""
    store = requested.name
    if not requested.valid:
        return _skip(
            None, f"label {INJECT_LABEL}={store!r} is not a ResultStore name; nothing injected",
            "InvalidResultStoreName",
        )
    if lookup.state is StoreState.READY:
        return None
    why, reason = _NOT_READY_WHY[lookup.state]
    detail = f" ({lookup.detail})" if lookup.detail else ""
    return _skip(store, f"ResultStore {store!r} {why}{detail}; pod admitted without injection",
                 reason)


def _targets(spec: Mapping[str, Any], annotations: Mapping[str, str],
             warnings: list[str]) -> list[Target]:
    """Every regular container, or exactly those the annotation names (which may include
    init containers, for a migration step that needs the store); names not found warn."""
    containers: Sequence[Mapping[str, Any]] = spec.get("containers") or []
    if CONTAINERS_ANNOTATION not in annotations:
        return [("containers", i, c) for i, c in enumerate(containers)]
    init_containers: Sequence[Mapping[str, Any]] = spec.get("initContainers") or []
    wanted = [n.strip() for n in annotations[CONTAINERS_ANNOTATION].split(",") if n.strip()]
    by_name: dict[str, Target] = {}
    for kind, entries in (("initContainers", init_containers), ("containers", containers)):
        for i, c in enumerate(entries):
            by_name.setdefault(str(c.get("name")), (kind, i, c))
    targets: list[Target] = []
    for name in wanted:
        if name not in by_name:
            warnings.append(f"container {name!r} named in {CONTAINERS_ANNOTATION} not found")
        elif by_name[name] not in targets:
            targets.append(by_name[name])
    return targets


def _add(patch: JsonPatch, parent: Mapping[str, Any], key: str, path: str,
         value: Any) -> None:
    """Append `value` to the list `parent[key]`, creating the list when it is absent."""
    if parent.get(key) is not None:
        patch.append({"op": "add", "path": f"{path}/{key}/-", "value": value})
    else:
        patch.append({"op": "add", "path": f"{path}/{key}", "value": [value]})


def _container_patch(target: Target, store: str, want_env: Mapping[str, Any],
                     override: bool, patch: JsonPatch, warnings: list[str]) -> None:
    """The mount and the variable for one container, unless it conflicts (then a warning)."""
    kind, index, container = target
    cname = container.get("name")
    base = f"/spec/{kind}/{index}"
    vname, path = volume_name(store), mount_path(store)
    mounts: Sequence[Mapping[str, Any]] = container.get("volumeMounts") or []
    at_path = [m for m in mounts if m.get("mountPath") == path]
    if at_path and at_path[0].get("name") != vname:
        # Two mounts on one path would make the API server reject the pod: skip instead.
        warnings.append(f"container {cname!r} already mounts {path}; container skipped")
        return
    if not at_path:
        _add(patch, container, "volumeMounts", base, desired_mount(store))
    env: Sequence[Mapping[str, Any]] = container.get("env") or []
    found = [(j, e) for j, e in enumerate(env) if e.get("name") == ENV_NAME]
    if not found:
        _add(patch, container, "env", base, dict(want_env))
        return
    j, current = found[-1]  # the last definition is the one the kubelet uses
    if dict(current) == want_env:
        return
    if _is_ours_env(current, store) or override:
        patch.append({"op": "replace", "path": f"{base}/env/{j}", "value": dict(want_env)})
    else:
        warnings.append(
            f"container {cname!r} sets {ENV_NAME} explicitly; kept "
            f"(annotate {OVERRIDE_ENV_ANNOTATION}: \"true\" to replace it)"
        )


def _status_patch(pod: Mapping[str, Any], store: str) -> JsonPatch:
    """The annotation saying which store was injected (nothing when it already says so)."""
    annotations = section(pod.get("metadata"), "annotations")
    if annotations.get(STATUS_ANNOTATION) == store:
        return []
    if section(pod, "metadata").get("annotations") is None:
        return [{"op": "add", "path": "/metadata/annotations",
                 "value": {STATUS_ANNOTATION: store}}]
    return [{"op": "add", "path": f"/metadata/annotations/{_escape(STATUS_ANNOTATION)}",
             "value": store}]


def plan_injection(pod: Mapping[str, Any], lookup: StoreLookup) -> InjectionPlan:
    """Compute the JSONPatch that gives ``pod`` its ResultStore, or say why nothing is done.

    ``pod`` is the admission request's object (``metadata.name`` may be empty for pods a
    controller creates). The plan never refuses: conflicts become warnings and the pod is
    admitted as the user wrote it (or with the parts that do not conflict).
    """
    annotations: Mapping[str, str] = meta(pod).annotations
    requested = requested_store(pod)
    if requested is None:
        return InjectionPlan(store=None)
    unusable = _unusable(requested, lookup)
    if unusable is not None:
        return unusable
    store = requested.name
    mode = pod_mode(annotations)
    if mode is None:
        return _skip(
            store,
            f"annotation {MODE_ANNOTATION}={_token(annotations.get(MODE_ANNOTATION))} is not "
            f"'resultstore' or 'stock'; nothing injected",
            "InvalidInjectionMode",
        )
    override = str(annotations.get(OVERRIDE_ENV_ANNOTATION, "")).strip().lower() in TRUTHY
    spec = section(pod, "spec")
    warnings: list[str] = []
    targets = _targets(spec, annotations, warnings)
    if not targets:
        return InjectionPlan(
            store=store, warnings=(*warnings, "no container selected; nothing injected")
        )

    # The volume: reuse ours if present, refuse to clobber a user volume of the same name.
    vname = volume_name(store)
    volumes: Sequence[Mapping[str, Any]] = spec.get("volumes") or []
    existing = [v for v in volumes if v.get("name") == vname]
    if existing and not _is_our_volume(existing[0], store):
        return _skip(
            store, f"volume {vname!r} already exists with another source; nothing injected",
            "InjectionConflict",
        )
    patch: JsonPatch = []
    if not existing:
        _add(patch, spec, "volumes", "/spec", desired_volume(store))
    want_env = desired_env(store, mode)
    for target in targets:
        _container_patch(target, store, want_env, override, patch, warnings)
    if patch:
        patch += _status_patch(pod, store)
    return InjectionPlan(store=store, patch=patch, warnings=tuple(warnings))
