"""Hot reload: the kubelet swaps the Secret directory (new role, password and pool
options) while a worker stores results; no store fails and the old engine goes away."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from resultstore_backend.config import render_binding
from tests.helpers.kubelet_dir import KubeletDir
from tests.integration.conftest import WorkerFactory, make_app
from tests.integration.stores import binding_for, create_role, create_store

pytestmark = pytest.mark.integration


@contextmanager
def _producing(t: Any) -> Iterator[list[tuple[int, Any]]]:
    """While the block runs, a thread of its own sends ``t.add(i, i)`` every 10 ms; yields
    the (i, result) pairs sent (complete once the block has left)."""
    results: list[tuple[int, Any]] = []
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set():
            results.append((i, t.add.delay(i, i)))
            i += 1
            time.sleep(0.01)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        yield results
    finally:
        stop.set()
        producer.join()


def _sessions(pg_database: Any) -> dict[str, set[str]]:
    with psycopg.connect(pg_database.dsn()) as conn:
        rows = conn.execute(
            "SELECT application_name, usename FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
    out: dict[str, set[str]] = {}
    for app_name, user in rows:
        out.setdefault(app_name, set()).add(user)
    return out


def test_reload_while_worker_stores(pg_database: Any, workers: WorkerFactory,
                                    redis_server: Any, tmp_path: Path) -> None:
    names = create_store(pg_database)
    role_a = create_role(pg_database, names)
    role_b = create_role(pg_database, names)
    config_dir = tmp_path / "binding"
    kd = KubeletDir(config_dir)
    kd.write(render_binding(binding_for(pg_database, *role_a, application_name="rs-v0")))
    url = f"resultstore://{config_dir}"
    worker = workers.start(url, pool="threads", concurrency=4, extra_env={"RS_RELOAD": "0.1"})
    app, t = make_app(url, broker=redis_server.url, queue=worker.queue,
                      resultstore_reload_interval=0.1)

    with _producing(t) as results:
        versions = []
        for n, role in enumerate([role_b, role_a, role_b], start=1):
            time.sleep(1.5)
            versions.append(kd.write(render_binding(
                binding_for(pg_database, *role, application_name=f"rs-v{n}"))))
        time.sleep(1.5)
    assert len(results) > 100
    for i, r in results:
        assert r.get(timeout=60) == 2 * i
        assert r.state == "SUCCESS"
    log = worker.log_text()
    assert "Failed operation" not in log and "BackendStoreError" not in log, log[-3000:]
    assert "ERROR" not in log, log[-3000:]
    # the new engine uses the new role; old engines were disposed
    deadline = time.monotonic() + 10
    while True:
        sessions = _sessions(pg_database)
        stale = {k for k in sessions if k in ("rs-v0", "rs-v1", "rs-v2")}
        if not stale and sessions.get("rs-v3") == {role_b[0]}:
            break
        assert time.monotonic() < deadline, sessions
        time.sleep(0.2)
    with psycopg.connect(pg_database.dsn()) as conn:
        row = conn.execute("SELECT count(*) FROM rs.celery_taskmeta WHERE status='SUCCESS'"
                           ).fetchone()
    assert row is not None and row[0] == len(results)


def test_invalid_new_content_keeps_old_engine(pg_database: Any, tmp_path: Path) -> None:
    from celery import Celery, states

    names = create_store(pg_database)
    role = create_role(pg_database, names)
    kd = KubeletDir(tmp_path / "b")
    data = render_binding(binding_for(pg_database, *role))
    kd.write(data)
    app = Celery("c", backend=f"resultstore://{tmp_path / 'b'}", set_as_current=False)
    app.conf.resultstore_reload_interval = 0.05
    backend = app.backend
    backend.store_result("a", 1, states.SUCCESS)
    broken = dict(data)
    broken["celery.json"] = "{not json"
    kd.write(broken)
    time.sleep(0.1)
    backend.store_result("b", 2, states.SUCCESS)  # still works on the old config
    assert backend.get_task_meta("b")["result"] == 2
