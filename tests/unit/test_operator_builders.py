"""Pure builders of the operator: names, Secret, CronJob, conditions, SQL, SCRAM, rotation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from psycopg import sql

from resultstore_backend.config import render_binding
from resultstore_operator.builders import conditions as c
from resultstore_operator.builders import reasons as r
from resultstore_operator.builders import rotation as rot
from resultstore_operator.builders import sql as q
from resultstore_operator.builders.cronjob import cronjob_event, cronjob_manifest
from resultstore_operator.builders.names import (
    cronjob_name,
    legacy_role_base,
    other_role,
    role_base,
    role_names,
    secret_name,
)
from resultstore_operator.builders.ownership import owner_reference
from resultstore_operator.builders.scram import generate_password, scram_verifier
from resultstore_operator.builders.secret import (
    ANNOTATION_DATA_HASH,
    SECRET_TYPE,
    binding_for,
    candidate_password,
    decode_data,
    secret_manifest,
    secret_matches,
    secret_values,
    trusted_password,
)
from resultstore_operator.spec import CredentialsSpec, parse_spec

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
OWNER = owner_reference("orders", "uid-1")


def spec(**over: Any) -> Any:
    raw: dict[str, Any] = {
        "database": {"host": "db.example", "name": "app", "sslMode": "require",
                     "adminSecretRef": {"name": "pg-admin"}},
        "schema": "orders",
    }
    raw.update(over)
    return parse_spec(raw)


# --- names ---------------------------------------------------------------------------------

def test_object_names() -> None:
    assert secret_name("orders") == "orders-resultstore"
    assert cronjob_name("x" * 32) == "x" * 32 + "-resultstore-cleanup"
    assert len(cronjob_name("x" * 32)) <= 52


UID = "0b6f2a52-6c1e-4d0e-9a55-2f0c3b8e9d11"


@pytest.mark.parametrize(("namespace", "name"), [
    ("a", "b"), ("team-billing", "orders"), ("n" * 63, "s" * 32), ("x.y-z", "r.s-t")])
def test_role_names_fit_postgres_limit(namespace: str, name: str) -> None:
    base = role_base(namespace, name, UID)
    first, second = role_names(base)
    assert len(first.encode()) <= 63 and first.endswith("_a") and second.endswith("_b")
    assert re.fullmatch(r"[a-z0-9_]+", first), f"{first!r} would need quoting in psql"
    assert other_role(base, first) == second and other_role(base, second) == first


@pytest.mark.parametrize(("one", "two"), [
    # the issue's case: two namespaces, same store name (and the same schema elsewhere)
    (("team-a", "orders", UID), ("team-b", "orders", UID.replace("0b", "1c"))),
    # same namespace/name, re-created after Retain: a new uid gets new roles
    (("team-a", "orders", UID), ("team-a", "orders", UID.replace("0b", "1c"))),
    # shortened parts alike ('-' and '_' both become '_', long names are cut): hash differs
    (("team-a", "orders", UID), ("team_a", "orders", UID)),
    (("n" * 40 + "1", "orders", UID), ("n" * 40 + "2", "orders", UID)),
])
def test_role_base_differs_per_store(one: tuple[str, str, str],
                                     two: tuple[str, str, str]) -> None:
    assert role_base(*one) != role_base(*two), f"{one} and {two} would share roles"
    assert role_base(*one) == role_base(*one), "role_base must be stable"
    with pytest.raises(ValueError):
        other_role(role_base(*one), "postgres")


def test_legacy_role_base_is_the_old_derivation() -> None:
    # stores created before this change recorded this in status.credentials.roleBase
    assert legacy_role_base("db1", "orders") == "rs_orders_" + hashlib.sha256(
        b"db1\0orders").hexdigest()[:8]


# --- Secret --------------------------------------------------------------------------------

def test_secret_has_every_design_key() -> None:
    values = secret_values(spec(), "rs_orders_a", "pw", None)
    assert set(values) == {"type", "provider", "host", "port", "database", "username",
                           "password", "sslmode", "schema", "uri", "result_backend",
                           "engine_options.json", "celery.json"}
    assert values["type"] == "postgresql" and values["schema"] == "orders"
    assert values["sslmode"] == "require"
    assert "search_path" in values["uri"]


@pytest.mark.parametrize(
    ("engine", "expected"),
    [({}, {"pool_size": 5, "max_overflow": 10, "pool_recycle": 1800, "pool_timeout": 30.0}),
     ({"poolSize": 17, "maxOverflow": 3, "poolRecycle": "1h", "poolTimeout": "5s"},
      {"pool_size": 17, "max_overflow": 3, "pool_recycle": 3600, "pool_timeout": 5.0}),
     ({"statementTimeout": "2s", "connectTimeout": "4s", "poolPrePing": False},
      {"pool_pre_ping": False}),
     ],
)
def test_engine_options_follow_spec(engine: dict[str, Any], expected: dict[str, Any]) -> None:
    values = secret_values(spec(engine=engine), "u", "p")
    options = json.loads(values["engine_options.json"])
    for key, value in expected.items():
        assert options[key] == value
    if "statementTimeout" in engine:
        assert options["connect_args"]["options"] == "-c statement_timeout=2000"
        assert options["connect_args"]["connect_timeout"] == 4


@pytest.mark.parametrize(
    ("retention", "extended", "expires"),
    [({}, False, 86400), ({"expires": "1h"}, True, 3600), ({"expires": "0s"}, False, None)],
)
def test_celery_json_follows_spec(retention: dict[str, Any], extended: bool,
                                  expires: int | None) -> None:
    values = secret_values(spec(retention=retention, extendedResults=extended), "u", "p")
    celery = json.loads(values["celery.json"])
    assert celery["result_extended"] is extended
    assert celery["result_expires"] == expires
    assert celery["schema"] == "orders" and celery["task_table"] == "celery_taskmeta"


def test_ca_certificate_is_included() -> None:
    b = binding_for(spec(), "u", "p", "-----BEGIN CERTIFICATE-----")
    assert render_binding(b)["ca.crt"].startswith("-----BEGIN")


def test_secret_manifest_shape_and_matching() -> None:
    values = secret_values(spec(), "rs_a", "pw")
    desired = secret_manifest("orders", "ns", OWNER, values)
    assert desired["type"] == SECRET_TYPE
    assert desired["metadata"]["name"] == "orders-resultstore"
    assert desired["metadata"]["ownerReferences"] == [OWNER]
    assert decode_data(desired["data"]) == values
    live = json.loads(json.dumps(desired))
    live["metadata"]["resourceVersion"] = "7"
    live["metadata"]["labels"]["extra"] = "kept"
    assert secret_matches(live, desired)
    assert not secret_matches(None, desired)
    tampered = json.loads(json.dumps(live))
    tampered["data"]["password"] = base64.b64encode(b"x").decode()
    assert not secret_matches(tampered, desired)
    extra_key = json.loads(json.dumps(live))
    extra_key["data"]["evil"] = "eA=="
    assert not secret_matches(extra_key, desired)
    orphan = json.loads(json.dumps(live))
    orphan["metadata"]["ownerReferences"] = []
    assert not secret_matches(orphan, desired)


def test_trusted_password_detects_tampering() -> None:
    desired = secret_manifest("orders", "ns", OWNER, secret_values(spec(), "rs_a", "pw"))
    assert trusted_password(desired, "rs_a") == "pw"
    assert trusted_password(desired, "rs_b") is None
    assert trusted_password(None, "rs_a") is None
    tampered = json.loads(json.dumps(desired))
    tampered["data"]["password"] = base64.b64encode(b"guess").decode()
    assert trusted_password(tampered, "rs_a") is None
    assert candidate_password(tampered, "rs_a") == "guess"
    no_hash = json.loads(json.dumps(desired))
    del no_hash["metadata"]["annotations"][ANNOTATION_DATA_HASH]
    assert trusted_password(no_hash, "rs_a") is None


# --- CronJob -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("job", "retention"),
    [({}, {}),
     ({"image": "registry/rs:2", "imagePullPolicy": "Always",
       "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}},
       "nodeSelector": {"pool": "batch"},
       "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
       "serviceAccountName": "cleaner", "successfulJobsHistoryLimit": 5,
       "failedJobsHistoryLimit": 2, "suspend": True},
      {"schedule": "*/5 * * * *", "batchSize": 250})],
)
def test_cronjob_manifest(job: dict[str, Any], retention: dict[str, Any]) -> None:
    s = spec(cleanupJob=job, retention=retention)
    cj = cronjob_manifest("orders", "ns", OWNER, s, "default/img:1")
    assert cj["metadata"]["name"] == "orders-resultstore-cleanup"
    assert cj["metadata"]["ownerReferences"] == [OWNER]
    cspec = cj["spec"]
    assert cspec["concurrencyPolicy"] == "Forbid"
    assert cspec["schedule"] == retention.get("schedule", "17 * * * *")
    assert cspec["successfulJobsHistoryLimit"] == job.get("successfulJobsHistoryLimit", 3)
    assert cspec["failedJobsHistoryLimit"] == job.get("failedJobsHistoryLimit", 1)
    assert cspec["suspend"] is job.get("suspend", False)
    pod = cspec["jobTemplate"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == [
        "resultstore", "cleanup", "--config-dir", "/var/run/resultstore/orders",
        "--batch-size", str(retention.get("batchSize", 1000))]
    assert container["image"] == job.get("image", "default/img:1")
    assert container["volumeMounts"][0]["mountPath"] == "/var/run/resultstore/orders"
    assert container["volumeMounts"][0]["readOnly"] is True
    assert pod["volumes"][0]["secret"]["secretName"] == "orders-resultstore"
    assert pod["restartPolicy"] == "Never"
    assert container.get("resources") == job.get("resources")
    assert pod.get("nodeSelector") == job.get("nodeSelector")
    assert pod.get("tolerations") == job.get("tolerations")
    assert pod.get("serviceAccountName") == job.get("serviceAccountName")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "hostNetwork" not in pod and "dnsPolicy" not in pod


@pytest.mark.parametrize(
    ("job", "network"),
    [({}, {}),
     ({"hostNetwork": False}, {}),
     ({"hostNetwork": True},
      {"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet"}),
     ({"hostNetwork": True, "nodeSelector": {"pool": "db"}},
      {"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet"})],
)
def test_cronjob_host_network(job: dict[str, Any], network: dict[str, Any]) -> None:
    """spec.cleanupJob.hostNetwork puts the Job's pod on the node's network with the DNS
    policy Kubernetes pairs with it; nothing else of the pod changes (no token, non-root)."""
    pod = cronjob_manifest("orders", "ns", OWNER, spec(cleanupJob=job),
                           "default/img:1")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert {k: pod[k] for k in ("hostNetwork", "dnsPolicy") if k in pod} == network
    plain = cronjob_manifest("orders", "ns", OWNER, spec(cleanupJob={}),
                             "default/img:1")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    rest = {k: v for k, v in pod.items() if k not in ("hostNetwork", "dnsPolicy", "nodeSelector")}
    assert rest == plain
    assert pod["automountServiceAccountToken"] is False


# --- conditions ----------------------------------------------------------------------------

def test_condition_transition_time_only_moves_on_change() -> None:
    first = c.merge_conditions([], [c.condition(r.SCHEMA_READY, True, "A", "m", 1, NOW)])
    later = NOW + timedelta(minutes=5)
    same = c.merge_conditions(first, [c.condition(r.SCHEMA_READY, True, "B", "m2", 2, later)])
    assert same[0]["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    assert same[0]["reason"] == "B" and same[0]["observedGeneration"] == 2
    flipped = c.merge_conditions(same, [c.condition(r.SCHEMA_READY, False, "C", "", 2, later)])
    assert flipped[0]["lastTransitionTime"] == c.timestamp(later)


@pytest.mark.parametrize(
    ("states", "ready", "reason"),
    [({}, "Unknown", r.PENDING),
     ({r.SCHEMA_READY: True, r.CREDENTIALS_READY: True, r.CLEANUP_SCHEDULED: True},
      "True", r.READY_REASON),
     ({r.SCHEMA_READY: False, r.CREDENTIALS_READY: True, r.CLEANUP_SCHEDULED: True},
      "False", "Broken"),
     ({r.SCHEMA_READY: True, r.CREDENTIALS_READY: True}, "False", r.PENDING)],
)
def test_ready_condition(states: dict[str, bool], ready: str, reason: str) -> None:
    conds = [c.condition(t, ok, "Fine" if ok else "Broken", "", 1, NOW)
             for t, ok in states.items()]
    out = c.ready_condition(conds, 1, NOW)
    assert (out["status"], out["reason"]) == (ready, reason)


@pytest.mark.parametrize(
    ("ready", "reason", "rotation", "deleting", "phase"),
    [(None, None, None, False, r.PHASE_PENDING),
     (True, "Ready", "Stable", False, r.PHASE_READY),
     (True, "Ready", "Draining", False, r.PHASE_ROTATING),
     (False, r.DATABASE_UNREACHABLE, "Stable", False, r.PHASE_FAILED),
     (False, r.PENDING, None, False, r.PHASE_PROVISIONING),
     (True, "Ready", "Stable", True, r.PHASE_DELETING)],
)
def test_phase(ready: bool | None, reason: str | None, rotation: str | None, deleting: bool,
               phase: str) -> None:
    conds = [] if ready is None else [c.condition(r.READY, ready, reason or "", "", 1, NOW)]
    assert c.phase_for(conds, rotation, deleting) == phase


def test_timestamps_round_trip() -> None:
    assert c.parse_timestamp(c.timestamp(NOW)) == NOW
    assert c.parse_timestamp("garbage") is None and c.parse_timestamp(None) is None


# --- SQL -----------------------------------------------------------------------------------

def render(statement: sql.Composable) -> str:
    return statement.as_string(None)


def test_role_sql_quotes_and_never_carries_a_clear_password() -> None:
    verifier = scram_verifier("s3cret")
    create = render(q.create_role("rs_x_a", verifier))
    assert create.startswith('CREATE ROLE "rs_x_a" WITH LOGIN NOSUPERUSER')
    assert "s3cret" not in create and "SCRAM-SHA-256$4096:" in create
    assert render(q.set_login('we"ird', False)) == 'ALTER ROLE "we""ird" WITH NOLOGIN'
    assert render(q.drop_schema("orders")) == 'DROP SCHEMA IF EXISTS "orders" RESTRICT'


@pytest.mark.parametrize(
    ("obj", "privileges"),
    [(q.DbObject(q.KIND_SCHEMA, "orders"), {"USAGE"}),
     (q.DbObject(q.KIND_SEQUENCE, "orders", "task_id_sequence"), {"USAGE", "SELECT"}),
     (q.DbObject(q.KIND_TABLE, "orders", "celery_taskmeta"),
      {"SELECT", "INSERT", "UPDATE", "DELETE"}),
     (q.DbObject(q.KIND_TABLE, "orders", "resultstore_schema_version"), {"SELECT"})],
)
def test_expected_privileges_are_least(obj: q.DbObject, privileges: set[str]) -> None:
    assert q.expected_privileges(obj, "resultstore_schema_version") == privileges


def test_privilege_changes_grant_missing_and_revoke_extra() -> None:
    table = q.DbObject(q.KIND_TABLE, "orders", "celery_taskmeta")
    schema = q.DbObject(q.KIND_SCHEMA, "orders")
    actual = {
        (table, "rs_a"): frozenset({"SELECT", "TRUNCATE"}),
        (table, "PUBLIC"): frozenset({"SELECT"}),
        (schema, "rs_a"): frozenset({"USAGE", "CREATE"}),
    }
    expected = {
        (table, "rs_a"): q.DML,
        (schema, "rs_a"): q.SCHEMA_GRANT,
    }
    statements = [render(q.change_statement(ch)) for ch in q.privilege_changes(actual, expected)]
    assert 'REVOKE CREATE ON SCHEMA "orders" FROM "rs_a"' in statements
    assert 'REVOKE TRUNCATE ON TABLE "orders"."celery_taskmeta" FROM "rs_a"' in statements
    assert ('GRANT DELETE, INSERT, UPDATE ON TABLE "orders"."celery_taskmeta" TO "rs_a"'
            in statements)
    assert 'REVOKE SELECT ON TABLE "orders"."celery_taskmeta" FROM PUBLIC' in statements
    assert q.privilege_changes(expected, expected) == []


def test_privilege_statements_refuse_unknown_keywords() -> None:
    with pytest.raises(ValueError):
        q.grant(q.DbObject(q.KIND_SCHEMA, "s"), ["ALL; DROP"], "x")


# --- SCRAM ---------------------------------------------------------------------------------

def test_scram_verifier_format_and_math() -> None:
    salt = b"0123456789abcdef"
    verifier = scram_verifier("pencil", salt=salt, iterations=4096)
    head, keys = verifier.split("$", 1)[1].split("$")
    iterations, salt_b64 = head.split(":")
    stored_b64, server_b64 = keys.split(":")
    assert int(iterations) == 4096 and base64.b64decode(salt_b64) == salt
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", salt, 4096)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    assert base64.b64decode(stored_b64) == hashlib.sha256(client_key).digest()
    assert base64.b64decode(server_b64) == hmac.new(salted, b"Server Key",
                                                    hashlib.sha256).digest()
    assert scram_verifier("pencil") != scram_verifier("pencil")  # fresh salt


def test_generated_passwords_are_url_safe_and_unique() -> None:
    passwords = {generate_password() for _ in range(50)}
    assert len(passwords) == 50
    assert all(len(p) >= 40 and p.replace("-", "").replace("_", "").isalnum()
               for p in passwords)


# --- rotation ------------------------------------------------------------------------------

BASE = role_base("app", "orders", UID)


def test_initial_state_and_status_round_trip() -> None:
    state = rot.initial_state(BASE, NOW, "ignored-at-creation")
    assert state.active_role == f"{BASE}_a" and state.phase == rot.STABLE
    status = {"credentials": state.to_status()}
    assert rot.CredentialState.from_status(status) == state
    assert status["credentials"]["previousRole"] is None  # merge patch deletes the key
    assert rot.CredentialState.from_status({}) is None


@pytest.mark.parametrize(
    ("annotation", "handled", "rotate_every", "age", "expected"),
    [(None, None, None, 10_000, None),
     ("1", None, None, 0, rot.REQUEST_ANNOTATION),
     ("1", "1", None, 0, None),
     ("2", "1", None, 0, rot.REQUEST_ANNOTATION),
     (None, None, 3600, 3599, None),
     (None, None, 3600, 3600, rot.REQUEST_SCHEDULED)],
)
def test_rotation_request(annotation: str | None, handled: str | None,
                          rotate_every: float | None, age: float,
                          expected: str | None) -> None:
    state = rot.initial_state(BASE, NOW, handled)
    creds = CredentialsSpec(rotate_every=rotate_every, drain_timeout=60)
    later = NOW + timedelta(seconds=age)
    assert rot.rotation_request(state, creds, annotation, later) == expected


def test_rotation_walks_through_its_steps() -> None:
    creds = CredentialsSpec(rotate_every=None, drain_timeout=60)
    s0 = rot.initial_state(BASE, NOW, None)
    s1 = rot.start_rotation(s0, NOW, "now")
    assert (s1.phase, s1.next_role, s1.handled_rotate_request) == (
        rot.ROTATING, f"{BASE}_b", "now")
    assert rot.rotation_request(s1, creds, "again", NOW) is None  # one at a time
    s2 = rot.secret_switched(s1, NOW, 60)
    assert (s2.phase, s2.active_role, s2.previous_role) == (
        rot.DRAINING, f"{BASE}_b", f"{BASE}_a")
    assert s2.drain_deadline == NOW + timedelta(seconds=60)
    assert not rot.drain_finished(s2, sessions=3, now=NOW + timedelta(seconds=59))
    assert rot.drain_finished(s2, sessions=3, now=NOW + timedelta(seconds=60))
    assert rot.drain_finished(s2, sessions=0, now=NOW)
    # an idle previous role is still kept for the grace period (kubelet refresh delay)
    assert not rot.drain_finished(s2, sessions=0, now=NOW + timedelta(seconds=5), grace=10)
    assert rot.drain_finished(s2, sessions=0, now=NOW + timedelta(seconds=10), grace=10)
    assert rot.drain_finished(s2, sessions=2, now=NOW + timedelta(seconds=60), grace=600)
    s3 = rot.finish_rotation(s2, NOW + timedelta(seconds=5))
    assert (s3.phase, s3.active_role, s3.previous_role, s3.rotations) == (
        rot.STABLE, f"{BASE}_b", None, 1)
    # a resumed operator rebuilds each intermediate state from status alone
    for state in (s1, s2, s3):
        assert rot.CredentialState.from_status({"credentials": state.to_status()}) == state
    with pytest.raises(ValueError):
        rot.secret_switched(s3, NOW, 60)
    s4 = rot.secret_switched(rot.start_rotation(s3, NOW, None), NOW, 0)
    assert s4.active_role == f"{BASE}_a"  # alternates back


# --- events and messages decided from status (handlers apply them) ---------------------------

TRUE = {"type": r.READY, "status": "True", "reason": r.READY_REASON}
FALSE = {"type": r.READY, "status": "False", "reason": r.DATABASE_UNREACHABLE,
         "message": "refused"}
UNKNOWN = {"type": r.READY, "status": "Unknown", "reason": r.PENDING}


@pytest.mark.parametrize(("old", "new", "event"), [
    (None, TRUE, ("Normal", r.READY_REASON, "result store is ready")),
    (FALSE, TRUE, ("Normal", r.READY_REASON, "result store is ready")),
    (TRUE, TRUE, None),
    (TRUE, FALSE, ("Warning", r.DATABASE_UNREACHABLE,
                   "result store is no longer ready: refused")),
    (None, FALSE, None),       # never ready: the failing step reported it already
    (UNKNOWN, FALSE, None),
    (FALSE, FALSE, None),
])
def test_ready_event(old: dict[str, Any] | None, new: dict[str, Any],
                     event: tuple[str, str, str] | None) -> None:
    assert c.ready_event(old, new) == event


@pytest.mark.parametrize(("action", "existed", "event"), [
    ("created", False, ("Normal", r.CRONJOB_CREATED, "created CronJob cj (0 * * * *)")),
    ("created", True, ("Warning", r.CRONJOB_CREATED, "CronJob cj was missing; recreated")),
    ("updated", True, ("Normal", r.CRONJOB_UPDATED,
                       "CronJob cj brought to the spec (schedule 0 * * * *, batch size 500)")),
    (None, True, None),
])
def test_cronjob_event(action: str | None, existed: bool,
                       event: tuple[str, str, str] | None) -> None:
    store = spec(retention={"schedule": "0 * * * *", "batchSize": 500})
    assert cronjob_event(action, existed, "cj", store) == event


@pytest.mark.parametrize(("reason", "message"), [
    (r.ADMIN_AUTH_FAILED, "no (check the admin Secret's username and password)"),
    (r.ADMIN_SECRET_NOT_OPTED_IN,
     "no (label the Secret resultstore.dev/admin-credentials=true if it is meant for the "
     "operator)"),
    (r.MIGRATION_FAILED, "no"),  # no hint known: the server's message alone
])
def test_failure_message_adds_the_hint(reason: str, message: str) -> None:
    assert c.failure_message(reason, "no") == message
