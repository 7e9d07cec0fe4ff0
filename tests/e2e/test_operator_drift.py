"""Drift: the periodic check repairs Secrets, CronJobs and privileges, and reports
database reachability in Ready."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.operator_support import (
    OpEnv,
    can_login,
    connect_as,
    eventually,
    make_openv,
)


@pytest.fixture
def env(kube: Any, api_client: Any, namespace: str, postgres: Any,
        pg_database: Any) -> Iterator[OpEnv]:
    yield from make_openv(kube, api_client, namespace, postgres, pg_database)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_deleted_secret_is_recreated_with_working_credentials(env: OpEnv) -> None:
    env.create("orders", "orders")
    env.ready("orders")
    env.cluster.core.delete_namespaced_secret("orders-resultstore", env.namespace)
    eventually(lambda: env.cluster.secret(env.namespace, "orders-resultstore"), 30,
               "the Secret to be recreated")
    binding = env.binding("orders")
    assert can_login(binding)
    assert "PasswordReset" in env.cluster.reasons(env.namespace, "orders")


def test_tampered_secret_is_restored(env: OpEnv) -> None:
    env.create("orders", "orders", engine={"poolSize": 3})
    env.ready("orders")
    original = env.binding("orders")
    env.cluster.core.patch_namespaced_secret("orders-resultstore", env.namespace, {"data": {
        "engine_options.json": b64('{"pool_size": 500}'), "host": b64("evil.example"),
        "extra": b64("x")}})

    def restored() -> dict[str, str] | None:
        b = env.binding("orders")
        return b if b == original else None

    eventually(restored, 30, "the tampered Secret to be restored")
    assert "SecretRestored" in env.cluster.reasons(env.namespace, "orders")

    # a changed password is replaced by a new, working one (the old one is not kept anywhere)
    env.cluster.core.patch_namespaced_secret("orders-resultstore", env.namespace, {"data": {
        "password": b64("guessed")}})

    def repaired() -> dict[str, str] | None:
        b = env.binding("orders")
        return b if b["password"] not in ("guessed",) and b["uri"].count(b["password"]) else None

    binding = eventually(repaired, 30, "a working password in the Secret")
    assert can_login(binding)
    assert not can_login(binding, "guessed")


def test_deleted_or_edited_cronjob_is_restored(env: OpEnv) -> None:
    env.create("orders", "orders", retention={"schedule": "5 * * * *"})
    env.ready("orders")
    env.cluster.batch.delete_namespaced_cron_job("orders-resultstore-cleanup", env.namespace)
    eventually(lambda: env.cluster.cronjob(env.namespace, "orders"), 30,
               "the CronJob to be recreated")
    env.cluster.batch.patch_namespaced_cron_job("orders-resultstore-cleanup", env.namespace,
                                                {"spec": {"schedule": "* * * * *",
                                                          "concurrencyPolicy": "Allow"}})

    def restored() -> bool:
        cj = env.cluster.cronjob(env.namespace, "orders") or {}
        spec = cj.get("spec") or {}
        return spec.get("schedule") == "5 * * * *" and spec.get("concurrencyPolicy") == "Forbid"

    eventually(restored, 30, "the CronJob's schedule to be restored")
    assert "CronJobCreated" in env.cluster.reasons(env.namespace, "orders")


def test_privileges_are_regranted_and_extras_revoked(env: OpEnv) -> None:
    env.create("orders", "orders")
    env.ready("orders")
    binding = env.binding("orders")
    role = binding["username"]
    env.admin_query(f'REVOKE INSERT ON orders.celery_taskmeta FROM "{role}"')
    env.admin_query(f'GRANT CREATE ON SCHEMA orders TO "{role}"')
    env.admin_query("GRANT SELECT ON orders.celery_taskmeta TO PUBLIC")

    def repaired() -> bool:
        rows = env.query(
            "SELECT has_table_privilege(%s, 'orders.celery_taskmeta', 'INSERT'), "
            "has_schema_privilege(%s, 'orders', 'CREATE'), "
            "has_table_privilege('public', 'orders.celery_taskmeta', 'SELECT')",
            (role, role))
        return rows == [(True, False, False)]

    eventually(repaired, 30, "privileges to be repaired")
    with connect_as(binding) as conn:
        conn.execute("INSERT INTO celery_taskmeta (task_id, status) VALUES ('x', 'SUCCESS')")
    assert "PrivilegesRestored" in env.cluster.reasons(env.namespace, "orders")


def test_unreachable_database_is_reported_in_ready(env: OpEnv) -> None:
    env.create("orders", "orders")
    env.ready("orders")
    env.pg.stop()
    try:
        cond = env.cluster.wait_condition(env.namespace, "orders", "Ready", "False",
                                          reason="DatabaseUnreachable", timeout=45)
        assert "connection" in cond["message"].lower()
        store = env.cluster.store(env.namespace, "orders") or {}
        assert store["status"]["database"]["reachable"] is False
    finally:
        env.pg.start()
    env.cluster.wait_condition(env.namespace, "orders", "Ready", "True", timeout=60)
    store = env.cluster.store(env.namespace, "orders") or {}
    assert store["status"]["database"]["reachable"] is True
    reasons = env.cluster.reasons(env.namespace, "orders")
    assert "DatabaseUnreachable" in reasons and "DatabaseReachable" in reasons
