"""The credential plan (builders.credentials) from plain data: every decision of credential
convergence without a database or an API server.

The live Secret is built the way the operator writes it (secret_manifest), then edited the
way a person would (a changed key without our data hash, a deleted Secret, a Secret of the
other role); PostgreSQL's answers are plain RoleReports.
"""

from __future__ import annotations

import base64
import copy
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from resultstore_backend.config import KEY_ENGINE_OPTIONS, KEY_HOST, KEY_PASSWORD
from resultstore_operator.builders import credentials as cp
from resultstore_operator.builders import reasons as r
from resultstore_operator.builders import rotation as rot
from resultstore_operator.builders.names import role_base, role_names
from resultstore_operator.builders.ownership import owner_reference
from resultstore_operator.builders.secret import decode_data, secret_manifest, secret_values
from resultstore_operator.spec import parse_spec

NOW = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
UID = "0b5e7d2c-1111-4222-8333-944445555666"
BASE = role_base("team", "orders", UID)
ROLE_A, ROLE_B = role_names(BASE)
FRESH = "fresh-password-made-by-the-caller"
OLD = "password-the-workers-hold"


def _spec(**over: Any) -> Any:
    raw: dict[str, Any] = {
        "database": {"host": "db.example", "name": "app",
                     "adminSecretRef": {"name": "pg-admin"}},
        "schema": "orders",
        "credentials": {"drainTimeout": "10m"},
    }
    raw.update(over)
    return parse_spec(raw)


STORE = cp.Store("orders", "team", UID, _spec())
STABLE = rot.initial_state(BASE, NOW - timedelta(days=1), None)
ROTATING = rot.start_rotation(STABLE, NOW, "now")
DRAINING = rot.secret_switched(ROTATING, NOW - timedelta(minutes=1), 600)


def ours(role: str, password: str, store: cp.Store = STORE) -> dict[str, Any]:
    """The Secret exactly as the operator writes it (with our data hash)."""
    return secret_manifest(store.name, store.namespace, owner_reference(store.name, store.uid),
                           secret_values(store.spec, role, password, store.ca))


def edited(secret: dict[str, Any], key: str, value: str) -> dict[str, Any]:
    """Someone changed one key (kubectl edit): the data hash no longer matches."""
    out = copy.deepcopy(secret)
    out["data"][key] = base64.b64encode(value.encode()).decode()
    return out


def observe(creds: rot.CredentialState, live: dict[str, Any] | None, exists: bool,
            logs_in: bool | None = None, new_store: bool = False) -> cp.Observation:
    return cp.Observation(creds, live, cp.RoleReport(exists, logs_in), new_store)


def plan(obs: cp.Observation, store: cp.Store = STORE) -> cp.CredentialPlan:
    return cp.plan(store, obs, NOW, FRESH)


# --- the active role: keep, set, create, reset -----------------------------------------------

LIVE = {
    "none": None,
    "ours": ours(ROLE_A, OLD),
    "password edited": edited(ours(ROLE_A, OLD), KEY_PASSWORD, "typed-by-hand"),
    "host edited": edited(ours(ROLE_A, OLD), KEY_HOST, "elsewhere.example"),
    "other role": ours(ROLE_B, OLD),
}


@pytest.mark.parametrize(
    ("live", "exists", "logs_in", "new_store", "action", "password", "reset", "event"), [
        # a new store: role and Secret are created, nothing is a reset
        ("none", False, None, True, cp.CREATE, FRESH, None, r.SECRET_CREATED),
        # steady state: nothing to write
        ("ours", True, None, False, cp.KEEP, OLD, None, None),
        # our Secret is intact but the role was dropped: it is recreated with that password
        ("ours", False, None, False, cp.CREATE, OLD, None, None),
        # neither Secret nor role, state already recorded (a first attempt failed before
        # writing anything): a creation, not a reset
        ("none", False, None, False, cp.CREATE, FRESH, None, r.SECRET_CREATED),
        # the Secret was deleted: the workers' password is unknown, so it is reset
        ("none", True, None, False, cp.SET, FRESH, cp.RESET_SECRET_DELETED, r.PASSWORD_RESET),
        # tampered password that does not log in: reset
        ("password edited", True, False, False, cp.SET, FRESH, cp.RESET_PASSWORD_CHANGED,
         r.PASSWORD_RESET),
        # tampered password that logs in (someone set it on the role too): kept, Secret
        # restored to what we write (the data hash)
        ("password edited", True, True, False, cp.KEEP, "typed-by-hand", None,
         r.SECRET_RESTORED),
        # tampered host, password still good: kept, host restored with a Warning
        ("host edited", True, True, False, cp.KEEP, OLD, None, r.SECRET_RESTORED),
        # the Secret names the other role (status lost mid-rotation): a reset
        ("other role", True, None, False, cp.SET, FRESH, cp.RESET_PASSWORD_CHANGED,
         r.PASSWORD_RESET),
        # role gone and Secret edited: created with a fresh password
        ("password edited", False, None, False, cp.CREATE, FRESH, cp.RESET_PASSWORD_CHANGED,
         r.PASSWORD_RESET),
    ])
def test_active_role_password_and_secret(live: str, exists: bool, logs_in: bool | None,
                                         new_store: bool, action: str, password: str,
                                         reset: str | None, event: str | None) -> None:
    result = plan(observe(STABLE, LIVE[live], exists, logs_in, new_store))
    step = result.converge
    assert result.switch is None and result.credentials == STABLE
    assert (step.role.role, step.role.action, step.role.password) == (ROLE_A, action, password)
    assert step.role.needs_verifier == (action != cp.KEEP)
    assert step.reset == reset
    assert step.granted == (ROLE_A,)
    assert step.report_drift == (action != cp.CREATE and not new_store)
    # a role is only ever created with a password the Secret already holds
    assert step.secret_first == (action == cp.CREATE and step.write is not None)
    if event is None:
        assert step.write is None, "an unchanged Secret was rewritten"
        return
    assert step.write is not None and step.write.event is not None
    assert step.write.event.reason == event
    assert step.write.live is LIVE[live]
    written = decode_data(step.write.desired["data"])
    assert written["username"] == ROLE_A and written[KEY_PASSWORD] == password
    # the plan never puts a password into an Event
    assert OLD not in step.write.event.message and FRESH not in step.write.event.message


def test_reset_event_names_the_cause_role_and_secret() -> None:
    step = plan(observe(STABLE, None, exists=True)).converge
    assert step.write is not None and step.write.event is not None
    assert step.write.event == cp.Event(
        "Warning", r.PASSWORD_RESET,
        f"the Secret was deleted; role {ROLE_A} got a new password and Secret "
        f"orders-resultstore was restored")


@pytest.mark.parametrize(("live", "kind", "reason", "keys"), [
    # an edited key other than the options is tampering: Warning, and the keys are named
    (edited(ours(ROLE_A, OLD), KEY_HOST, "elsewhere.example"), "Warning", r.SECRET_RESTORED,
     "host"),
    # the spec's pool settings changed: only the options differ, a Normal update
    (ours(ROLE_A, OLD, cp.Store("orders", "team", UID, _spec(engine={"poolSize": 9}))),
     "Normal", r.SECRET_UPDATED, KEY_ENGINE_OPTIONS),
])
def test_secret_update_tamper_detection(live: dict[str, Any], kind: str, reason: str,
                                        keys: str) -> None:
    step = plan(observe(STABLE, live, exists=True, logs_in=True)).converge
    assert step.role.action == cp.KEEP and step.reset is None
    assert step.write is not None and step.write.event is not None
    assert (step.write.event.type, step.write.event.reason) == (kind, reason)
    assert step.write.event.message == f"Secret orders-resultstore updated (keys: {keys})"


def test_draining_grants_the_previous_role_too() -> None:
    live = ours(DRAINING.active_role, OLD)
    step = plan(observe(DRAINING, live, exists=True)).converge
    assert step.role.role == ROLE_B and step.role.action == cp.KEEP
    assert step.granted == (ROLE_B, ROLE_A)
    assert step.write is None


# --- what the handler must observe -----------------------------------------------------------


@pytest.mark.parametrize(("creds", "live", "role", "verify"), [
    (STABLE, ours(ROLE_A, OLD), ROLE_A, None),               # our hash vouches for it
    (STABLE, edited(ours(ROLE_A, OLD), KEY_HOST, "x"), ROLE_A, OLD),  # edited: log in
    (STABLE, None, ROLE_A, None),                            # nothing to verify
    (STABLE, ours(ROLE_B, OLD), ROLE_A, None),               # not this role's password
    (ROTATING, ours(ROLE_A, OLD), ROLE_B, None),             # Secret still on the old role
    (ROTATING, ours(ROLE_B, OLD), ROLE_B, OLD),              # resumed: always verified
    (replace(ROTATING, next_role=None), ours(ROLE_A, OLD), ROLE_A, None),  # no next role
])
def test_role_and_password_to_observe(creds: rot.CredentialState, live: dict[str, Any] | None,
                                      role: str, verify: str | None) -> None:
    assert cp.role_to_observe(creds) == role
    assert cp.password_to_verify(creds, live) == verify


# --- a rotation in progress: prepare the next role, switch the Secret ------------------------


@pytest.mark.parametrize(("live", "exists", "logs_in", "action", "password", "writes"), [
    # first pass: the next role is new, the Secret still names the active one
    (ours(ROLE_A, OLD), False, None, cp.CREATE, FRESH, True),
    # the next role is left over (NOLOGIN) from an earlier rotation: new password
    (ours(ROLE_A, OLD), True, None, cp.SET, FRESH, True),
    # resumed after a crash that followed the Secret write: that password is kept
    (ours(ROLE_B, OLD), True, True, cp.KEEP, OLD, False),
    # resumed, but the written password does not log in: a new one, written again
    (ours(ROLE_B, OLD), True, False, cp.SET, FRESH, True),
    # the Secret was deleted meanwhile
    (None, True, None, cp.SET, FRESH, True),
])
def test_rotation_switches_the_secret_to_the_next_role(
        live: dict[str, Any] | None, exists: bool, logs_in: bool | None, action: str,
        password: str, writes: bool) -> None:
    result = plan(observe(ROTATING, live, exists, logs_in))
    switch = result.switch
    assert switch is not None
    assert (switch.role.role, switch.role.action, switch.role.password) == \
        (ROLE_B, action, password)
    assert switch.granted == (ROLE_A, ROLE_B)
    assert (switch.write is not None) == writes
    if switch.write is not None:
        assert switch.write.event is None and switch.write.live is live
        assert decode_data(switch.write.desired["data"])["username"] == ROLE_B
    assert switch.switched == rot.secret_switched(ROTATING, NOW, 600)
    assert result.credentials == switch.switched
    assert (result.credentials.phase, result.credentials.active_role,
            result.credentials.previous_role) == (rot.DRAINING, ROLE_B, ROLE_A)
    # then the active (next) role converges on the switched state: nothing more to do
    step = result.converge
    assert (step.role.role, step.role.action, step.role.password) == (ROLE_B, cp.KEEP, password)
    assert step.granted == (ROLE_B, ROLE_A) and step.write is None and step.reset is None


# --- refused before anything is touched ------------------------------------------------------


def _head(refs: list[dict[str, Any]], labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "orders-resultstore", "namespace": "team",
                         "ownerReferences": refs, "labels": labels or {}}}


READY_SCHEMA = [{"type": r.SCHEMA_READY, "status": "True"}]
BOTH = (r.SCHEMA_READY, r.CREDENTIALS_READY)


@pytest.mark.parametrize(("head", "conditions", "affects", "words"), [
    (None, None, None, None),                                              # no Secret yet
    (_head([owner_reference("orders", UID)]), None, None, None),           # ours
    (_head([]), None, BOTH, "has no controller ownerReference"),           # hand-made
    (_head([], {"app.kubernetes.io/managed-by": "resultstore-operator"}), READY_SCHEMA,
     (r.CREDENTIALS_READY,), "only a copied managed-by label"),
    (_head([owner_reference("orders", "another-uid")]), READY_SCHEMA, (r.CREDENTIALS_READY,),
     "another ResultStore"),                                               # an earlier store
    (_head([{"apiVersion": "apps/v1", "kind": "Deployment", "name": "x", "uid": "d",
             "controller": True}]), None, BOTH, "controlled by Deployment 'x'"),
])
def test_foreign_secret_is_refused(head: dict[str, Any] | None, conditions: Any,
                                   affects: tuple[str, ...] | None, words: str | None) -> None:
    refused = cp.refusal(head, UID, conditions)
    if affects is None:
        assert refused is None
        return
    assert refused is not None
    assert refused.reason == r.SECRET_NOT_OWNED and refused.affects == affects
    assert words is not None and words in refused.message
    assert "orders-resultstore" in refused.message


# --- draining the previous role --------------------------------------------------------------

SWITCHED_AT = NOW - timedelta(seconds=100)
DRAIN = rot.secret_switched(ROTATING, SWITCHED_AT, 600)   # deadline: NOW + 500 s


@pytest.mark.parametrize(("creds", "sessions", "now", "grace", "remove", "terminate", "cond"), [
    (DRAIN, 2, NOW, 30.0, False, False, (True, r.DRAINING)),         # sessions left
    (DRAIN, 0, NOW, 300.0, False, False, (True, r.DRAINING)),        # within the grace
    (DRAIN, 0, NOW, 30.0, True, False, (False, r.ROTATION_COMPLETE)),  # drained
    (DRAIN, 3, NOW + timedelta(seconds=501), 30.0, True, True,       # drainTimeout passed
     (False, r.ROTATION_COMPLETE)),
])
def test_drain(creds: rot.CredentialState, sessions: int, now: datetime, grace: float,
               remove: bool, terminate: bool, cond: tuple[bool, str]) -> None:
    assert cp.draining(creds) == ROLE_A
    step = cp.drain(creds, sessions, now, grace)
    assert (step.previous, step.remove, step.terminate) == (ROLE_A, remove, terminate)
    assert step.condition is not None and step.condition[:2] == cond
    if remove:
        assert step.finished == rot.finish_rotation(creds, now)
        assert step.finished.phase == rot.STABLE and step.finished.active_role == ROLE_B
    else:
        assert step.finished is None
        assert f"waiting for {sessions} sessions of role {ROLE_A}" in step.condition[2]


@pytest.mark.parametrize(("conditions", "cond"), [
    (None, (False, r.ROTATION_IDLE, "no rotation in progress")),       # first report
    ([{"type": r.CREDENTIALS_ROTATING, "status": "False", "reason": r.ROTATION_COMPLETE}],
     None),                                                            # left as it was
])
def test_no_rotation_in_progress(conditions: Any, cond: tuple[bool, str, str] | None) -> None:
    step = cp.drain(STABLE, 0, NOW, 30.0, conditions)
    assert cp.draining(STABLE) is None
    assert step == cp.Drain(None, condition=cond)
