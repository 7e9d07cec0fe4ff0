"""Rows written by this backend are readable by a stock Celery ``db+`` client
(search_path in the URL, as the Secret's ``result_backend`` key gives it), and
rows a stock client writes are readable by this backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from celery import Celery, states
from celery.app.task import Context
from celery.result import AsyncResult, GroupResult

from resultstore_backend.config import (
    Binding,
    CelerySettings,
    EngineSettings,
    render_binding,
)

pytestmark = pytest.mark.integration


def _pair(ours_url: str, stock_url: str, **conf: Any) -> tuple[Celery, Celery]:
    ours = Celery("ours", backend=ours_url, broker="memory://", set_as_current=False)
    stock = Celery("stock", backend=stock_url, broker="memory://", set_as_current=False)
    for app in (ours, stock):
        app.conf.update(**conf)
    return ours, stock


def _round_trip(ours: Celery, stock: Celery) -> None:
    b, s = ours.backend, stock.backend
    b.store_result("ok-1", {"answer": [1, 2, 3]}, states.SUCCESS)
    try:
        raise KeyError("missing")
    except KeyError as exc:
        b.store_result("bad-1", exc, states.FAILURE, traceback="tb text")
    b.store_result("started-1", {"pid": 1}, states.STARTED)
    meta = s.get_task_meta("ok-1")
    assert meta["status"] == "SUCCESS" and meta["result"] == {"answer": [1, 2, 3]}
    bad = s.get_task_meta("bad-1")
    assert bad["status"] == "FAILURE" and isinstance(bad["result"], KeyError)
    assert bad["traceback"] == "tb text"
    assert s.get_task_meta("started-1")["status"] == "STARTED"
    assert AsyncResult("ok-1", app=stock).get(timeout=5) == {"answer": [1, 2, 3]}
    group = GroupResult("grp-1", [AsyncResult("ok-1", app=ours)], app=ours)
    group.save()
    restored = GroupResult.restore("grp-1", app=stock)
    assert restored is not None and [r.id for r in restored.results] == ["ok-1"]
    # a row with our group_id/parent_id columns filled (a group member, a chain step)
    member = Context(id="member-1", group="grp-1", parent_id="ok-1", task="rs.x", args=[2],
                     kwargs={})
    b.store_result("member-1", 9, states.SUCCESS, request=member)
    assert s.get_task_meta("member-1")["result"] == 9
    assert AsyncResult("member-1", app=stock).get(timeout=5) == 9
    ids = b.get_task_meta("member-1", cache=False)
    assert (ids["group_id"], ids["parent_id"]) == ("grp-1", "ok-1"), ids
    # and the other way round: stock writes, we read
    s.store_result("stock-1", [4, 5], states.SUCCESS)
    assert b.get_task_meta("stock-1")["result"] == [4, 5]
    assert not {"group_id", "parent_id"} & set(b.get_task_meta("stock-1", cache=False))
    assert b.task_result_exists("stock-1")


def test_stock_postgres_client_reads_our_rows(pg_database: Any) -> None:
    schema = "rs"
    ours_url = "resultstore+" + pg_database.url() + f"?schema={schema}"
    # exactly what the operator's Secret gives stock workers
    server = pg_database.server
    binding = Binding(host=server.host, port=server.port, database=pg_database.name,
                      username=server.superuser, password=server.password, sslmode="disable",
                      engine=EngineSettings(), celery=CelerySettings(schema=schema))
    stock_url = render_binding(binding)["result_backend"]
    assert stock_url.startswith("db+postgresql+psycopg://")
    ours, stock = _pair(ours_url, stock_url, result_extended=True)
    ours.backend.store_result("warmup", 1, states.SUCCESS)  # creates the tables
    _round_trip(ours, stock)


def test_stock_postgres_client_created_tables_are_adopted(pg_database: Any) -> None:
    """A schema whose tables a stock client created first is upgraded in place."""
    import psycopg

    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA legacy")
    stock_url = "db+" + pg_database.url() + "?options=" + quote("-csearch_path=legacy", safe="")
    stock = Celery("stock", backend=stock_url, broker="memory://", set_as_current=False)
    stock.backend.store_result("old-1", "old value", states.SUCCESS)
    ours = Celery("ours", backend="resultstore+" + pg_database.url() + "?schema=legacy",
                  broker="memory://", set_as_current=False)
    assert ours.backend.get_task_meta("old-1")["result"] == "old value"
    _round_trip(ours, stock)


def test_stock_sqlite_client_reads_our_rows(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    ours, stock = _pair(f"resultstore+sqlite:///{path}", f"db+sqlite:///{path}")
    ours.backend.store_result("warmup", 1, states.SUCCESS)
    _round_trip(ours, stock)
