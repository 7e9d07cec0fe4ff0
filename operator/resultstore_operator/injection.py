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

# One definition of the Secret's name and mount path, shared with the Secret/CronJob builders.
from .builders.names import config_dir as mount_path
from .builders.names import secret_name

# Public names (docs/CONTRACTS.md "Pod injection").
INJECT_LABEL = "resultstore.dev/inject"
CONTAINERS_ANNOTATION = "resultstore.dev/containers"
MODE_ANNOTATION = "resultstore.dev/mode"
OVERRIDE_ENV_ANNOTATION = "resultstore.dev/override-env"
STATUS_ANNOTATION = "resultstore.dev/injected"

ENV_NAME = "CELERY_RESULT_BACKEND"
STOCK_KEY = "result_backend"

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_TRUE = frozenset({"true", "1", "yes", "on"})

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
    labels = (pod.get("metadata") or {}).get("labels") or {}
    raw = labels.get(INJECT_LABEL)
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
    ref = (entry.get("valueFrom") or {}).get("secretKeyRef") or {}
    return bool(ref.get("name") == secret_name(store) and ref.get("key") == STOCK_KEY)


def _is_our_volume(volume: Mapping[str, Any], store: str) -> bool:
    return (volume.get("secret") or {}).get("secretName") == secret_name(store)


_TOKEN = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_.]{0,62}$")


def _token(value: Any) -> str:
    """A pod's annotation value as an Event may show it: quoted when it is one short word,
    else not at all (whoever reaches the webhook port must not write an Event's text)."""
    text = str(value)
    return repr(text) if _TOKEN.fullmatch(text) else "(a value that is not one word)"


def _skip(store: str | None, message: str, reason: str | None = None) -> InjectionPlan:
    return InjectionPlan(store=store, warnings=(message,), event_reason=reason)


def plan_injection(pod: Mapping[str, Any], lookup: StoreLookup) -> InjectionPlan:
    """Compute the JSONPatch that gives ``pod`` its ResultStore, or say why nothing is done.

    ``pod`` is the admission request's object (``metadata.name`` may be empty for pods a
    controller creates). The plan never refuses: conflicts become warnings and the pod is
    admitted as the user wrote it (or with the parts that do not conflict).
    """
    metadata = pod.get("metadata") or {}
    annotations: Mapping[str, str] = metadata.get("annotations") or {}
    requested = requested_store(pod)
    if requested is None:
        return InjectionPlan(store=None)
    store = requested.name
    if not requested.valid:
        return _skip(
            None, f"label {INJECT_LABEL}={store!r} is not a ResultStore name; nothing injected",
            "InvalidResultStoreName",
        )
    if lookup.state is not StoreState.READY:
        why = {
            StoreState.MISSING: f"ResultStore {store!r} not found",
            StoreState.NOT_READY: f"ResultStore {store!r} is not Ready",
            StoreState.UNKNOWN: f"ResultStore {store!r} could not be read",
        }[lookup.state]
        detail = f" ({lookup.detail})" if lookup.detail else ""
        reason = {
            StoreState.MISSING: "ResultStoreNotFound",
            StoreState.NOT_READY: "ResultStoreNotReady",
            StoreState.UNKNOWN: "ResultStoreUnknown",
        }[lookup.state]
        return _skip(store, f"{why}{detail}; pod admitted without injection", reason)

    mode = pod_mode(annotations)
    if mode is None:
        return _skip(
            store,
            f"annotation {MODE_ANNOTATION}={_token(annotations.get(MODE_ANNOTATION))} is not "
            f"'resultstore' or 'stock'; nothing injected",
            "InvalidInjectionMode",
        )
    override = annotations.get(OVERRIDE_ENV_ANNOTATION, "").strip().lower() in _TRUE
    spec = pod.get("spec") or {}
    warnings: list[str] = []
    patch: JsonPatch = []

    # Which containers: every regular container, or exactly those the annotation names
    # (which may include init containers, for a migration step that needs the store).
    containers: Sequence[Mapping[str, Any]] = spec.get("containers") or []
    init_containers: Sequence[Mapping[str, Any]] = spec.get("initContainers") or []
    targets: list[tuple[str, int, Mapping[str, Any]]]
    if CONTAINERS_ANNOTATION in annotations:
        wanted = [n.strip() for n in annotations[CONTAINERS_ANNOTATION].split(",") if n.strip()]
        by_name: dict[str, tuple[str, int, Mapping[str, Any]]] = {}
        for kind, items in (("initContainers", init_containers), ("containers", containers)):
            for i, c in enumerate(items):
                by_name.setdefault(str(c.get("name")), (kind, i, c))
        targets = []
        for name in wanted:
            if name in by_name:
                if by_name[name] not in targets:
                    targets.append(by_name[name])
            else:
                warnings.append(f"container {name!r} named in {CONTAINERS_ANNOTATION} not found")
    else:
        targets = [("containers", i, c) for i, c in enumerate(containers)]
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
    if not existing:
        if "volumes" in spec and spec["volumes"] is not None:
            patch.append({"op": "add", "path": "/spec/volumes/-", "value": desired_volume(store)})
        else:
            patch.append({"op": "add", "path": "/spec/volumes", "value": [desired_volume(store)]})

    path = mount_path(store)
    want_env = desired_env(store, mode)
    for kind, index, container in targets:
        cname = container.get("name")
        base = f"/spec/{kind}/{index}"
        mounts: Sequence[Mapping[str, Any]] = container.get("volumeMounts") or []
        at_path = [m for m in mounts if m.get("mountPath") == path]
        if at_path and at_path[0].get("name") != vname:
            # Two mounts on one path would make the API server reject the pod: skip instead.
            warnings.append(f"container {cname!r} already mounts {path}; container skipped")
            continue
        if not at_path:
            if container.get("volumeMounts") is not None:
                patch.append({"op": "add", "path": f"{base}/volumeMounts/-",
                              "value": desired_mount(store)})
            else:
                patch.append({"op": "add", "path": f"{base}/volumeMounts",
                              "value": [desired_mount(store)]})

        env: Sequence[Mapping[str, Any]] = container.get("env") or []
        found = [(j, e) for j, e in enumerate(env) if e.get("name") == ENV_NAME]
        if not found:
            if container.get("env") is not None:
                patch.append({"op": "add", "path": f"{base}/env/-", "value": want_env})
            else:
                patch.append({"op": "add", "path": f"{base}/env", "value": [want_env]})
            continue
        j, current = found[-1]  # the last definition is the one the kubelet uses
        if dict(current) == want_env:
            continue
        if _is_ours_env(current, store) or override:
            patch.append({"op": "replace", "path": f"{base}/env/{j}", "value": want_env})
        else:
            warnings.append(
                f"container {cname!r} sets {ENV_NAME} explicitly; kept "
                f"(annotate {OVERRIDE_ENV_ANNOTATION}: \"true\" to replace it)"
            )

    if patch:
        if annotations.get(STATUS_ANNOTATION) != store:
            if metadata.get("annotations") is None:
                patch.append({"op": "add", "path": "/metadata/annotations",
                              "value": {STATUS_ANNOTATION: store}})
            else:
                patch.append({"op": "add",
                              "path": f"/metadata/annotations/{_escape(STATUS_ANNOTATION)}",
                              "value": store})
    return InjectionPlan(store=store, patch=patch, warnings=tuple(warnings))
