"""The credential-rotation state machine, kept in `status.credentials`.

Zero-downtime rotation alternates two login roles: prepare the idle one with a fresh
password, switch the Secret to it, wait until no session of the previous role is left (or
drainTimeout passes), then remove the previous role. The state is persisted after every
step, and every step is idempotent, so an operator killed between any two steps resumes
from the status alone. This module only decides; database.py and the kube package do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from ..spec import CredentialsSpec
from .conditions import parse_timestamp, timestamp
from .names import other_role, role_names

STABLE = "Stable"
ROTATING = "Rotating"
DRAINING = "Draining"

REQUEST_SCHEDULED = "scheduled"
REQUEST_ANNOTATION = "annotation"


@dataclass(frozen=True)
class CredentialState:
    role_base: str
    active_role: str
    phase: str = STABLE
    previous_role: str | None = None
    next_role: str | None = None
    rotation_started_at: datetime | None = None
    drain_deadline: datetime | None = None
    secret_switched_at: datetime | None = None
    last_rotation_time: datetime | None = None
    handled_rotate_request: str | None = None
    rotations: int = 0

    _STATUS_KEYS = {
        "role_base": "roleBase",
        "active_role": "activeRole",
        "phase": "phase",
        "previous_role": "previousRole",
        "next_role": "nextRole",
        "rotation_started_at": "rotationStartedAt",
        "drain_deadline": "drainDeadline",
        "secret_switched_at": "secretSwitchedAt",
        "last_rotation_time": "lastRotationTime",
        "handled_rotate_request": "handledRotateRequest",
        "rotations": "rotations",
    }

    @classmethod
    def from_status(cls, status: Mapping[str, Any] | None) -> CredentialState | None:
        """Rebuild the state from `status.credentials`; None when never initialised."""
        raw = (status or {}).get("credentials") or {}
        base, active = raw.get("roleBase"), raw.get("activeRole")
        if not base or not active:
            return None
        phase = raw.get("phase") or STABLE
        if phase not in (STABLE, ROTATING, DRAINING):
            phase = STABLE
        return cls(
            role_base=str(base),
            active_role=str(active),
            phase=phase,
            previous_role=raw.get("previousRole") or None,
            next_role=raw.get("nextRole") or None,
            rotation_started_at=parse_timestamp(raw.get("rotationStartedAt")),
            drain_deadline=parse_timestamp(raw.get("drainDeadline")),
            secret_switched_at=parse_timestamp(raw.get("secretSwitchedAt")),
            last_rotation_time=parse_timestamp(raw.get("lastRotationTime")),
            handled_rotate_request=raw.get("handledRotateRequest"),
            rotations=int(raw.get("rotations") or 0),
        )

    def to_status(self) -> dict[str, Any]:
        """A merge-patch fragment: None values delete stale keys."""
        out: dict[str, Any] = {}
        for attr, key in self._STATUS_KEYS.items():
            value = asdict(self)[attr]
            if isinstance(value, datetime):
                value = timestamp(value)
            out[key] = value
        return out

    @property
    def roles(self) -> tuple[str, str]:
        return role_names(self.role_base)


def initial_state(base: str, now: datetime, rotate_request: str | None) -> CredentialState:
    """A new store starts on the first role; a rotate annotation present at creation is moot."""
    return CredentialState(role_base=base, active_role=role_names(base)[0],
                           last_rotation_time=now, handled_rotate_request=rotate_request)


def rotation_request(state: CredentialState, creds: CredentialsSpec,
                     rotate_annotation: str | None, now: datetime) -> str | None:
    """Why a rotation should start now (None: it should not)."""
    if state.phase != STABLE:
        return None
    if rotate_annotation and rotate_annotation != state.handled_rotate_request:
        return REQUEST_ANNOTATION
    due = next_rotation_due(state, creds)
    if due is not None and now >= due:
        return REQUEST_SCHEDULED
    return None


def next_rotation_due(state: CredentialState, creds: CredentialsSpec) -> datetime | None:
    if creds.rotate_every is None or state.last_rotation_time is None:
        return None
    return state.last_rotation_time + timedelta(seconds=creds.rotate_every)


def start_rotation(state: CredentialState, now: datetime,
                   rotate_annotation: str | None) -> CredentialState:
    return replace(
        state,
        phase=ROTATING,
        next_role=other_role(state.role_base, state.active_role),
        rotation_started_at=now,
        handled_rotate_request=rotate_annotation or state.handled_rotate_request,
    )


def secret_switched(state: CredentialState, now: datetime,
                    drain_timeout: float) -> CredentialState:
    """The Secret now names next_role: it becomes active and the old one drains."""
    if state.phase != ROTATING or not state.next_role:
        raise ValueError("secret_switched outside of a rotation")
    return replace(
        state,
        phase=DRAINING,
        previous_role=state.active_role,
        active_role=state.next_role,
        next_role=None,
        drain_deadline=now + timedelta(seconds=drain_timeout),
        secret_switched_at=now,
    )


def drain_finished(state: CredentialState, sessions: int, now: datetime,
                   grace: float = 0.0) -> bool:
    """May the previous role be removed now?

    Yes once drainTimeout has passed. Before that, only when no session of it is left *and*
    `grace` seconds went by since the Secret switched: a worker whose pool happens to be
    empty still holds the old credentials until the kubelet refreshes its Secret volume
    (up to its sync period plus cache TTL), and must not find its role gone on reconnect.
    """
    if state.phase != DRAINING:
        return False
    if state.drain_deadline is not None and now >= state.drain_deadline:
        return True
    if sessions:
        return False
    switched = state.secret_switched_at
    return switched is None or now >= switched + timedelta(seconds=grace)


def finish_rotation(state: CredentialState, now: datetime) -> CredentialState:
    return replace(
        state,
        phase=STABLE,
        previous_role=None,
        next_role=None,
        rotation_started_at=None,
        drain_deadline=None,
        secret_switched_at=None,
        last_rotation_time=now,
        rotations=state.rotations + 1,
    )
