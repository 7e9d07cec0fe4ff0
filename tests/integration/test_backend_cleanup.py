"""``resultstore cleanup``: batched deletion of expired results and stale non-ready rows,
recorded in the cleanup-run table; prints the rows deleted; non-zero exit on failure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import states

from resultstore_backend.config import render_binding
from tests.helpers.kubelet_dir import KubeletDir
from tests.integration.conftest import make_app
from tests.integration.stores import binding_for, create_role, create_store

pytestmark = pytest.mark.integration


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "resultstore_backend.cli", *args],
                          capture_output=True, text=True, timeout=300)


def test_cleanup_cli_config_dir(pg_database: Any, tmp_path: Path) -> None:
    names = create_store(pg_database)
    role, password = create_role(pg_database, names)  # the worker role: no DDL rights
    KubeletDir(tmp_path / "b").write(render_binding(binding_for(pg_database, role, password)))
    app, _ = make_app(f"resultstore://{tmp_path / 'b'}")
    b = app.backend
    for i in range(23):
        b.store_result(f"old-{i}", i, states.SUCCESS)
    for i in range(5):
        b.store_result(f"new-{i}", i, states.SUCCESS)
    b.store_result("stuck", None, states.STARTED)
    b.store_result("running", None, states.STARTED)
    from celery.result import GroupResult
    GroupResult("old-group", [app.AsyncResult("old-1")], app=app).save()
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        conn.execute("UPDATE rs.celery_taskmeta SET date_done = now() - interval '2 hours' "
                     "WHERE task_id LIKE 'old-%'")
        conn.execute("UPDATE rs.celery_tasksetmeta SET date_done = now() - interval '2 hours'")
        conn.execute("UPDATE rs.celery_taskmeta SET updated_at = now() - interval '30 days' "
                     "WHERE task_id = 'stuck'")
    proc = _cli("cleanup", "--config-dir", str(tmp_path / "b"), "--batch-size", "7")
    assert proc.returncode == 0, proc.stderr
    assert "deleted 25 rows" in proc.stdout  # 23 tasks + 1 group + 1 stale
    with psycopg.connect(pg_database.dsn()) as conn:
        left = {r[0] for r in conn.execute("SELECT task_id FROM rs.celery_taskmeta")}
        assert left == {f"new-{i}" for i in range(5)} | {"running"}
        run = conn.execute(
            "SELECT rows_deleted, tasks_deleted, groups_deleted, unready_deleted, success, "
            "error, duration_seconds >= 0, started_at IS NOT NULL "
            "FROM rs.resultstore_cleanup_runs ORDER BY id DESC LIMIT 1").fetchone()
    assert run == (25, 23, 1, 1, True, None, True, True)


def test_cleanup_failure_exits_non_zero(pg_database: Any) -> None:
    # no tables in this schema: nothing to clean yet, said as such (exit 3: not migrated),
    # so the CronJob's Job fails with a reason instead of "no such table"
    url = pg_database.url() + "?schema=nothing_here"
    proc = _cli("cleanup", "--url", url)
    assert proc.returncode == 3, proc.stderr
    assert "not migrated" in proc.stderr and pg_database.server.password not in proc.stderr
    # a server that refuses the connection: a plain failure (exit 1) naming host:port
    password = pg_database.server.password
    refused = _cli("cleanup", "--url",
                   f"postgresql+psycopg://postgres:{password}@127.0.0.1:1/db?schema=rs")
    assert refused.returncode == 1, refused.stderr
    assert "error" in refused.stderr and "127.0.0.1:1" in refused.stderr
    assert password not in refused.stderr


def test_backend_cleanup_method(pg_store_url: str, pg_database: Any) -> None:
    app, _ = make_app(pg_store_url, result_expires=60)
    b = app.backend
    b.store_result("a", 1, states.SUCCESS)
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        conn.execute("UPDATE rs.celery_taskmeta SET date_done = now() - interval '1 hour'")
    b.cleanup()
    assert b.get_task_meta("a", cache=False)["status"] == states.PENDING
