"""The backend through a real PgBouncer in transaction mode (issue 17).

The worker scenarios of test_backend_worker (tasks, failures, groups, chains, chords), the
push waits of test_backend_push and the rotations of test_backend_reload/test_backend_push
run again with stores and reads going through Debian's PgBouncer (``pool_mode =
transaction``: a server session per transaction, so no server-side prepared statement,
``SET`` or session lock survives between two statements). Each test also proves where
the work went: PgBouncer's own counters (``SHOW STATS``) grew by at least the statements
the test made, every session of the store's role on the server that is not a LISTEN is
one of PgBouncer's server connections (``SHOW SERVERS``), and the LISTEN sessions and the
shard advisory locks they hold are direct.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import Celery, chord, group, states
from psycopg import sql

from resultstore_backend.config import PoolerSettings, render_binding
from resultstore_backend.consumer import close_listeners
from resultstore_devtools.pgbouncer import PgBouncer
from tests.helpers.kubelet_dir import KubeletDir
from tests.helpers.waiting import eventually
from tests.integration.conftest import WorkerFactory, make_app
from tests.integration.stores import binding_for, create_role, create_store
from tests.integration.test_backend_push import (
    _assert_pushed_again,
    _rotate_while_waiting,
    _wait_all,
    _waits_across_restart,
)
from tests.integration.test_backend_reload import _producing
from tests.integration.test_backend_stock_compat import _round_trip
from tests.integration.test_backend_worker import _exercise

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _close_listeners() -> Iterator[None]:
    yield
    close_listeners()


# ----------------------------------------------------------------------------- evidence


def _transactions(bouncer: PgBouncer, database: str) -> int:
    """Transactions PgBouncer has passed to ``database`` so far (``SHOW STATS``)."""
    for row in bouncer.show("stats"):
        if row["database"] == database:
            return int(row["total_xact_count"])
    return 0


def _sessions(pg_database: Any) -> list[dict[str, Any]]:
    """The server's sessions on the test database, except this query's own."""
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        cur = conn.execute(
            "SELECT a.pid, a.usename, a.client_port, a.query, a.application_name, a.state, "
            "EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid "
            "        AND l.locktype = 'advisory' AND l.granted) AS advisory "
            "FROM pg_stat_activity a WHERE a.datname = current_database() "
            "AND a.pid <> pg_backend_pid() AND a.backend_type = 'client backend'")
        names = [c.name for c in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _where_sessions_come_from(pg_database: Any, bouncer: PgBouncer
                              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(sessions opened by PgBouncer, direct sessions). SHOW SERVERS is read after
    pg_stat_activity: PgBouncer closes idle server connections only after minutes, so a
    server connection seen in one is still in the other."""
    sessions = _sessions(pg_database)
    ports = {int(s["local_port"]) for s in bouncer.show("servers")}
    pooled = [s for s in sessions if s["client_port"] in ports]
    direct = [s for s in sessions if s["client_port"] not in ports]
    return pooled, direct


def _is_listen(session: dict[str, Any]) -> bool:
    return "LISTEN" in (session["query"] or "")


def _assert_only_listens_are_direct(pg_database: Any, bouncer: PgBouncer,
                                    roles: set[str]) -> list[dict[str, Any]]:
    """Every session of ``roles`` is PgBouncer's, except LISTEN sessions, which are
    direct and are the only ones holding advisory (shard presence) locks; returns the
    direct LISTEN sessions."""
    pooled, direct = _where_sessions_come_from(pg_database, bouncer)
    ours = [s for s in direct if s["usename"] in roles]
    stray = [s for s in ours if not _is_listen(s)]
    assert not stray, f"sessions of the store that bypass PgBouncer: {stray}"
    assert not [s for s in pooled if _is_listen(s)], \
        f"a LISTEN went through PgBouncer: {pooled}"
    assert not [s for s in pooled if s["advisory"] and s["state"] == "idle"], \
        f"a PgBouncer server session holds an advisory lock across transactions: {pooled}"
    assert [s for s in pooled if s["usename"] in roles], \
        f"no session of {roles} through PgBouncer at all: {pooled}"
    return ours


def _no_pooler_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if "pooler" in r.getMessage()], \
        "the LISTEN connection went through the pooler"


# ----------------------------------------------------------------------------- workers


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_worker_through_pgbouncer(pool: str, pooled_store_url: str, pooled_database: Any,
                                  pgbouncer: PgBouncer, workers: WorkerFactory,
                                  redis_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="resultstore_backend")
    before = _transactions(pgbouncer, pooled_database.name)
    _exercise(pooled_store_url, workers, redis_server.url, pool, extended=(pool == "prefork"))
    # 1 + 1 + 10 + 3 + 9 tasks, each stored at least once (STARTED is not tracked)
    assert _transactions(pgbouncer, pooled_database.name) - before >= 24, \
        "the stores did not go through PgBouncer"
    listens = _assert_only_listens_are_direct(pooled_database, pgbouncer,
                                              {pooled_database.server.superuser})
    assert listens, "the client's waits opened no (direct) LISTEN session"
    _no_pooler_warning(caplog)
    with psycopg.connect(pooled_database.dsn()) as conn:
        rows = conn.execute("SELECT status, count(*) FROM rs.celery_taskmeta GROUP BY status"
                            ).fetchall()
    counts = {status: n for status, n in rows}
    assert counts["SUCCESS"] >= 23 and counts["FAILURE"] == 1, counts


def test_waits_are_pushed_through_a_direct_listen(
        pooled_store_url: str, pooled_database: Any, pgbouncer: PgBouncer,
        workers: WorkerFactory, redis_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="resultstore_backend")
    worker = workers.start(pooled_store_url, pool="threads", concurrency=8)
    app, t = make_app(pooled_store_url, broker=redis_server.url, queue=worker.queue)
    backend = app.backend
    assert backend.is_async and backend.notifications
    assert t.add.delay(1, 1).get(timeout=60) == 2
    listener = backend.result_consumer.listener()
    assert listener is not None and listener.connected
    before = listener.received
    assert [t.add.delay(i, i).get(timeout=60) for i in range(5)] == [0, 2, 4, 6, 8]
    assert listener.received > before, "results arrived without a notification"
    # groups and chords, joins and get_many, while the LISTEN session is open
    assert group(t.add.s(i, 1) for i in range(10)).apply_async().get(timeout=60) == \
        [i + 1 for i in range(10)]
    assert group(t.add.s(i, 3) for i in range(5)).apply_async().join_native(timeout=60) == \
        [i + 3 for i in range(5)]
    ids = [t.sleep_then.delay(i, 0.3).id for i in range(5)]
    before = listener.received
    many = dict(backend.get_many(ids, timeout=60))
    assert [many[i]["result"] for i in ids] == list(range(5))
    assert listener.received > before, "get_many was not woken by a notification"
    assert chord(t.add.s(i, i) for i in range(6))(t.tsum.s()).get(timeout=60) == 30
    # twenty waits at once, all pushed
    results = [t.sleep_then.delay(i, 0.5) for i in range(20)]
    got = _wait_all([lambda r=r: r.get(timeout=60) for r in results])
    assert got == list(range(20))
    # hold a wait open so its LISTEN session (and its shard lock) can be seen
    pending = str(uuid.uuid4())
    threading.Timer(1.0, lambda: backend.store_result(pending, "late", states.SUCCESS)).start()
    seen: list[list[dict[str, Any]]] = []

    def look() -> None:
        eventually(lambda: listener.listening or None, 10, "the wait LISTENing")
        seen.append(_assert_only_listens_are_direct(
            pooled_database, pgbouncer, {pooled_database.server.superuser}))
    looker = threading.Thread(target=look)
    looker.start()
    assert app.AsyncResult(pending).get(timeout=30) == "late"
    looker.join(30)
    assert seen, "the sessions were not inspected while the wait was open"
    direct = {s["pid"]: s for s in seen[0]}
    assert listener.backend_pid() in direct, (listener.backend_pid(), seen[0])
    assert direct[listener.backend_pid()]["advisory"], \
        "the LISTEN session does not hold its shard's presence lock"
    _no_pooler_warning(caplog)
    log = worker.log_text()
    assert "Traceback" not in log and "prepared statement" not in log, log[-3000:]


def test_prefork_children_wait_inside_tasks_through_pgbouncer(
        pooled_store_url: str, pooled_database: Any, pgbouncer: PgBouncer,
        workers: WorkerFactory, redis_server: Any) -> None:
    from tests.integration.apps.tasks import define_push_tasks

    worker = workers.start(pooled_store_url, pool="prefork", concurrency=3)
    app, t = make_app(pooled_store_url, broker=redis_server.url, queue=worker.queue)
    p = define_push_tasks(app)
    got = [r.get(timeout=120) for r in [p.wait_inside.delay(n) for n in (3, 5)]]
    for n, out in zip((3, 5), got, strict=True):
        assert out["group"] == [2 * i for i in range(n)] and out["single"] == n + 1, out
        assert out["notified"] > 0, f"a child waited without notifications: {out}"
    direct = {s["pid"] for s in _sessions(pooled_database)
              if _is_listen(s)} - {int(s["remote_pid"]) for s in pgbouncer.show("servers")}
    assert {out["listen_pid"] for out in got} <= direct, (got, direct)
    assert "Traceback" not in worker.log_text(), worker.log_text()[-4000:]


def test_postgres_restart_while_clients_wait_through_pgbouncer(
        pooled_store_url: str, pooled_database: Any, pgbouncer: PgBouncer, postgres: Any,
        workers: WorkerFactory, redis_server: Any) -> None:
    """PostgreSQL restarts under PgBouncer while 20 clients wait and the worker stores:
    the stores that fail at PgBouncer are retried, every wait gets its value, and
    afterwards waits are pushed again over a new direct LISTEN session."""
    worker = workers.start(pooled_store_url, pool="threads", concurrency=20)
    app, t = make_app(pooled_store_url, broker=redis_server.url, queue=worker.queue)
    assert t.add.delay(1, 1).get(timeout=60) == 2
    listener = app.backend.result_consumer.listener()
    assert listener is not None
    connects = listener.connects
    results = [t.sleep_then.delay(i, 3.0) for i in range(20)]
    assert _waits_across_restart(postgres, results) == list(range(20))
    _assert_pushed_again(t, listener, connects)
    assert worker.proc.poll() is None
    assert "BackendStoreError" not in worker.log_text(), worker.log_text()[-3000:]
    _assert_only_listens_are_direct(pooled_database, pgbouncer,
                                    {pooled_database.server.superuser})


# ----------------------------------------------------------------------------- rotation


def _pooled_binding(pooled_database: Any, bouncer: PgBouncer, role: tuple[str, str],
                    application_name: str) -> dict[str, str]:
    pooler = PoolerSettings(host=bouncer.host, port=bouncer.port, mode="transaction")
    return render_binding(binding_for(pooled_database, *role, pooler=pooler,
                                      application_name=application_name))


def _clients(bouncer: PgBouncer, database: str) -> dict[str, set[str]]:
    """application_name -> roles of PgBouncer's client connections to ``database``."""
    out: dict[str, set[str]] = {}
    for row in bouncer.show("clients"):
        if row["database"] == database:
            out.setdefault(row["application_name"], set()).add(row["user"])
    return out


def test_reload_while_worker_stores_through_pgbouncer(
        pooled_database: Any, pgbouncer: PgBouncer, workers: WorkerFactory,
        redis_server: Any, tmp_path: Path) -> None:
    names = create_store(pooled_database)
    role_a, role_b = create_role(pooled_database, names), create_role(pooled_database, names)
    kd = KubeletDir(tmp_path / "binding")
    kd.write(_pooled_binding(pooled_database, pgbouncer, role_a, "rs-v0"))
    url = f"resultstore://{tmp_path / 'binding'}"
    worker = workers.start(url, pool="threads", concurrency=4, extra_env={"RS_RELOAD": "0.1"})
    app, t = make_app(url, broker=redis_server.url, queue=worker.queue,
                      resultstore_reload_interval=0.1)
    before = _transactions(pgbouncer, pooled_database.name)
    with _producing(t) as results:
        for n, role in enumerate([role_b, role_a, role_b], start=1):
            time.sleep(1.5)
            kd.write(_pooled_binding(pooled_database, pgbouncer, role, f"rs-v{n}"))
        time.sleep(1.5)
    assert len(results) > 100
    for i, r in results:
        assert r.get(timeout=60) == 2 * i
    log = worker.log_text()
    assert "ERROR" not in log and "BackendStoreError" not in log, log[-3000:]
    assert _transactions(pgbouncer, pooled_database.name) - before >= len(results)
    # the old engines' client connections to PgBouncer are gone, the last one's remain
    eventually(lambda: (lambda c: c.get("rs-v3") == {role_b[0]} and not (
        {"rs-v0", "rs-v1", "rs-v2"} & set(c)))(_clients(pgbouncer, pooled_database.name))
        or None, 10, "only the reloaded engine's clients at PgBouncer")
    _assert_only_listens_are_direct(pooled_database, pgbouncer, {role_a[0], role_b[0]})
    with psycopg.connect(pooled_database.dsn()) as conn:
        row = conn.execute("SELECT count(*) FROM rs.celery_taskmeta WHERE status='SUCCESS'"
                           ).fetchone()
    assert row is not None and row[0] == len(results)


def test_rotation_while_clients_wait_through_pgbouncer(
        pooled_database: Any, pgbouncer: PgBouncer, workers: WorkerFactory,
        redis_server: Any, tmp_path: Path) -> None:
    names = create_store(pooled_database)
    role_a, role_b = create_role(pooled_database, names), create_role(pooled_database, names)
    new_pid = _rotate_while_waiting(
        workers, redis_server, tmp_path,
        _pooled_binding(pooled_database, pgbouncer, role_a, "rs-a"),
        _pooled_binding(pooled_database, pgbouncer, role_b, "rs-b"))
    listens = {s["pid"]: s for s in _assert_only_listens_are_direct(
        pooled_database, pgbouncer, {role_a[0], role_b[0]}) if _is_listen(s)}
    assert listens.get(new_pid, {}).get("usename") == role_b[0], listens
    assert all(s["usename"] != role_a[0] for s in listens.values()), \
        f"a LISTEN session of the old role is still open: {listens}"
    clients = _clients(pgbouncer, pooled_database.name)
    assert clients.get("rs-b") == {role_b[0]}, clients


# ----------------------------------------------------------------------------- control


def _store_from_threads(url: str, threads: int = 4, each: int = 100) -> list[str]:
    """Stores of fresh ids from ``threads`` threads at once; the errors they raised."""
    app, _ = make_app(url, resultstore_retry_budget=0, resultstore_notify=False)
    errors: list[str] = []

    def work() -> None:
        backend = app.backend
        try:
            for i in range(each):
                backend.store_result(str(uuid.uuid4()), i, states.SUCCESS)
        except Exception as exc:  # reported by the caller
            errors.append(f"{exc!r} (cause: {exc.__cause__!r})")
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    return errors


def test_a_pool_that_prepares_breaks_through_pgbouncer_and_the_pooler_setting_does_not(
        pooled_store_url: str, pooled_database: Any, pgbouncer: PgBouncer) -> None:
    """Control for every test above: the same URL with PgBouncer's address as the server
    (no ``pooler=``: psycopg prepares the hot statements) fails as soon as two clients
    share a server session, so a pool that kept preparing could not pass them."""
    plain = ("resultstore+" + pgbouncer.url(pooled_database.name) + "?schema=rs")
    _store_from_threads(pooled_store_url, threads=1, each=1)  # creates the tables
    broken = _store_from_threads(plain)
    assert any("prepared statement" in e for e in broken), broken
    assert _store_from_threads(pooled_store_url) == []


# ----------------------------------------------------------------------------- stock clients


def _stock(url: str, **engine: Any) -> Celery:
    """A stock ``db+`` client as in a prefork child: pooled sessions (psycopg prepares a
    statement after its fifth run on a connection), not the NullPool of a plain process."""
    app = Celery("stock", backend=url, broker="memory://", set_as_current=False)
    app.conf.database_engine_options = engine
    app.backend.session_manager.forked = True
    return app


def _stock_reads(apps: list[Celery], task_id: str, times: int = 12) -> list[str]:
    """Alternate reads of ``task_id`` by ``apps``; the errors they raised."""
    errors: list[str] = []
    for _ in range(times):
        for app in apps:
            try:
                app.backend.get_task_meta(task_id, cache=False)
            except Exception as exc:  # reported by the caller
                errors.append(repr(exc)[:300])
    return errors


def test_stock_client_through_pgbouncer_with_the_pooled_result_backend(
        pooled_database: Any, pgbouncer: PgBouncer, tmp_path: Path) -> None:
    """The Secret's ``pooled-result-backend`` works for stock ``db+`` clients through
    PgBouncer in transaction mode, as a prefork child uses it (pooled sessions, two
    clients sharing PgBouncer's server sessions), given the role's search_path: the
    pooled URLs cannot carry ``options``. Stock sessions end with a ROLLBACK (SQLAlchemy's
    reset on return), which also clears psycopg's prepared statements, so Celery's
    defaults never reuse one in another server session; ``prepare_threshold=None`` in
    ``database_engine_options`` works the same."""
    names = create_store(pooled_database)
    role = create_role(pooled_database, names)
    with psycopg.connect(pooled_database.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} SET search_path = rs").format(
            sql.Identifier(role[0])))
    data = _pooled_binding(pooled_database, pgbouncer, role, "rs-stock")
    stock_url = data["pooled-result-backend"]
    assert f"@{pgbouncer.host}:{pgbouncer.port}/" in stock_url and "options" not in stock_url
    KubeletDir(tmp_path / "binding").write(data)
    ours = Celery("ours", backend=f"resultstore://{tmp_path / 'binding'}", broker="memory://",
                  set_as_current=False)
    ours.conf.resultstore_notify = False
    before = _transactions(pgbouncer, pooled_database.name)
    defaults = [_stock(stock_url) for _ in range(2)]
    _round_trip(ours, defaults[0])
    assert _stock_reads(defaults, "ok-1") == []
    assert _stock_reads([_stock(stock_url, connect_args={"prepare_threshold": None})
                         for _ in range(2)], "ok-1") == []
    assert _transactions(pgbouncer, pooled_database.name) - before >= 4 * 12, \
        "the stock reads did not go through PgBouncer"
