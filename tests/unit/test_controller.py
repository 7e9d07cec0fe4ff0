"""The Controller end to end in memory: Kopf's entry points over the fake API server
(fake_kube.py) and the fake PostgreSQL (fake_database.py).

What a reconcile writes, reports and refuses, without a cluster: a new store, an unchanged
store (no writes at all), a tampered Secret, a foreign Secret, a rotation, deletion, transient
errors and an invalid spec. The e2e tests run the same paths against a real control plane.
"""

from __future__ import annotations

import asyncio
import base64
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
import pytest

from resultstore_backend.config import KEY_HOST, KEY_PASSWORD, KEY_USERNAME
from resultstore_operator.builders import reasons as r
from resultstore_operator.builders.names import role_base, role_names
from resultstore_operator.builders.ownership import ADMIN_CREDENTIALS_LABEL
from resultstore_operator.builders.secret import decode_data
from resultstore_operator.database import Credentials, DatabaseError
from resultstore_operator.handlers import Controller
from resultstore_operator.kube import KubeError
from resultstore_operator.settings import OperatorSettings
from resultstore_operator.spec import ANNOTATION_ROTATE
from tests.unit.fake_database import FakeDatabase
from tests.unit.fake_kube import FakeKube

NS, NAME = "team", "orders"
SECRET = (NS, f"{NAME}-resultstore")
CRONJOB = (NS, f"{NAME}-resultstore-cleanup")
ADMIN = Credentials("postgres", "admin-password")
START = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@dataclass
class World:
    kube: FakeKube
    db: FakeDatabase
    ctl: Controller
    clock: Clock

    @property
    def store(self) -> dict[str, Any]:
        return self.kube.stores[(NS, NAME)]

    @property
    def status(self) -> dict[str, Any]:
        return self.kube.status(NS, NAME)

    @property
    def roles(self) -> tuple[str, str]:
        return role_names(role_base(NS, NAME, self.store["metadata"]["uid"]))

    def condition(self, type_: str) -> dict[str, Any]:
        found = [c for c in self.status.get("conditions", []) if c["type"] == type_]
        assert found, f"no {type_} condition in {self.status}"
        return dict(found[0])

    def secret_values(self) -> dict[str, str]:
        return decode_data(self.kube.secrets[SECRET]["data"])

    def reconcile(self, why: str = "create") -> None:
        asyncio.run(self.ctl.reconcile(copy.deepcopy(self.store), why, why))

    def tick(self) -> None:
        """One pass of the periodic checks over the store as the watch would show it."""
        async def one_pass() -> None:
            self.ctl.observe(copy.deepcopy(self.store), None)
            await asyncio.gather(*self.ctl.start_due())

        asyncio.run(one_pass())

    def finalize(self, retry: int = 0) -> None:
        asyncio.run(self.ctl.finalize(copy.deepcopy(self.store), retry))

    def settle(self) -> None:
        """Forget what was written so far: the next assertions see one reconcile only."""
        self.kube.writes.clear()
        self.kube.events.clear()
        self.db.writes.clear()


def _spec(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "database": {"host": "db.example", "name": "app", "sslMode": "disable",
                     "adminSecretRef": {"name": "pg-admin"}},
        "schema": "orders",
    }
    spec.update(over)
    return spec


@pytest.fixture
def world() -> Iterator[World]:
    kube = FakeKube()
    kube.add_secret({"metadata": {"name": "pg-admin", "namespace": NS,
                                  "labels": {ADMIN_CREDENTIALS_LABEL: "true"}},
                     "data": {"username": _b64(ADMIN.username),
                              "password": _b64(ADMIN.password)}})
    kube.add_store({"apiVersion": "resultstore.dev/v1alpha1", "kind": "ResultStore",
                    "metadata": {"name": NAME, "namespace": NS, "generation": 1,
                                 "uid": "7f0c8a3e-aaaa-4bbb-8ccc-0123456789ab"},
                    "spec": _spec()})
    db = FakeDatabase(ADMIN)
    clock = Clock()
    ctl = Controller(OperatorSettings(), kube=kube, database=db, clock=clock)
    try:
        yield World(kube, db, ctl, clock)
    finally:
        ctl.executor.shutdown(wait=True)


def test_new_store_is_provisioned(world: World) -> None:
    world.reconcile()
    active = world.roles[0]
    values = world.secret_values()
    assert values[KEY_USERNAME] == active and values[KEY_HOST] == "db.example"
    assert world.db.logs_in(active, values[KEY_PASSWORD]), \
        "the Secret's password does not log in as the role"
    assert world.db.versions["orders"] >= 1 and ("orders", active) in world.db.grants
    assert CRONJOB in world.kube.cronjobs
    status = world.status
    assert status["phase"] == r.PHASE_READY and status["observedGeneration"] == 1
    assert status["credentials"]["activeRole"] == active
    assert status["credentials"]["phase"] == "Stable"
    assert status["secretName"] == SECRET[1] and status["database"]["reachable"] is True
    for type_ in (r.READY, r.SCHEMA_READY, r.CREDENTIALS_READY, r.CLEANUP_SCHEDULED):
        assert world.condition(type_)["status"] == "True", type_
    assert world.condition(r.CREDENTIALS_ROTATING)["reason"] == r.ROTATION_IDLE
    # the Secret is written before the role exists (Converge.secret_first)
    assert world.kube.reasons() == [r.SCHEMA_MIGRATED, r.SECRET_CREATED, r.ROLE_CREATED,
                                    r.CRONJOB_CREATED, r.READY_REASON]
    assert all(values[KEY_PASSWORD] not in e.message for e in world.kube.events)


def test_unchanged_store_writes_nothing(world: World) -> None:
    world.reconcile()
    secret = copy.deepcopy(world.kube.secrets[SECRET])
    world.settle()
    world.reconcile("resume")
    assert world.kube.writes == [], "an unchanged store rewrote Kubernetes objects"
    assert world.db.writes == [], "an unchanged store changed the database"
    assert world.kube.events == [], [e.reason for e in world.kube.events]
    assert world.kube.secrets[SECRET] == secret
    assert world.status["phase"] == r.PHASE_READY


def test_tampered_secret_key_is_restored_password_kept(world: World) -> None:
    world.reconcile()
    password = world.secret_values()[KEY_PASSWORD]
    world.kube.secrets[SECRET]["data"][KEY_HOST] = _b64("elsewhere.example")
    world.settle()
    world.reconcile("resume")
    assert world.secret_values()[KEY_HOST] == "db.example"
    assert world.secret_values()[KEY_PASSWORD] == password
    assert world.db.writes == [], "a password that still logs in was changed"
    [event] = world.kube.events
    assert (event.type, event.reason) == ("Warning", r.SECRET_RESTORED)
    assert "keys: host" in event.message


def test_tampered_password_is_reset(world: World) -> None:
    world.reconcile()
    active = world.roles[0]
    world.kube.secrets[SECRET]["data"][KEY_PASSWORD] = _b64("typed-by-hand")
    world.settle()
    world.reconcile("resume")
    new = world.secret_values()[KEY_PASSWORD]
    assert new != "typed-by-hand" and world.db.logs_in(active, new)
    assert not world.db.logs_in(active, "typed-by-hand")
    assert world.db.writes == [f"ALTER ROLE {active} PASSWORD"]
    [event] = world.kube.events
    assert (event.type, event.reason) == ("Warning", r.PASSWORD_RESET)
    assert event.message.startswith("the Secret's password was changed; role ")
    assert new not in event.message


def test_deleted_secret_is_recreated_with_a_new_password(world: World) -> None:
    world.reconcile()
    active = world.roles[0]
    old = world.secret_values()[KEY_PASSWORD]
    del world.kube.secrets[SECRET]
    world.settle()
    world.reconcile("resume")
    new = world.secret_values()[KEY_PASSWORD]
    assert new != old and world.db.logs_in(active, new) and not world.db.logs_in(active, old)
    assert world.kube.reasons() == [r.PASSWORD_RESET]
    assert "the Secret was deleted" in world.kube.events[0].message


def test_foreign_secret_is_reported_and_nothing_is_written(world: World) -> None:
    foreign = world.kube.add_secret({"metadata": {"name": SECRET[1], "namespace": NS},
                                     "data": {"token": _b64("someone else's")}})
    world.reconcile()
    assert world.kube.secrets[SECRET] == foreign, "a foreign Secret was changed"
    assert world.kube.writes == [] and world.kube.cronjobs == {}
    assert world.db.opened == 0 and world.db.roles == {}, \
        "the database was touched for a store whose Secret is not ours"
    cond = world.condition(r.CREDENTIALS_READY)
    assert (cond["status"], cond["reason"]) == ("False", r.SECRET_NOT_OWNED)
    assert "has no controller ownerReference" in cond["message"]
    assert world.condition(r.READY)["status"] == "False"
    assert world.kube.reasons() == [r.SECRET_NOT_OWNED]
    assert "someone else's" not in str(world.kube.events) + str(world.status)
    assert world.ctl.states[world.store["metadata"]["uid"]].failures == 1


def test_rotation_switches_drains_and_removes_the_previous_role(world: World) -> None:
    world.reconcile()
    first, second = world.roles
    world.store["metadata"]["annotations"] = {ANNOTATION_ROTATE: "now"}
    world.db.sessions[first] = 2
    world.settle()
    world.reconcile("rotate")
    values = world.secret_values()
    assert values[KEY_USERNAME] == second and world.db.logs_in(second, values[KEY_PASSWORD])
    creds = world.status["credentials"]
    assert (creds["phase"], creds["activeRole"], creds["previousRole"]) == \
        ("Draining", second, first)
    assert world.status["phase"] == r.PHASE_ROTATING
    assert world.condition(r.CREDENTIALS_ROTATING)["reason"] == r.DRAINING
    assert world.kube.reasons() == [r.ROTATION_STARTED, r.NEXT_ROLE_READY, r.SECRET_SWITCHED]
    assert first in world.db.roles, "the previous role went while its sessions were open"
    # drainTimeout (default 5 minutes) passes: the sessions are ended, the role dropped
    world.clock.now = START + timedelta(hours=1)
    world.settle()
    world.reconcile("resume")
    assert first not in world.db.roles and world.db.sessions == {}
    creds = world.status["credentials"]
    assert (creds["phase"], creds["activeRole"], creds["rotations"]) == ("Stable", second, 1)
    assert world.kube.reasons() == [r.SESSIONS_TERMINATED, r.PREVIOUS_ROLE_REMOVED,
                                    r.ROTATION_COMPLETE]
    assert world.condition(r.CREDENTIALS_ROTATING)["reason"] == r.ROTATION_COMPLETE
    assert world.status["phase"] == r.PHASE_READY


@pytest.mark.parametrize(("policy", "roles_left", "schema_left"), [
    ("Delete", 0, False),
    ("Retain", 1, True),
])
def test_delete(world: World, policy: str, roles_left: int, schema_left: bool) -> None:
    world.store["spec"] = _spec(deletionPolicy=policy)
    world.reconcile()
    uid = world.store["metadata"]["uid"]
    world.settle()
    world.finalize()
    assert len(world.db.roles) == roles_left
    assert ("orders" in world.db.schemas) == schema_left
    assert all(not role.can_login for role in world.db.roles.values())
    expected = r.CLEANUP_DROPPED if policy == "Delete" else r.CLEANUP_RETAINED
    assert world.kube.reasons() == [expected]
    assert world.status["phase"] == r.PHASE_DELETING
    assert uid not in world.ctl.states


def test_database_down_is_retried_with_backoff(world: World) -> None:
    world.reconcile()
    world.db.down = r.DATABASE_UNREACHABLE
    world.settle()
    world.reconcile("resume")
    state = world.ctl.states[world.store["metadata"]["uid"]]
    assert state.failures == 1
    cond = world.condition(r.SCHEMA_READY)
    assert (cond["status"], cond["reason"]) == ("False", r.DATABASE_UNREACHABLE)
    assert "check spec.database.host/port" in cond["message"]
    assert world.status["database"]["reachable"] is False
    assert world.status["phase"] == r.PHASE_FAILED
    assert world.kube.reasons() == [r.DATABASE_UNREACHABLE, r.DATABASE_UNREACHABLE]
    assert world.kube.events[1].type == "Warning"  # no longer ready
    # the timer does not retry before the backoff delay (it is minutes, not this test's time)
    calls = len(world.kube.calls)
    world.tick()
    assert len(world.kube.calls) == calls
    # deletion meanwhile: a TemporaryError with the backoff as delay, for Kopf to retry
    with pytest.raises(kopf.TemporaryError) as info:
        world.finalize(retry=2)
    assert info.value.delay == world.ctl.settings.backoff(3)
    assert r.DELETION_BLOCKED in world.kube.reasons()
    # back up: the next reconcile recovers and says so
    world.db.down = None
    world.settle()
    world.reconcile("resume")
    assert world.status["phase"] == r.PHASE_READY and state.failures == 0
    assert world.kube.reasons() == [r.DATABASE_REACHABLE, r.READY_REASON]


def test_api_error_is_reported_and_retried(world: World) -> None:
    world.kube.fail["read_secret"] = [KubeError("read Secret pg-admin: API answered 503",
                                                status=503)]
    world.reconcile()
    assert world.ctl.states[world.store["metadata"]["uid"]].failures == 1
    cond = world.condition(r.CREDENTIALS_READY)
    assert (cond["status"], cond["reason"]) == ("False", r.KUBERNETES_ERROR)
    assert world.kube.secrets.get(SECRET) is None and world.db.opened == 0
    world.reconcile("resume")
    assert world.status["phase"] == r.PHASE_READY


@pytest.mark.parametrize("step", ["put_secret", "ensure_role", "sync_privileges"])
def test_new_store_failing_mid_way_gets_one_role_and_one_password(world: World,
                                                                  step: str) -> None:
    """A first reconcile that fails at any credential step (an API or database error, or
    the replica losing leadership) is finished by the next one without a second password:
    workers that read the Secret in between keep a password that works."""
    error: Exception
    if step == "put_secret":
        error = KubeError("create Secret: API answered 503", status=503)
        world.kube.fail[step] = [error]
    else:
        error = DatabaseError(r.DATABASE_UNREACHABLE, "connection to 127.0.0.1:5432 lost")
        world.db.fail[step] = [error]
    world.reconcile()
    assert world.status["phase"] != r.PHASE_READY, f"{step} failing did not fail the reconcile"
    world.reconcile("resume")
    active = world.roles[0]
    assert world.status["phase"] == r.PHASE_READY, world.status
    assert world.db.logs_in(active, world.secret_values()[KEY_PASSWORD]), \
        "the Secret's password does not log in as the role"
    role_writes = [w for w in world.db.writes if w.startswith(f"CREATE ROLE {active}")
                   or w == f"ALTER ROLE {active} PASSWORD"]
    assert role_writes == [f"CREATE ROLE {active} CONNECTION LIMIT -1"], \
        f"after {step} failed once the role's password was set more than once: {role_writes}"
    assert r.PASSWORD_RESET not in world.kube.reasons(), \
        "a store whose credentials were never complete reported a password reset"


def test_invalid_spec_fails_permanently(world: World) -> None:
    world.store["spec"] = _spec(schema="Not A Schema!")
    with pytest.raises(kopf.PermanentError):
        world.reconcile()
    for type_ in (r.SCHEMA_READY, r.CREDENTIALS_READY, r.CLEANUP_SCHEDULED):
        cond = world.condition(type_)
        assert (cond["status"], cond["reason"]) == ("False", r.INVALID_SPEC), type_
    assert world.kube.reasons() == [r.INVALID_SPEC]
    assert world.db.opened == 0 and world.kube.writes == []
    state = world.ctl.states[world.store["metadata"]["uid"]]
    assert state.invalid_generation == 1 and state.failures == 0
    # the timer leaves the same generation alone
    calls = len(world.kube.calls)
    world.tick()
    assert len(world.kube.calls) == calls



def test_admin_secret_data_is_read_again_only_when_its_version_changed(world: World) -> None:
    """The admin Secret's metadata is read on every reconcile (opt-in label, version), its
    data only for a version not read before (AdminSecrets): a changed password is used at
    once, a removed opt-in label refuses whatever was read before."""
    def data_reads() -> int:  # the store's own Secret is read in full once per reconcile
        return world.kube.calls.count("read_secret")

    world.reconcile()
    world.kube.calls.clear()
    world.reconcile("resume")
    assert "read_secret_metadata" in world.kube.calls
    assert data_reads() == 1, f"the admin Secret's data was read again: {world.kube.calls}"
    assert world.status["phase"] == r.PHASE_READY
    # a new admin password (a new resourceVersion): read again, and used for the session
    world.db.admin = Credentials(ADMIN.username, "new-admin-password")
    world.kube.add_secret({"metadata": {"name": "pg-admin", "namespace": NS,
                                        "labels": {ADMIN_CREDENTIALS_LABEL: "true"}},
                           "data": {"username": _b64(ADMIN.username),
                                    "password": _b64("new-admin-password")}})
    world.kube.calls.clear()
    world.reconcile("resume")
    assert data_reads() == 2
    assert world.status["phase"] == r.PHASE_READY
    # the opt-in label removed, nothing else changed in the test's fake: refused
    world.kube.secrets[(NS, "pg-admin")]["metadata"]["labels"] = {}
    world.reconcile("resume")
    assert r.ADMIN_SECRET_NOT_OPTED_IN in world.kube.reasons()


def test_a_new_store_reads_no_secret_data_but_the_admins(world: World) -> None:
    """Its own Secret was seen absent by the ownership check (metadata): the credential
    observation does not read it again; a Secret that appears in between is a Conflict on
    create, retried, never overwritten."""
    world.reconcile()
    assert world.kube.calls.count("read_secret") == 1, world.kube.calls
    assert world.status["phase"] == r.PHASE_READY
