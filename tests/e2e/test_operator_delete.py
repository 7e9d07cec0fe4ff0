"""Deletion: the finalizer honours deletionPolicy, and a store whose database is gone can
still be deleted with an explicit annotation instead of hanging."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from resultstore_devtools.procs import free_port
from tests.e2e.operator_support import OpEnv, can_login, connect_as, eventually, make_openv


@pytest.fixture
def env(kube: Any, api_client: Any, namespace: str, postgres: Any,
        pg_database: Any) -> Iterator[OpEnv]:
    yield from make_openv(kube, api_client, namespace, postgres, pg_database)


def gone(env: OpEnv, name: str) -> bool:
    return env.cluster.store(env.namespace, name) is None


def test_retain_keeps_schema_and_data_and_disables_login(env: OpEnv) -> None:
    env.create("orders", "orders")  # deletionPolicy defaults to Retain
    store = env.ready("orders")
    binding = env.binding("orders")
    with connect_as(binding) as conn:
        conn.execute("INSERT INTO celery_taskmeta (task_id, status) VALUES ('keep', 'SUCCESS')")
    assert store["spec"]["deletionPolicy"] == "Retain"
    env.cluster.delete_store(env.namespace, "orders")
    eventually(lambda: gone(env, "orders"), 30, "the store to be deleted")
    assert env.query("SELECT task_id FROM orders.celery_taskmeta") == [("keep",)]
    roles = env.query("SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE %s "
                      "ORDER BY 1", (store["status"]["credentials"]["roleBase"] + "%",))
    assert roles and all(not login for _, login in roles)
    assert not can_login(binding)
    assert "DataRetained" in env.cluster.reasons(env.namespace, "orders")
    eventually(lambda: env.cluster.secret(env.namespace, "orders-resultstore") is None, 60,
               "the owned Secret to be garbage-collected")


def test_delete_drops_schema_and_roles(env: OpEnv) -> None:
    env.create("orders", "orders", deletionPolicy="Delete")
    store = env.ready("orders")
    binding = env.binding("orders")
    session = connect_as(binding)  # a still-connected worker does not block the drop
    try:
        env.cluster.delete_store(env.namespace, "orders")
        eventually(lambda: gone(env, "orders"), 30, "the store to be deleted")
    finally:
        session.close()
    assert env.query("SELECT count(*) FROM pg_namespace WHERE nspname = 'orders'") == [(0,)]
    base = store["status"]["credentials"]["roleBase"]
    assert env.query("SELECT count(*) FROM pg_roles WHERE rolname LIKE %s", (base + "%",)) == [
        (0,)]
    assert "SchemaDropped" in env.cluster.reasons(env.namespace, "orders")


def test_store_without_database_is_deleted_with_the_skip_annotation(env: OpEnv) -> None:
    env.create("orders", "orders", deletionPolicy="Delete")
    env.ready("orders")
    # the database "disappears" (nothing listens at the new port any more)
    env.cluster.patch_store(env.namespace, "orders", {"spec": {"database": {
        "port": free_port()}}})
    env.cluster.wait_condition(env.namespace, "orders", "Ready", "False",
                               reason="DatabaseUnreachable", timeout=45)
    env.cluster.delete_store(env.namespace, "orders")
    env.cluster.wait_condition(env.namespace, "orders", "Ready", "False",
                               reason="DeletionBlocked", timeout=45)
    assert not gone(env, "orders")
    assert "DeletionBlocked" in env.cluster.reasons(env.namespace, "orders")
    env.cluster.patch_store(env.namespace, "orders", {"metadata": {"annotations": {
        "resultstore.dev/skip-database-cleanup": "true"}}})
    eventually(lambda: gone(env, "orders"), 60, "the store to be deleted after the annotation")
    assert "DatabaseCleanupSkipped" in env.cluster.reasons(env.namespace, "orders")
    # nothing was dropped: the schema is still there
    assert env.query("SELECT count(*) FROM pg_namespace WHERE nspname = 'orders'") == [(1,)]
