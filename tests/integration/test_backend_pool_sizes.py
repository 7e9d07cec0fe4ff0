"""Pools that fit the process (issue 17): a prefork pool child holds one connection.

A prefork child runs one task at a time, so engine_options.json's ``prefork_child`` pool
sizes (1, no overflow) replace the top-level ones there. Even a task that stores from
four threads at once then shares the child's one connection (the threads wait their turn
in the pool) instead of opening four. The child here is a real fork that receives
Celery's ``worker_process_init``, as billiard's pool children do; the server is asked how
many sessions it holds.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import uuid
from typing import Any

import psycopg
import pytest
from celery import states

from resultstore_backend.config import EngineSettings
from tests.integration.conftest import make_app

pytestmark = pytest.mark.integration


def _sessions(pg_database: Any, application_name: str) -> int:
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                           (application_name,)).fetchone()
    return int(row[0]) if row else -1


def _child(url: str, name: str, report: int, proceed: int, *, prefork_child: bool) -> None:
    """In the forked child: store from four threads at once, report the pool, then wait
    until the parent has counted the child's sessions."""
    from celery.signals import worker_process_init

    if prefork_child:
        worker_process_init.send(sender=None)
    app, _ = make_app(url, resultstore_notify=False,
                      database_engine_options=EngineSettings(
                          application_name=name).to_engine_options())
    barrier = threading.Barrier(4)
    errors: list[str] = []

    def work(k: int) -> None:
        try:
            barrier.wait(10)
            for i in range(50):
                app.backend.store_result(f"{k}-{i}-{uuid.uuid4()}", i, states.SUCCESS)
        except Exception as exc:  # reported to the parent
            errors.append(repr(exc))
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    pool: Any = app.backend.holder.engine().pool
    os.write(report, json.dumps({"size": pool.size(), "max_overflow": pool._max_overflow,
                                 "errors": errors}).encode())
    os.close(report)
    os.read(proceed, 1)


def _run_child(url: str, pg_database: Any, application_name: str, *, prefork_child: bool
               ) -> tuple[dict[str, Any], int]:
    report_r, report_w = os.pipe()
    proceed_r, proceed_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # never return into pytest
        code = 1
        try:
            os.close(report_r)
            os.close(proceed_w)
            _child(url, application_name, report_w, proceed_r, prefork_child=prefork_child)
            code = 0
        finally:
            os._exit(code)
    os.close(report_w)
    os.close(proceed_r)
    try:
        with os.fdopen(report_r, "rb") as pipe:
            raw = pipe.read()
        sessions = _sessions(pg_database, application_name)
    finally:
        os.write(proceed_w, b"x")
        os.close(proceed_w)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and raw, f"the child failed ({status})"
    return json.loads(raw), sessions


def test_a_prefork_child_holds_one_connection_even_when_a_task_stores_from_threads(
        pg_store_url: str, pg_database: Any) -> None:
    name = "rs-child-" + secrets.token_hex(4)
    url = pg_store_url
    make_app(url)[0].backend.store_result("warm", 1, states.SUCCESS)  # tables exist
    child, sessions = _run_child(url, pg_database, name, prefork_child=True)
    assert child["errors"] == [], child
    assert (child["size"], child["max_overflow"]) == (1, 0), child
    assert sessions == 1, f"the prefork child holds {sessions} sessions (four threads stored)"
    # control: the same child without worker_process_init (a process running threads)
    # keeps the top-level sizes and may hold one connection per thread
    other, _ = _run_child(url, pg_database, name + "-threads", prefork_child=False)
    assert other["errors"] == [] and (other["size"], other["max_overflow"]) == (5, 10), other


def test_a_burst_beyond_pool_size_leaves_pool_size_connections_open(
        pg_store_url: str, pg_database: Any) -> None:
    """Eight threads store at once through a pool of 2 (+6 overflow); afterwards the process
    keeps 2 sessions, as SQLAlchemy's pool alone would, not the 8 the burst opened: the
    backend's cache of checked-out connections must not pin the overflow (a role's
    CONNECTION LIMIT counts every one of them)."""
    name = "rs-burst-" + secrets.token_hex(4)
    make_app(pg_store_url)[0].backend.store_result("warm", 1, states.SUCCESS)
    app, _ = make_app(pg_store_url, resultstore_notify=False,
                      database_engine_options=EngineSettings(
                          application_name=name, pool_size=2, max_overflow=6
                      ).to_engine_options())
    backend = app.backend
    backend.store_result("first", 1, states.SUCCESS)
    barrier = threading.Barrier(8)
    errors: list[str] = []
    peak: list[int] = []

    def work(k: int) -> None:
        try:
            barrier.wait(10)
            for i in range(40):
                backend.store_result(f"{k}-{i}-{uuid.uuid4()}", i, states.SUCCESS)
            if k == 0:
                peak.append(_sessions(pg_database, name))
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [], errors
    after = _sessions(pg_database, name)
    assert after <= 2, (f"after the burst the process still holds {after} sessions "
                        f"(pool_size 2; peak seen during the burst: {peak})")
    backend.store_result("after", 1, states.SUCCESS)  # still works with what is kept
    assert backend.get_task_meta("after")["status"] == states.SUCCESS
