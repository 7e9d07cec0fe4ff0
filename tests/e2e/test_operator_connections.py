"""The connection budget on the local control plane (issue 17).

A store with `connections.limit: 6`: PostgreSQL enforces it on the store's role, the operator
reads pg_stat_activity and reports the numbers in status.connections, the ConnectionBudget
condition turns NearLimit, then Exhausted, with one Warning Event each. A Celery worker of ten
threads (each wanting a connection) and a waiting client start while the role's budget is
spent: the server refuses them (`too many connections for role`), they retry, and once the
sessions holding the budget close every task gets its result.

The pools are sized to fit the limit (worker pool 4 + the client's pooled connection and its
LISTEN connection = 6): a process keeps the connections it opened, so a budget that its
processes' pools exceed for good would starve one of them (docs/install.md, "Connection
budget"). Only a transient excess is retried away.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import Celery

from tests.e2e.operator_support import (
    CeleryWorker,
    OpEnv,
    SecretMirror,
    connect_as,
    eventually,
    make_openv,
)

LIMIT = 6


@pytest.fixture
def env(kube: Any, api_client: Any, namespace: str, postgres: Any,
        pg_database: Any) -> Iterator[OpEnv]:
    yield from make_openv(kube, api_client, namespace, postgres, pg_database)


def connections(env: OpEnv, name: str) -> dict[str, Any]:
    store = env.cluster.store(env.namespace, name) or {}
    return dict((store.get("status") or {}).get("connections") or {})


def sessions_of(env: OpEnv, role: str) -> int:
    """What PostgreSQL itself says, read as the superuser (not through the operator)."""
    return int(env.query("SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                         (role,))[0][0])


def budget_reads(env: OpEnv, name: str, reason: str, in_use: int) -> dict[str, Any]:
    """Wait until the condition says `reason` with a reading of exactly `in_use` sessions."""
    def probe() -> dict[str, Any] | None:
        cond = env.cluster.condition(env.namespace, name, "ConnectionBudget") or {}
        status = connections(env, name)
        if cond.get("reason") == reason and status.get("inUse") == in_use:
            return {"condition": cond, "status": status}
        return None

    return eventually(probe, 60, f"ConnectionBudget {reason} with {in_use} sessions in use")


def test_limit_enforced_reported_and_no_result_lost(env: OpEnv, redis_server: Any,
                                                   tmp_path: Path) -> None:
    env.create("budget", "budget", connections={"limit": LIMIT},
               engine={"poolSize": 4, "maxOverflow": 0})
    env.ready("budget")
    binding = env.binding("budget")
    role = binding["username"]
    assert env.query("SELECT rolconnlimit FROM pg_roles WHERE rolname = %s",
                     (role,)) == [(LIMIT,)]
    first = budget_reads(env, "budget", "WithinLimit", 0)
    assert first["condition"]["status"] == "True"
    assert first["status"]["limit"] == LIMIT and first["status"]["summary"] == f"0/{LIMIT}"
    server_max = int(env.query("SHOW max_connections")[0][0])
    assert first["status"]["serverMax"] == server_max
    assert 0 < first["status"]["serverAvailable"] < server_max

    config_dir = tmp_path / "budget"
    queue = f"q-{uuid.uuid4().hex[:8]}"
    held: list[psycopg.Connection[Any]] = []
    try:
        # five sessions of the store's role (other workers, as far as PostgreSQL can tell)
        held.extend(connect_as(binding) for _ in range(LIMIT - 1))
        near = budget_reads(env, "budget", "NearLimit", LIMIT - 1)
        assert sessions_of(env, role) == LIMIT - 1 == near["status"]["inUse"]
        assert near["condition"]["status"] == "False"
        assert near["status"]["summary"] == f"{LIMIT - 1}/{LIMIT}"
        assert near["status"]["active"] + near["status"]["idle"] <= LIMIT - 1
        held.append(connect_as(binding))
        exhausted = budget_reads(env, "budget", "Exhausted", LIMIT)
        assert sessions_of(env, role) == LIMIT
        assert f"the limit of {LIMIT}" in exhausted["condition"]["message"]
        # the server enforces it: one more session of the role is refused
        with pytest.raises(psycopg.OperationalError, match="too many connections for role"):
            connect_as(binding).close()
        # a worker that wants up to ten connections starts while the budget is spent
        with SecretMirror(env.cluster.fetch, env.namespace, "budget-resultstore", config_dir,
                          period=1.0):
            worker = CeleryWorker(config_dir, redis_server.url, queue, tmp_path / "worker.log",
                                  concurrency=10)
            try:
                client = Celery("budget-client", set_as_current=False)
                client.conf.update(broker_url=redis_server.url,
                                   result_backend=f"resultstore://{config_dir}",
                                   task_serializer="json", result_serializer="json",
                                   accept_content=["json"], resultstore_reload_interval=0.5)
                results = [client.send_task("operator_e2e.mul", (i, 7), queue=queue)
                           for i in range(60)]
                # the server's "too many connections for role", as the backend words it
                refused = f"as {role}: connection limit reached (the role's CONNECTION LIMIT, " \
                          "spec.connections.limit"
                eventually(lambda: refused in worker.text() or None, 60,
                           "the worker to be refused at the role's limit")
                # the held sessions go: the worker's retries get through
                for conn in held:
                    conn.close()
                held.clear()
                values = [r.get(timeout=120) for r in results]
                # idle now, worker and client keep what they opened (at most the worker's
                # four and the client's two): never above the limit, and the operator's
                # reading is PostgreSQL's
                settled = sessions_of(env, role)
                assert 0 < settled <= LIMIT
                expected = "Exhausted" if settled == LIMIT else \
                    "NearLimit" if settled * 100 >= 80 * LIMIT else "WithinLimit"
                reading = budget_reads(env, "budget", expected, settled)
                assert reading["status"]["summary"] == f"{settled}/{LIMIT}"
            finally:
                worker.stop()
    finally:
        for conn in held:
            conn.close()
    assert values == [i * 7 for i in range(60)], "a result was lost or wrong"
    assert "retry budget): " not in worker.text(), "an operation ran out of its retry budget"
    ids = [r.id for r in results]
    stored = env.query("SELECT count(*) FROM budget.celery_taskmeta "
                       "WHERE task_id = ANY(%s) AND status = 'SUCCESS'", (ids,))
    assert stored == [(60,)]
    reasons = env.cluster.reasons(env.namespace, "budget")
    assert "NearLimit" in reasons and "Exhausted" in reasons
    warnings = [e for e in env.cluster.events(env.namespace, "budget")
                if e.get("reason") in ("NearLimit", "Exhausted")]
    assert all(e.get("type") == "Warning" for e in warnings), warnings
    # the worker stopped: the client's own two sessions are left, within the limit again
    back = budget_reads(env, "budget", "WithinLimit", sessions_of(env, role))
    assert back["condition"]["status"] == "True" and back["status"]["inUse"] < LIMIT
    assert "WithinLimit" in env.cluster.reasons(env.namespace, "budget")


def test_store_behind_a_pgbouncer(env: OpEnv, redis_server: Any, tmp_path: Path) -> None:
    """spec.database.pooler names the project's PgBouncer (transaction mode): the Secret
    carries the pooler keys beside the direct ones, and a worker and a client storing and
    reading from that Secret go through it (PgBouncer's own SHOW CLIENTS says so); the
    operator and the Secret's direct keys still name the server."""
    from resultstore_devtools.pgbouncer import PgBouncer

    bouncer = PgBouncer(env.pg, pool_mode="transaction")
    try:
        bouncer.start()
        bouncer.install_lookup(env.database)
        env.create("pooled", "pooled", database={
            **env.spec("pooled")["database"],
            "pooler": {"host": bouncer.host, "port": bouncer.port, "mode": "transaction"}})
        env.ready("pooled")
        binding = env.binding("pooled")
        role = binding["username"]
        assert (binding["pooler-host"], binding["pooler-port"]) == \
            (bouncer.host, str(bouncer.port))
        assert binding["pooler-mode"] == "transaction"
        assert binding["pooler-prepared-statements"] == "false"
        assert binding["port"] == str(env.pg.port) and f":{env.pg.port}/" in binding["uri"]
        assert f":{env.pg.port}/" in binding["result_backend"]
        # pooled-uri logs in through PgBouncer as the store's role, and the role's own
        # search_path (no `options` through a pooler) finds the store's tables
        with psycopg.connect(binding["pooled-uri"], autocommit=True,
                             prepare_threshold=None) as conn:
            assert conn.execute("SELECT current_user, count(*) FROM celery_taskmeta"
                                ).fetchone() == (role, 0)
        config_dir = tmp_path / "pooled"
        queue = f"q-{uuid.uuid4().hex[:8]}"
        with SecretMirror(env.cluster.fetch, env.namespace, "pooled-resultstore", config_dir,
                          period=1.0):
            worker = CeleryWorker(config_dir, redis_server.url, queue, tmp_path / "worker.log",
                                  concurrency=10)
            try:
                client = Celery("pooled-client", set_as_current=False)
                client.conf.update(broker_url=redis_server.url,
                                   result_backend=f"resultstore://{config_dir}",
                                   task_serializer="json", result_serializer="json",
                                   accept_content=["json"], resultstore_reload_interval=0.5)
                results = [client.send_task("operator_e2e.mul", (i, 5), queue=queue)
                           for i in range(40)]
                assert [r.get(timeout=60) for r in results] == [i * 5 for i in range(40)]
                through = [c for c in bouncer.show("CLIENTS") if c.get("user") == role]
                assert through, "no client of the store's role went through PgBouncer"
            finally:
                worker.stop()
        ids = [r.id for r in results]
        assert env.query("SELECT count(*) FROM pooled.celery_taskmeta WHERE task_id = ANY(%s)",
                         (ids,)) == [(40,)]
        # the budget counts the role's server sessions, the pooler's included
        status = eventually(lambda: connections(env, "pooled") or None, 30,
                            "status.connections of the pooled store")
        assert status.get("limit") is None and status["summary"].endswith("/-")
        assert status["inUse"] >= 0 and status["serverMax"] > 0
    finally:
        bouncer.destroy()


def test_limit_follows_the_spec_and_is_restored_after_drift(env: OpEnv) -> None:
    env.create("budget", "budget", connections={"limit": 3})
    env.ready("budget")
    role = env.binding("budget")["username"]

    def limit_is(value: int) -> bool:
        return env.query("SELECT rolconnlimit FROM pg_roles WHERE rolname = %s",
                         (role,)) == [(value,)]

    assert limit_is(3)
    env.cluster.patch_store(env.namespace, "budget", {"spec": {"connections": {"limit": 8}}})
    eventually(lambda: limit_is(8), 30, "the changed limit on the role")
    eventually(lambda: connections(env, "budget").get("limit") == 8 or None, 30,
               "status.connections.limit 8")
    # someone raises it by hand: the next drift check puts the spec's value back
    env.query(f'ALTER ROLE "{role}" CONNECTION LIMIT 100')
    eventually(lambda: limit_is(8), 30, "the spec's limit restored on the role")
    # the limit removed from the spec: no limit (-1) on the role, none in the status
    env.cluster.patch_store(env.namespace, "budget", {"spec": {"connections": None}})
    eventually(lambda: limit_is(-1), 30, "no limit on the role")
    eventually(lambda: "limit" not in connections(env, "budget")
               and connections(env, "budget").get("summary", "").endswith("/-") or None, 30,
               "status.connections without a limit")
