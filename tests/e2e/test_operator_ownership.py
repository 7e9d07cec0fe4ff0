"""Ownership and isolation in PostgreSQL (issue 14), on the local control plane with the real
operator process and a private PostgreSQL:

- a second store on the same schema (another namespace, same names) gets OwnershipConflict,
  touches nothing, and the first store's workers keep storing with Ready still True; deleting
  the second (deletionPolicy Delete) leaves all of the first in place;
- an existing schema holding someone else's table is refused; with schemaPolicy
  AdoptExisting the foreign table is neither readable by the store's role nor dropped;
- a store whose host is a fake server asking for a cleartext password never gets the
  admin password sent (InsecureConnection);
- objects provisioned before markers existed are claimed only with proof of authorship.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from resultstore_operator.builders.marker import parse_marker
from tests.e2e.operator_support import (
    Cluster,
    OpEnv,
    OperatorProcess,
    SecretMirror,
    can_login,
    connect_as,
    create_admin,
    ensure_crd,
    eventually,
    no_secret_in,
)
from tests.e2e.test_operator_rotation import StoreLoop
from tests.helpers.fake_postgres import FakePostgres


@pytest.fixture
def env(kube: Any, api_client: client.ApiClient, namespace: str, other_namespace: str,
        postgres: Any, pg_database: Any) -> Iterator[OpEnv]:
    """One operator watching two namespaces ("two teams"), both given the same admin role."""
    ensure_crd(api_client)
    cluster = Cluster(api_client)
    admin = create_admin(postgres, pg_database.name)
    for ns in (namespace, other_namespace):
        cluster.admin_secret(ns, admin)
    op = OperatorProcess(Path(kube.kubeconfig), (namespace, other_namespace)).start()
    env = OpEnv(cluster, namespace, postgres, pg_database.name, admin, Path(kube.kubeconfig),
                op)
    try:
        yield env
    finally:
        running = env.operator.proc is not None and env.operator.proc.poll() is None
        try:
            for ns in (namespace, other_namespace):
                cluster.remove_all_stores(ns, operator_running=running)
        finally:
            env.operator.stop()


def markers(env: OpEnv, schema: str) -> dict[str, str | None]:
    """Object -> owner label (namespace/name) from the comments, as a DBA would look."""
    rows = env.query(
        "SELECT 'schema ' || nspname, obj_description(oid, 'pg_namespace') FROM pg_namespace "
        "WHERE nspname = %s UNION ALL SELECT c.relname, obj_description(c.oid, 'pg_class') "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s "
        "AND c.relkind IN ('r', 'S')", (schema, schema))
    out: dict[str, str | None] = {}
    for name, comment in rows:
        owner = parse_marker(comment)
        out[name] = owner.label() if owner else None
    return out


def role_markers(env: OpEnv, base: str) -> dict[str, str | None]:
    rows = env.query("SELECT rolname, shobj_description(oid, 'pg_authid') FROM pg_roles "
                     "WHERE rolname LIKE %s", (base + "%",))
    return {name: (o.label() if (o := parse_marker(c)) else None) for name, c in rows}


def stored(loop: StoreLoop, n: int) -> None:
    """n more results stored by the first store's worker (failures named if not)."""
    try:
        loop.wait_more(n)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; worker failures: {loop.failures[-3:]}") from None


def ready_status(env: OpEnv, namespace: str, name: str) -> str | None:
    cond = env.cluster.condition(namespace, name, "Ready")
    return None if cond is None else str(cond.get("status"))


def role_base_of(env: OpEnv, namespace: str, name: str) -> str:
    store = env.cluster.store(namespace, name)
    assert store is not None, f"{namespace}/{name} is gone"
    return str(store["status"]["credentials"]["roleBase"])


def test_second_store_on_the_same_schema_is_refused_and_the_first_keeps_working(
        env: OpEnv, other_namespace: str, tmp_path: Path) -> None:
    team_a, team_b = env.namespace, other_namespace
    env.cluster.create_store(team_a, "orders", env.spec("celery"))
    first = env.cluster.wait_ready(team_a, "orders")
    base_a = first["status"]["credentials"]["roleBase"]
    owned = markers(env, "celery")
    assert owned and set(owned.values()) == {f"{team_a}/orders"}, (
        f"every object the first store created must carry its marker: {owned}")
    roles_a = role_markers(env, base_a)
    assert roles_a and set(roles_a.values()) == {f"{team_a}/orders"}
    binding_a = env.binding("orders")

    with SecretMirror(env.cluster.fetch, team_a, "orders-resultstore", tmp_path / "a"), \
            StoreLoop(tmp_path / "a") as loop:
        stored(loop, 10)
        # team B picks the same store name and schema by accident, and would delete it all
        env.cluster.create_store(team_b, "orders", env.spec("celery", deletionPolicy="Delete"))
        cond = env.cluster.wait_condition(team_b, "orders", "Ready", "False",
                                          reason="OwnershipConflict")
        assert f"{team_a}/orders" in cond["message"], (
            f"the conflict must name the other owner: {cond['message']}")
        warnings = [e for e in env.cluster.events(team_b, "orders")
                    if e.get("reason") == "OwnershipConflict"]
        assert warnings and warnings[0]["type"] == "Warning"
        assert f"{team_a}/orders" in warnings[0]["message"]
        base_b = role_base_of(env, team_b, "orders")
        assert base_b != base_a, "two stores must never derive the same role names"
        assert env.query("SELECT count(*) FROM pg_roles WHERE rolname LIKE %s",
                         (base_b + "%",)) == [(0,)], "the refused store created a role"
        assert env.cluster.secret(team_b, "orders-resultstore") is None
        assert env.cluster.cronjob(team_b, "orders") is None, "a refused store got a CronJob"

        # the first store is untouched: its password still works, its workers still store
        assert can_login(binding_a), "the first store's password was changed"
        stored(loop, 20)
        assert ready_status(env, team_a, "orders") == "True"

        # deleting the second store (deletionPolicy Delete) touches nothing of the first
        env.cluster.delete_store(team_b, "orders")
        eventually(lambda: env.cluster.store(team_b, "orders") is None, 60,
                   "the second store to be deleted")
        assert "ForeignObjectsKept" in env.cluster.reasons(team_b, "orders")
        assert markers(env, "celery") == owned, "the first store's schema or tables changed"
        assert role_markers(env, base_a) == roles_a, "the first store's roles were touched"
        assert can_login(binding_a)
        checked = (first["status"].get("database") or {}).get("lastCheckTime")
        eventually(lambda: ((env.cluster.store(team_a, "orders") or {}).get("status") or {})
                   .get("database", {}).get("lastCheckTime") != checked, 30,
                   "a drift check of the first store after the deletion")
        stored(loop, 20)
        assert loop.failures == [], f"the first store's worker failed: {loop.failures[:3]}"
    assert ready_status(env, team_a, "orders") == "True"
    assert "PasswordReset" not in env.cluster.reasons(team_a, "orders")


def test_existing_schema_with_a_foreign_table_is_refused_then_adopted_without_exposure(
        env: OpEnv) -> None:
    env.admin_query("CREATE SCHEMA billing")
    env.admin_query("CREATE TABLE billing.cards (number text)")
    env.admin_query("INSERT INTO billing.cards VALUES ('4111-1111')")
    env.create("pay", "billing", deletionPolicy="Delete")
    cond = env.cluster.wait_condition(env.namespace, "pay", "Ready", "False",
                                      reason="SchemaNotEmpty")
    assert "table cards" in cond["message"] and "AdoptExisting" in cond["message"]
    assert env.query("SELECT count(*) FROM pg_tables WHERE schemaname = 'billing'") == [(1,)], \
        "nothing may be created in a refused schema"
    base = role_base_of(env, env.namespace, "pay")
    assert env.query("SELECT count(*) FROM pg_roles WHERE rolname LIKE %s", (base + "%",)) == [
        (0,)]
    assert env.cluster.cronjob(env.namespace, "pay") is None, "a refused store got a CronJob"

    env.cluster.patch_store(env.namespace, "pay", {"spec": {"schemaPolicy": "AdoptExisting"}})
    env.ready("pay")
    binding = env.binding("pay")
    role = binding["username"]
    with connect_as(binding) as conn:
        conn.execute("INSERT INTO celery_taskmeta (task_id, status) VALUES ('t', 'SUCCESS')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM billing.cards")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM billing.cards")
    assert env.query("SELECT has_table_privilege(%s, 'billing.cards', 'SELECT, INSERT, "
                     "UPDATE, DELETE, TRUNCATE')", (role,)) == [(False,)]
    found = markers(env, "billing")
    assert found["cards"] is None and found["schema billing"] is None, (
        f"an adopted schema and its foreign table must not be marked ours: {found}")
    assert found["celery_taskmeta"] == f"{env.namespace}/pay"

    env.cluster.delete_store(env.namespace, "pay")
    eventually(lambda: env.cluster.store(env.namespace, "pay") is None, 60,
               "the store to be deleted")
    assert env.query("SELECT number FROM billing.cards") == [("4111-1111",)], \
        "deletion dropped or emptied the foreign table"
    assert env.query("SELECT tablename FROM pg_tables WHERE schemaname = 'billing'") == [
        ("cards",)], "deletion must drop exactly the store's own tables"
    assert env.query("SELECT count(*) FROM pg_roles WHERE rolname LIKE %s", (base + "%",)) == [
        (0,)]
    assert "ForeignObjectsKept" in env.cluster.reasons(env.namespace, "pay")


def test_operator_refuses_to_send_the_admin_password_in_cleartext(env: OpEnv) -> None:
    with FakePostgres() as fake:
        env.create("leak", "leak", database={
            "host": "127.0.0.1", "port": fake.port, "name": env.database,
            "sslMode": "prefer", "adminSecretRef": {"name": "pg-admin"}})
        cond = env.cluster.wait_condition(env.namespace, "leak", "Ready", "False",
                                          reason="InsecureConnection")
        assert fake.connections >= 1, "the operator never connected to the fake listener"
        assert fake.passwords == [], "the operator sent the admin password in cleartext"
        assert {a.user for a in fake.attempts} == {env.admin.username}
    assert "cleartext" in cond["message"]
    no_secret_in(env.operator.text() + str(env.cluster.store(env.namespace, "leak")),
                 env.admin.password)


@pytest.mark.parametrize("host", ["db1,db2", "/var/run/postgresql", "db host", "db:5432"])
def test_host_that_is_not_one_name_or_address_is_rejected(env: OpEnv, host: str) -> None:
    with pytest.raises(ApiException) as info:
        env.create("bad", "bad", database={"host": host, "name": env.database,
                                           "adminSecretRef": {"name": "pg-admin"}})
    assert info.value.status == 422 and "host" in str(info.value.body)


def strip_all_markers(env: OpEnv, schema: str, base: str) -> None:
    """Make the store's objects look as the operator version before markers left them."""
    env.query(f'COMMENT ON SCHEMA "{schema}" IS NULL')
    for name, relkind in env.query(
            "SELECT relname, relkind FROM pg_class c JOIN pg_namespace n ON "
            "n.oid = c.relnamespace WHERE nspname = %s AND relkind IN ('r', 'S')", (schema,)):
        kind = "SEQUENCE" if relkind == "S" else "TABLE"
        env.query(f'COMMENT ON {kind} "{schema}"."{name}" IS NULL')
    for role in role_markers(env, base):
        env.query(f'COMMENT ON ROLE "{role}" IS NULL')


def test_objects_from_before_markers_are_claimed_only_with_proof(env: OpEnv,
                                                                 tmp_path: Path) -> None:
    """An operator upgrade: the store's objects exist unmarked (as the previous version left
    them). The store's own status, its owned Secret and a working login prove authorship:
    the markers are written and nothing else changes. Without the proof it is a conflict."""
    env.create("old", "old")
    store = env.ready("old")
    base = store["status"]["credentials"]["roleBase"]
    binding = env.binding("old")

    def strip_markers() -> None:
        strip_all_markers(env, "old", base)

    env.restart_operator(between=strip_markers)
    eventually(lambda: "OwnershipMarked" in env.cluster.reasons(env.namespace, "old") or None,
               60, "the operator to mark the store's legacy objects")
    assert set(markers(env, "old").values()) == {f"{env.namespace}/old"}
    assert set(role_markers(env, base).values()) == {f"{env.namespace}/old"}
    assert ready_status(env, env.namespace, "old") == "True"
    assert can_login(binding), "claiming the legacy objects must not reset the password"

    # no proof (the Secret is gone, so no password can show authorship): never by name alone
    def strip_and_lose_the_secret() -> None:
        strip_markers()
        env.cluster.core.delete_namespaced_secret("old-resultstore", env.namespace)

    env.restart_operator(between=strip_and_lose_the_secret)
    env.cluster.wait_condition(env.namespace, "old", "Ready", "False",
                               reason="OwnershipConflict")
    assert set(markers(env, "old").values()) == {None}


def test_a_store_deleted_during_the_upgrade_still_cleans_up_its_own_objects(
        env: OpEnv) -> None:
    """Deleted while the new operator was not yet running: the finalizer claims the
    unmarked objects with the same proof, then drops them (and nothing else)."""
    env.create("gone", "gone", deletionPolicy="Delete")
    base = env.ready("gone")["status"]["credentials"]["roleBase"]
    env.query("CREATE TABLE public.bystander (x int)")

    def upgrade_while_deleting() -> None:
        strip_all_markers(env, "gone", base)
        env.cluster.delete_store(env.namespace, "gone")

    env.restart_operator(between=upgrade_while_deleting)
    eventually(lambda: env.cluster.store(env.namespace, "gone") is None, 60,
               "the store to be deleted")
    assert "OwnershipMarked" in env.cluster.reasons(env.namespace, "gone")
    assert env.query("SELECT count(*) FROM pg_namespace WHERE nspname = 'gone'") == [(0,)]
    assert env.query("SELECT count(*) FROM pg_roles WHERE rolname LIKE %s", (base + "%",)) == [
        (0,)]
    assert env.query("SELECT count(*) FROM pg_tables WHERE tablename = 'bystander'") == [(1,)]


def test_an_empty_schema_a_dba_made_is_used_but_never_dropped(env: OpEnv) -> None:
    """The admin may lack CREATE on the database: a DBA pre-creates the schema. It holds
    nothing to protect, so no opt-in is needed; it is not the store's, so Delete drops the
    store's tables and roles and leaves the schema (and its ACL) to the DBA."""
    env.query("CREATE SCHEMA dba_made")
    env.query(f"GRANT USAGE, CREATE ON SCHEMA dba_made TO {env.admin.username} "
              "WITH GRANT OPTION")
    acl_before = env.query("SELECT nspacl::text FROM pg_namespace WHERE nspname = 'dba_made'")
    env.create("made", "dba_made", deletionPolicy="Delete")
    base = env.ready("made")["status"]["credentials"]["roleBase"]
    with connect_as(env.binding("made")) as conn:
        conn.execute("INSERT INTO celery_taskmeta (task_id, status) VALUES ('t', 'SUCCESS')")
    found = markers(env, "dba_made")
    assert found.pop("schema dba_made") is None, "a DBA's schema must not be marked ours"
    assert set(found.values()) == {f"{env.namespace}/made"}
    env.cluster.delete_store(env.namespace, "made")
    eventually(lambda: env.cluster.store(env.namespace, "made") is None, 60,
               "the store to be deleted")
    assert env.query("SELECT count(*) FROM pg_namespace WHERE nspname = 'dba_made'") == [(1,)]
    assert env.query("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON "
                     "n.oid = c.relnamespace WHERE nspname = 'dba_made'") == [(0,)]
    assert env.query("SELECT count(*) FROM pg_roles WHERE rolname LIKE %s", (base + "%",)) == [
        (0,)]
    assert env.query("SELECT nspacl::text FROM pg_namespace WHERE nspname = 'dba_made'") == \
        acl_before, "the DBA's schema ACL was changed"
