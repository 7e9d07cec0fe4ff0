"""A real Celery worker (prefork, threads, solo) with the Redis broker round-trips
tasks, groups, chains, chords and failures through PostgreSQL and SQLite, and a
plain client process reads them back with AsyncResult.get()."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from celery import chain, chord, group

from tests.integration.conftest import WorkerFactory, make_app

pytestmark = pytest.mark.integration


def _exercise(backend: str, workers: WorkerFactory, redis_url: str, pool: str,
              extended: bool = False) -> None:
    env = {"RS_EXTENDED": "1"} if extended else {}
    worker = workers.start(backend, pool=pool, extra_env=env)
    app, t = make_app(backend, broker=redis_url, queue=worker.queue, result_extended=extended)
    # single task
    r = t.add.delay(2, 3)
    assert r.get(timeout=60) == 5
    assert r.state == "SUCCESS" and r.date_done is not None and r.date_done.tzinfo is not None
    # failure propagates as the original exception type
    f = t.fail.delay("boom")
    with pytest.raises(ValueError, match="boom"):
        f.get(timeout=60)
    assert f.state == "FAILURE" and "ValueError" in (f.traceback or "")
    # group (native join) and saved group
    g = group(t.add.s(i, i) for i in range(10)).apply_async()
    assert g.get(timeout=60) == [2 * i for i in range(10)]
    g.save()
    restored = app.GroupResult.restore(g.id)
    assert restored is not None and [c.id for c in restored.results] == [c.id for c in g.results]
    assert restored.ready() and restored.get(timeout=10) == [2 * i for i in range(10)]
    # chain
    c = chain(t.add.s(1, 1), t.add.s(10), t.add.s(100)).apply_async()
    assert c.get(timeout=60) == 112
    # chord (native: counted in the database, no chord_unlock)
    ch = chord(t.add.s(i, 1) for i in range(8))(t.tsum.s())
    assert ch.get(timeout=60) == sum(i + 1 for i in range(8))
    if extended:
        meta = app.backend.get_task_meta(r.id, cache=False)
        assert meta["name"] == "rs.add" and meta["args"] == [2, 3]
        assert meta["queue"] == worker.queue and meta["worker"]
    assert "chord_unlock" not in worker.log_text()
    log = worker.log_text()
    assert log.count("Traceback") == 1, log  # only the deliberate ValueError('boom')
    assert "Failed operation" not in log and "BackendStoreError" not in log


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_worker_postgres(pool: str, pg_store_url: str, pg_database: Any, workers: WorkerFactory,
                         redis_server: Any) -> None:
    _exercise(pg_store_url, workers, redis_server.url, pool, extended=(pool == "prefork"))
    # the rows are schema-qualified in "rs" and queryable with plain SQL
    with psycopg.connect(pg_database.dsn()) as conn:
        rows = conn.execute(
            "SELECT status, count(*) FROM rs.celery_taskmeta GROUP BY status").fetchall()
        counts: dict[str, int] = {status: n for status, n in rows}
        assert counts["SUCCESS"] >= 1 + 10 + 3 + 9 and counts["FAILURE"] == 1
        tz = conn.execute(
            "SELECT data_type FROM information_schema.columns WHERE table_schema='rs' "
            "AND table_name='celery_taskmeta' AND column_name='date_done'").fetchone()
        assert tz == ("timestamp with time zone",)
        groups = conn.execute("SELECT count(*) FROM rs.celery_tasksetmeta").fetchone()
        assert groups is not None and groups[0] >= 1


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_worker_sqlite(pool: str, sqlite_store_url: str, workers: WorkerFactory,
                       redis_server: Any) -> None:
    _exercise(sqlite_store_url, workers, redis_server.url, pool)


def test_prefork_children_use_their_own_connections(pg_store_url: str, pg_database: Any,
                                                    workers: WorkerFactory,
                                                    redis_server: Any) -> None:
    worker = workers.start(pg_store_url, pool="prefork", concurrency=2)
    app, t = make_app(pg_store_url, broker=redis_server.url, queue=worker.queue)
    pids = {r["pid"] for r in group(t.whoami.s() for _ in range(20)).apply_async()
            .get(timeout=60)}
    assert pids  # tasks ran in child processes
    with psycopg.connect(pg_database.dsn()) as conn:
        backend_pids = conn.execute(
            "SELECT pid, client_port FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'celery-resultstore' OR (datname = current_database() "
            "AND pid <> pg_backend_pid())").fetchall()
    # every child has its own pooled session(s): no socket shared across fork
    ports = [p for _, p in backend_pids]
    assert len(ports) == len(set(ports))
