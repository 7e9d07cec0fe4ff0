"""metav1.Condition bookkeeping and the derived Ready condition and phase.

`lastTransitionTime` must only move when the status flips, otherwise watchers (and humans)
cannot tell how long a store has been unhealthy; merge_conditions keeps that invariant.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from . import reasons as r
from .ownership import ADMIN_CREDENTIALS_LABEL

Condition = dict[str, Any]


def timestamp(now: datetime) -> str:
    """RFC 3339 in UTC with a Z suffix and whole seconds, as Kubernetes writes them."""
    return now.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def condition(type_: str, status: bool | str, reason: str, message: str,
              generation: int | None, now: datetime) -> Condition:
    if isinstance(status, bool):
        status = "True" if status else "False"
    out: Condition = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": timestamp(now),
    }
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def merge_conditions(existing: Iterable[Mapping[str, Any]] | None,
                     updates: Iterable[Condition]) -> list[Condition]:
    """Apply `updates` over `existing`, keeping lastTransitionTime when status is unchanged."""
    by_type: dict[str, Condition] = {c["type"]: dict(c) for c in existing or [] if "type" in c}
    for new in updates:
        old = by_type.get(new["type"])
        merged = dict(new)
        if old is not None and old.get("status") == new["status"] and old.get(
                "lastTransitionTime"):
            merged["lastTransitionTime"] = old["lastTransitionTime"]
        by_type[new["type"]] = merged
    order = [r.READY, *r.COMPONENT_CONDITIONS, r.CREDENTIALS_ROTATING]
    ranked = sorted(by_type.values(),
                    key=lambda c: (order.index(c["type"]) if c["type"] in order else 99,
                                   c["type"]))
    return ranked


def get_condition(conditions: Iterable[Mapping[str, Any]] | None,
                  type_: str) -> Mapping[str, Any] | None:
    for c in conditions or []:
        if c.get("type") == type_:
            return c
    return None


def ready_condition(conditions: Iterable[Mapping[str, Any]] | None, generation: int | None,
                    now: datetime) -> Condition:
    """Ready is True only when every component condition is True; else the first culprit."""
    current = list(conditions or [])
    for type_ in r.COMPONENT_CONDITIONS:
        c = get_condition(current, type_)
        if c is None:
            return condition(r.READY, "Unknown" if not current else False, r.PENDING,
                             f"{type_} not yet reported", generation, now)
        if c.get("status") != "True":
            return condition(r.READY, False, str(c.get("reason") or r.PENDING),
                             str(c.get("message") or ""), generation, now)
    return condition(r.READY, True, r.READY_REASON, "result store is ready", generation, now)


def failure_conditions(reason: str, message: str, generation: int | None, now: datetime,
                       types: Iterable[str] = r.COMPONENT_CONDITIONS) -> list[Condition]:
    """The same failure on several conditions (e.g. the database cannot be reached)."""
    return [condition(t, False, reason, message, generation, now) for t in types]


def phase_for(conditions: Iterable[Mapping[str, Any]] | None, rotation_phase: str | None,
              deleting: bool = False) -> str:
    if deleting:
        return r.PHASE_DELETING
    ready = get_condition(conditions, r.READY)
    if ready is None:
        return r.PHASE_PENDING
    if ready.get("status") != "True":
        if ready.get("reason") in (r.PENDING,):
            return r.PHASE_PROVISIONING
        return r.PHASE_FAILED
    if rotation_phase and rotation_phase != "Stable":
        return r.PHASE_ROTATING
    return r.PHASE_READY


def ready_event(old: Mapping[str, Any] | None,
                new: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """The Event (type, reason, message) for a change of Ready, or None.

    Becoming ready is news, and so is ceasing to be; a store that was never ready and still
    is not (Unknown -> False) already had its failure reported by the step that failed.
    """
    if old is not None and old.get("status") == new.get("status"):
        return None
    if new.get("status") == "True":
        return "Normal", r.READY_REASON, "result store is ready"
    if old is not None and old.get("status") == "True":
        return ("Warning", str(new.get("reason")),
                f"result store is no longer ready: {new.get('message')}")
    return None


_HINTS = {
    r.ADMIN_SECRET_MISSING: "create the Secret named by spec.database.adminSecretRef",
    r.ADMIN_AUTH_FAILED: "check the admin Secret's username and password",
    r.DATABASE_UNREACHABLE: "check spec.database.host/port and the network",
    r.ADMIN_CANNOT_CREATE_ROLE: "grant CREATEROLE to the admin role",
    r.INSUFFICIENT_PRIVILEGE: "grant the admin role CREATE on the database",
    r.ADMIN_SECRET_NOT_OPTED_IN: f"label the Secret {ADMIN_CREDENTIALS_LABEL}=true if it is "
                                 f"meant for the operator",
}


def failure_message(reason: str, message: str) -> str:
    """The message of a failure condition: what broke, then what to do (when we know)."""
    hint = _HINTS.get(reason, "")
    return f"{message} ({hint})" if hint else message
