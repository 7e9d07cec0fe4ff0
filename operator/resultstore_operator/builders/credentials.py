"""The credential plan: which password each login role keeps, and what the Secret becomes.

Why a plan: the decisions of credential convergence (keep the password, set a new one,
reset it after tampering, switch the Secret during a rotation, drain the previous role) used
to sit between the reads and writes of the handler, where only an end-to-end test could
reach them. Here they are a function of plain data: the handler observes (the live binding
Secret, `status.credentials`, what PostgreSQL says about the role and about the Secret's
password), calls `plan`, and applies the result in order; the same inputs always give the
same plan, so every branch is a unit test.

The rules, in the words of the operator's guarantees:

- A password is kept only when it is known to be the role's: the Secret holds it with our
  data hash (we wrote it and nobody changed it since), or it logs in as the role. Workers
  hold it, so a known-good password is never replaced by a reconcile.
- Otherwise the role gets a fresh password (`fresh_password`, made by the caller: this
  module has no randomness) and the Secret is restored; when a Secret existed, or a store
  that had one lost it, that is a reset, reported as a Warning.
- A Secret edited by someone else (a key other than the engine or Celery options changed)
  is restored with a Warning; an options change is a Normal update.
- During a rotation the next role is prepared first (its password kept if the Secret already
  names it and it logs in: a resumed rotation), the Secret switched to it, and the active
  role is then converged on the switched state like any other reconcile.
- A Secret of our name that this store does not control is refused before anything is
  touched (`refusal`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from resultstore_backend.config import KEY_CELERY, KEY_ENGINE_OPTIONS

from ..spec import ResultStoreSpec
from . import reasons as r
from . import rotation as rot
from .conditions import get_condition, timestamp
from .names import secret_name
from .ownership import foreign_owner, owner_reference
from .secret import (
    candidate_password,
    decode_data,
    secret_manifest,
    secret_matches,
    secret_values,
    trusted_password,
)

# What happens to a role's password (RolePlan.action)
KEEP = "keep"      # the role exists and keeps its password (the Secret's, proven)
SET = "set"        # the role exists and gets `RolePlan.password` (a new verifier)
CREATE = "create"  # the role is created with `RolePlan.password`

#: Secret keys a spec change rewrites; a change of any other key means someone edited it
OPTION_KEYS = frozenset({KEY_ENGINE_OPTIONS, KEY_CELERY})

RESET_SECRET_DELETED = "the Secret was deleted"
RESET_PASSWORD_CHANGED = "the Secret's password was changed"


@dataclass(frozen=True)
class Store:
    """What the Secret is rendered from: the store's identity, its spec and its CA."""

    name: str
    namespace: str
    uid: str
    spec: ResultStoreSpec
    ca: str | None = None

    @property
    def secret(self) -> str:
        return secret_name(self.name)


@dataclass(frozen=True)
class RoleReport:
    """What PostgreSQL reports about the one role a plan converges (`role_to_observe`)."""

    exists: bool
    #: the Secret's unverified password (`password_to_verify`) logged in as the role;
    #: None when there was nothing to verify (or the role does not exist)
    logs_in: bool | None = None


@dataclass(frozen=True)
class Observation:
    """Everything `plan` decides from, as read by the handler in this reconcile."""

    #: `status.credentials` after the rotation-start decision (`rot.rotation_request`)
    credentials: rot.CredentialState
    #: the binding Secret as read from the API (None: it does not exist)
    live: Mapping[str, Any] | None
    role: RoleReport
    #: this reconcile initialised `status.credentials` (nothing to report as drift)
    new_store: bool = False


@dataclass(frozen=True)
class Event:
    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class RolePlan:
    role: str
    #: the password the Secret holds for the role after the plan (never logged)
    password: str
    action: str = KEEP

    @property
    def needs_verifier(self) -> bool:
        """The role's password is (re)written: a SCRAM verifier of `password` is sent."""
        return self.action != KEEP


@dataclass(frozen=True)
class SecretWrite:
    desired: Mapping[str, Any]
    #: the Secret `desired` replaces, as compared (None: it is created)
    live: Mapping[str, Any] | None
    #: reported once the write succeeded (None: the write is part of a rotation step)
    event: Event | None = None


@dataclass(frozen=True)
class Switch:
    """Rotation step: the next role prepared with privileges, the Secret pointed at it."""

    role: RolePlan
    granted: tuple[str, ...]
    #: None: the Secret already names the next role (a resumed rotation)
    write: SecretWrite | None
    #: the state once the Secret names the next role (to persist right away)
    switched: rot.CredentialState


@dataclass(frozen=True)
class Converge:
    """The active role and the Secret as the spec says (also the drift check)."""

    role: RolePlan
    granted: tuple[str, ...]
    #: privileges that had to be restored are reported as drift (not on a new role/store)
    report_drift: bool
    write: SecretWrite | None
    #: why the password was reset (None: it was not)
    reset: str | None = None

    @property
    def role_created(self) -> bool:
        return self.role.action == CREATE

    @property
    def secret_first(self) -> bool:
        """Write the Secret before the role is created (and before its privileges).

        Why: the Secret is the only place a password is kept. Created first, a role whose
        Secret write then fails (an API error, a crash, a lost leadership) has a password
        nobody knows, and the retry must set another one. Written first, the retry finds
        the Secret's password trusted (our data hash) and creates the role with it: one
        role, one password, however often the step runs. A worker that reads the Secret in
        between fails one login and retries; no working password is ever replaced.
        """
        return self.role.action == CREATE and self.write is not None


@dataclass(frozen=True)
class CredentialPlan:
    switch: Switch | None
    converge: Converge
    #: the credential state after both steps
    credentials: rot.CredentialState


@dataclass(frozen=True)
class Refusal:
    """The store is refused before anything is touched: the conditions to set False."""

    reason: str
    message: str
    affects: tuple[str, ...]


@dataclass(frozen=True)
class Drain:
    """The draining step: wait for the previous role's sessions, or remove it now."""

    previous: str | None
    remove: bool = False
    #: sessions are left although the drain ended (drainTimeout): terminate them first
    terminate: bool = False
    finished: rot.CredentialState | None = None
    #: the CredentialsRotating condition to set: (status, reason, message); None: leave it
    condition: tuple[bool, str, str] | None = None


# --- before anything is touched ------------------------------------------------------------


def refusal(head: Mapping[str, Any] | None, uid: str,
            conditions: Any = None) -> Refusal | None:
    """A Secret of our name that this store does not control stops the reconcile.

    No password is set for a Secret we may not write, and no cleanup pod mounts someone
    else's Secret. `head` is its metadata only (a foreign Secret's data is none of the
    operator's business). A schema reported ready stays so: only the credentials fail.
    """
    if head is None:
        return None
    problem = foreign_owner({**head, "kind": "Secret"}, uid)
    if problem is None:
        return None
    schema = get_condition(conditions, r.SCHEMA_READY)
    affects = ((r.CREDENTIALS_READY,) if schema and schema.get("status") == "True"
               else (r.SCHEMA_READY, r.CREDENTIALS_READY))
    return Refusal(r.SECRET_NOT_OWNED, problem, affects)


# --- what to observe -------------------------------------------------------------------------


def rotating(creds: rot.CredentialState) -> bool:
    """The next role is still to be prepared and the Secret switched to it."""
    return creds.phase == rot.ROTATING and bool(creds.next_role)


def role_to_observe(creds: rot.CredentialState) -> str:
    """The one role whose existence (and the Secret's password for it) the plan needs."""
    if rotating(creds) and creds.next_role:
        return creds.next_role
    return creds.active_role


def password_to_verify(creds: rot.CredentialState,
                       live: Mapping[str, Any] | None) -> str | None:
    """The Secret's password that only a login can prove (None: nothing to check).

    The active role's password is proven by our data hash when nobody edited the Secret;
    the next role's always by a login (a rotation resumed after a crash must know the role
    really has it before the Secret is trusted with it).
    """
    role = role_to_observe(creds)
    if not rotating(creds) and trusted_password(live, role) is not None:
        return None
    return candidate_password(live, role)


# --- the plan ------------------------------------------------------------------------------


def plan(store: Store, obs: Observation, now: datetime, fresh_password: str) -> CredentialPlan:
    """Switch (during a rotation) then converge: what to do with roles and the Secret."""
    creds = obs.credentials
    if rotating(creds):
        switch = _switch(store, obs, now, fresh_password)
        live: Mapping[str, Any] | None = (switch.write.desired if switch.write is not None
                                          else obs.live)
        # The next role was just prepared: it exists and the Secret holds its password.
        converge = _converge(store, switch.switched, live, RoleReport(exists=True),
                             obs.new_store, fresh_password)
        return CredentialPlan(switch, converge, switch.switched)
    converge = _converge(store, creds, obs.live, obs.role, obs.new_store, fresh_password)
    return CredentialPlan(None, converge, creds)


def _desired(store: Store, role: str, password: str) -> dict[str, Any]:
    return secret_manifest(store.name, store.namespace, owner_reference(store.name, store.uid),
                           secret_values(store.spec, role, password, store.ca))


def _switch(store: Store, obs: Observation, now: datetime, fresh_password: str) -> Switch:
    creds = obs.credentials
    next_role = creds.next_role or ""
    candidate = candidate_password(obs.live, next_role)
    if candidate is not None and obs.role.exists and obs.role.logs_in:
        # resumed after the Secret was written: keep that password
        role = RolePlan(next_role, candidate, KEEP)
    else:
        role = RolePlan(next_role, fresh_password, SET if obs.role.exists else CREATE)
    desired = _desired(store, next_role, role.password)
    write = None if secret_matches(obs.live, desired) else SecretWrite(desired, obs.live)
    switched = rot.secret_switched(creds, now, store.spec.credentials.drain_timeout)
    return Switch(role, (creds.active_role, next_role), write, switched)


def _converge(store: Store, creds: rot.CredentialState, live: Mapping[str, Any] | None,
              report: RoleReport, new_store: bool, fresh_password: str) -> Converge:
    active = creds.active_role
    role, reset = _active_role(active, live, report, new_store, fresh_password)
    granted: tuple[str, ...] = (active,)
    if creds.phase == rot.DRAINING and creds.previous_role:
        granted = (active, creds.previous_role)
    desired = _desired(store, active, role.password)
    write = None
    if not secret_matches(live, desired):
        write = SecretWrite(desired, live, _secret_event(store, active, live, desired, reset))
    return Converge(role, granted, report_drift=role.action != CREATE and not new_store,
                    write=write, reset=reset)


def _active_role(active: str, live: Mapping[str, Any] | None, report: RoleReport,
                 new_store: bool, fresh_password: str) -> tuple[RolePlan, str | None]:
    """The active role's password: the trusted one, a verified one, or a fresh one."""
    password = trusted_password(live, active)
    if password is None and report.exists and report.logs_in:
        password = candidate_password(live, active)
    if password is not None:
        return RolePlan(active, password, KEEP if report.exists else CREATE), None
    reset = None
    # A reset replaces a password workers may hold. With neither a Secret nor a role there is
    # none: the credentials are created (e.g. a retry after an attempt that recorded its
    # state and then failed before writing anything).
    if live is None and report.exists and not new_store:
        reset = RESET_SECRET_DELETED
    elif live is not None:
        reset = RESET_PASSWORD_CHANGED
    return RolePlan(active, fresh_password, SET if report.exists else CREATE), reset


def changed_keys(live: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> list[str]:
    """The Secret keys whose values differ (sorted; names only, never values)."""
    old = decode_data((live or {}).get("data"))
    new = decode_data(desired.get("data"))
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _secret_event(store: Store, role: str, live: Mapping[str, Any] | None,
                  desired: Mapping[str, Any], reset: str | None) -> Event:
    if reset:
        return Event("Warning", r.PASSWORD_RESET,
                     f"{reset}; role {role} got a new password and Secret {store.secret} "
                     f"was restored")
    if live is None:
        return Event("Normal", r.SECRET_CREATED,
                     f"created Secret {store.secret} for role {role}")
    changed = changed_keys(live, desired)
    tampered = any(k not in OPTION_KEYS for k in changed)
    return Event("Warning" if tampered else "Normal",
                 r.SECRET_RESTORED if tampered else r.SECRET_UPDATED,
                 f"Secret {store.secret} updated (keys: {', '.join(changed)})")


# --- draining the previous role --------------------------------------------------------------


def draining(creds: rot.CredentialState) -> str | None:
    """The previous role whose sessions are to be counted (None: no drain in progress)."""
    if creds.phase == rot.DRAINING and creds.previous_role:
        return creds.previous_role
    return None


def drain(creds: rot.CredentialState, sessions: int, now: datetime, grace: float,
          conditions: Any = None) -> Drain:
    """Remove the previous role once drained (`rot.drain_finished`), else report waiting.

    `sessions` is the previous role's session count (only read while draining).
    """
    previous = draining(creds)
    if previous is None:
        if get_condition(conditions, r.CREDENTIALS_ROTATING) is None:
            return Drain(None, condition=(False, r.ROTATION_IDLE, "no rotation in progress"))
        return Drain(None)
    if rot.drain_finished(creds, sessions, now, grace):
        finished = rot.finish_rotation(creds, now)
        return Drain(previous, remove=True, terminate=sessions > 0, finished=finished,
                     condition=(False, r.ROTATION_COMPLETE,
                                f"rotated to role {finished.active_role}"))
    deadline = creds.drain_deadline
    shown = timestamp(deadline) if deadline else "-"
    return Drain(previous, condition=(
        True, r.DRAINING,
        f"waiting for {sessions} sessions of role {previous} to end and for workers to "
        f"reload the Secret (at most until {shown})"))

