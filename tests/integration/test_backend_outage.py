"""PostgreSQL outages, corrupt rows and JSON semantics, with the real services.

- A live worker (Redis broker) keeps storing while PostgreSQL is stopped for 30 s: the
  retry budget (90 s by default) carries every store over the outage, so no result is
  lost and every task's result reads back afterwards. The worker log must show retries
  during the outage (otherwise the outage hit no store and the test proves nothing).
- A budget shorter than the outage makes the store fail (the control: the budget is
  what carries the stores, not luck), with BackendStoreError as Celery raises it.
- A row made corrupt by SQL gives the caller a CorruptRowError that names the task, the
  schema-qualified table and the column, never the content.
- With the json serializer a result reads back exactly as from Celery's Redis backend
  (tuples and namedtuples as lists, kombu's datetime/UUID/Decimal/bytes kept).
"""

from __future__ import annotations

import time
from collections import namedtuple
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
from celery import Celery, states
from celery.exceptions import BackendStoreError

from resultstore_backend.backend import CorruptRowError
from tests.integration.conftest import WorkerFactory, make_app, superuser_conn

pytestmark = pytest.mark.integration

OUTAGE_SECONDS = 30.0


def test_worker_stores_through_a_30s_postgres_outage(pg_store_url: str, postgres: Any,
                                                     workers: WorkerFactory,
                                                     redis_server: Any) -> None:
    worker = workers.start(pg_store_url, pool="threads", concurrency=8)
    app, t = make_app(pg_store_url, broker=redis_server.url, queue=worker.queue)
    assert t.add.delay(1, 1).get(timeout=60) == 2  # warm pools everywhere
    before = [t.sleep_then.delay(i, 0.2) for i in range(120)]
    time.sleep(0.5)  # tasks are running and storing when the server goes away
    during: list[Any] = []
    postgres.stop()
    try:
        stopped_at = time.monotonic()
        while time.monotonic() - stopped_at < OUTAGE_SECONDS:
            during.append(t.sleep_then.delay(1000 + len(during), 0.05))  # Redis still up
            time.sleep(0.25)
    finally:
        postgres.start()
    lost = []
    for i, r in enumerate(before):
        if r.get(timeout=180) != i:
            lost.append(r.id)
    for i, r in enumerate(during):
        if r.get(timeout=180) != 1000 + i:
            lost.append(r.id)
    assert not lost, f"{len(lost)} of {len(before) + len(during)} results lost"
    # every result is really in the store, read by a fresh client
    app2, _ = make_app(pg_store_url)
    states_seen = {app2.AsyncResult(r.id).state for r in before + during}
    assert states_seen == {states.SUCCESS}, states_seen
    log = worker.log_text()
    assert "BackendStoreError" not in log, log[-4000:]
    retries = log.count("retry budget left")
    assert retries > 0, "no store was retried: the outage did not hit the worker\n" + log[-3000:]
    assert worker.proc.poll() is None
    print(f"stores retried during the outage: {retries} log lines; "
          f"{len(before) + len(during)} results, 0 lost")


def test_a_budget_shorter_than_the_outage_fails_the_store(pg_store_url: str,
                                                          postgres: Any) -> None:
    """The control of the test above: with a 2 s budget a 6 s outage is not ridden out."""
    app = Celery("rs_outage_control", backend=pg_store_url, set_as_current=False)
    app.conf.resultstore_retry_budget = 2.0
    backend = app.backend
    backend.store_result("warm", 1, states.SUCCESS)
    postgres.stop()
    try:
        started = time.monotonic()
        with pytest.raises(BackendStoreError):
            backend.store_result("lost", 2, states.SUCCESS)
        gave_up_after = time.monotonic() - started
    finally:
        postgres.start()
    assert gave_up_after < 30, f"a 2 s budget kept retrying for {gave_up_after:.1f} s"
    backend.store_result("after", 3, states.SUCCESS)  # recovers once the server is back
    assert backend.get_task_meta("after")["result"] == 3


# ----------------------------------------------------------------------------- corrupt rows


@pytest.mark.parametrize("column,value", [
    ("result", b"\x80\x04\x95not a pickle at all"),
    ("result", b"\x80\x02cbuiltins\nbytearray\nJ\x00e\xcd\x1d\x85R."),  # allocation bomb
    ("result", b"{not json"),
    ("children", b"\xff\xfe secret-looking-content"),
])
def test_corrupt_row_names_task_table_and_column(pg_store_url: str, pg_database: Any,
                                                 column: str, value: bytes) -> None:
    app, _ = make_app(pg_store_url)
    backend = app.backend
    backend.store_result("corrupt-me", {"fine": True}, states.SUCCESS)
    with superuser_conn(pg_database) as conn:
        conn.execute(f"UPDATE rs.celery_taskmeta SET {column} = %s WHERE task_id = %s",
                     (value, "corrupt-me"))
    with pytest.raises(CorruptRowError) as info:
        app.AsyncResult("corrupt-me").get(timeout=10)
    exc = info.value
    text = str(exc)
    assert "corrupt-me" in text and "rs.celery_taskmeta" in text and repr(column) in text, text
    assert exc.task_id == "corrupt-me" and exc.table == "rs.celery_taskmeta"
    assert exc.column == column
    assert "secret-looking" not in text and "not a pickle" not in text and "not json" not in text
    # the other rows of the store are unaffected
    backend.store_result("healthy", 5, states.SUCCESS)
    assert app.AsyncResult("healthy").get(timeout=10) == 5


def test_corrupt_group_row_names_group_and_table(pg_store_url: str, pg_database: Any) -> None:
    app, _ = make_app(pg_store_url)
    group = app.GroupResult("grp-corrupt", [app.AsyncResult("a"), app.AsyncResult("b")])
    group.save()
    with superuser_conn(pg_database) as conn:
        conn.execute("UPDATE rs.celery_tasksetmeta SET result = %s WHERE taskset_id = %s",
                     (b"\x80\x04garbage", "grp-corrupt"))
    with pytest.raises(CorruptRowError) as info:
        app.GroupResult.restore("grp-corrupt", app=app)
    assert "grp-corrupt" in str(info.value) and "rs.celery_tasksetmeta" in str(info.value)


# ----------------------------------------------------------------------------- json semantics

Point = namedtuple("Point", "x y")

JSON_CASES: list[Any] = [
    (1, 2), Point(3, 4), [(1, (2, 3)), Point(5, 6)], {"t": (1,), "p": Point(0, 0)},
    {7: "int key", 2.5: "float key", True: "bool key", None: "none key"},
    datetime(2026, 12, 1, 23, 0, tzinfo=UTC), date(2026, 1, 2), Decimal("1.10"),
    UUID("12345678-1234-5678-1234-567812345678"), b"bytes \x00\xff", "日本語 ✓",
    [datetime(2026, 1, 1), {"nested": (Decimal("2"), b"x")}], 2**80, 1.5, None, True,
]


def test_json_results_read_back_as_from_the_redis_backend(pg_store_url: str,
                                                          redis_server: Any) -> None:
    ours, _ = make_app(pg_store_url)
    redis_app = Celery("rs_redis_ref", backend=redis_server.url, set_as_current=False)
    for app in (ours, redis_app):
        app.conf.result_serializer = "json"
    for i, value in enumerate(JSON_CASES):
        task_id = f"json-case-{i}"
        for app in (ours, redis_app):
            app.backend.store_result(task_id, value, states.SUCCESS)
        expected = redis_app.backend.get_task_meta(task_id, cache=False)["result"]
        got = ours.backend.get_task_meta(task_id, cache=False)["result"]
        assert got == expected and _shape(got) == _shape(expected), (
            f"{value!r}: Redis gives {expected!r}, resultstore gives {got!r}")
        redis_app.backend.forget(task_id)
    # and what a set (not JSON) does: both refuse it when storing
    with pytest.raises(Exception) as redis_error:
        redis_app.backend.store_result("set", {1, 2}, states.SUCCESS)
    with pytest.raises(type(redis_error.value)):
        ours.backend.store_result("set", {1, 2}, states.SUCCESS)


def _shape(value: Any) -> Any:
    """Types all the way down (== alone says (1, 2) == [1, 2] is False but 1 == 1.0)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_shape(v) for v in value])
    return type(value).__name__
