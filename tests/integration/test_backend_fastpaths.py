"""Correctness of the fast paths (issue 3) with a real worker, broker and PostgreSQL:
duplicate deliveries, concurrent stores of one id, ready states never overwritten,
native chords (failures, duplicated header results, exactly-once callback, expiry),
one query per polling pass for joins, and joins with timeouts."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
import redis
from celery import chord, group, states
from celery.app.task import Context
from celery.exceptions import ChordError
from celery.exceptions import TimeoutError as CeleryTimeoutError

from resultstore_backend.cleanup import run_cleanup
from tests.helpers.waiting import eventually
from tests.integration.conftest import WorkerFactory, make_app

pytestmark = pytest.mark.integration


def test_ready_state_never_overwritten(pg_store_url: str) -> None:
    app, _ = make_app(pg_store_url)
    b = app.backend
    b.store_result("f", ValueError("x"), states.FAILURE)
    b.store_result("f", None, states.STARTED)
    b.store_result("f", None, states.RETRY)
    assert b.get_task_meta("f", cache=False)["status"] == states.FAILURE
    b.store_result("f", 7, states.SUCCESS)  # a redelivered run may succeed after a failure
    b.store_result("f", ValueError("late"), states.FAILURE)
    b.store_result("f", 8, states.SUCCESS)  # nothing replaces SUCCESS
    meta = b.get_task_meta("f", cache=False)
    assert meta["status"] == states.SUCCESS and meta["result"] == 7


def test_concurrent_stores_of_one_id(pg_store_url: str) -> None:
    app, _ = make_app(pg_store_url)
    b = app.backend
    task_id = str(uuid.uuid4())
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def hammer(n: int) -> None:
        try:
            barrier.wait()
            for i in range(50):
                state = [states.STARTED, states.RETRY, states.SUCCESS][(n + i) % 3]
                b.store_result(task_id, {"writer": n, "i": i}, state)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    first = b.get_task_meta(task_id, cache=False)
    assert first["status"] == states.SUCCESS
    b.store_result(task_id, "after", states.SUCCESS)
    assert b.get_task_meta(task_id, cache=False)["result"] == first["result"]
    with psycopg.connect(pg_store_url.removeprefix("resultstore+").replace(
            "postgresql+psycopg", "postgresql").split("?")[0]) as conn:
        rows = conn.execute("SELECT count(*) FROM rs.celery_taskmeta WHERE task_id = %s",
                            (task_id,)).fetchone()
    assert rows == (1,)


def test_duplicate_delivery_keeps_first_result(pg_store_url: str, workers: WorkerFactory,
                                               redis_server: Any) -> None:
    worker = workers.start(pg_store_url, pool="prefork")
    app, t = make_app(pg_store_url, broker=redis_server.url, queue=worker.queue)
    tag = uuid.uuid4().hex
    task_id = str(uuid.uuid4())
    first = t.record_run.apply_async((tag,), task_id=task_id).get(timeout=60)
    assert first == "run-1"
    t.record_run.apply_async((tag,), task_id=task_id)  # the same message delivered again
    r = redis.Redis.from_url(redis_server.url)
    deadline = time.monotonic() + 60
    while int(r.get(f"runs:{tag}") or 0) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # let the second run's store land
    assert app.backend.get_task_meta(task_id, cache=False)["result"] == "run-1"


def test_chord_with_failure(pg_store_url: str, workers: WorkerFactory,
                            redis_server: Any) -> None:
    worker = workers.start(pg_store_url, pool="prefork")
    app, t = make_app(pg_store_url, broker=redis_server.url, queue=worker.queue)
    tag = uuid.uuid4().hex
    res = chord([t.add.s(1, 1), t.fail.s("header broke"), t.add.s(2, 2)])(
        t.record_callback.s(tag))
    # As with Redis, get() re-raises the failed header's own error (on_interval checks
    # the parents after every drain), possibly before the body is marked failed.
    with pytest.raises(ValueError, match="header broke"):
        res.get(timeout=60)
    eventually(lambda: res.backend.get_task_meta(res.id, cache=False)["status"]
               == states.FAILURE or None, 30, "the chord body marked FAILURE")
    with pytest.raises(ChordError, match="header broke"):
        res.get(timeout=60, follow_parents=False)
    assert redis.Redis.from_url(redis_server.url).get(f"callback:{tag}") is None
    assert "chord_unlock" not in worker.log_text()


def test_chord_duplicated_header_results_fire_once(pg_store_url: str, pg_database: Any,
                                                   workers: WorkerFactory,
                                                   redis_server: Any) -> None:
    """Header parts delivered twice count once; the callback fires exactly once."""
    worker = workers.start(pg_store_url, pool="threads")
    app, t = make_app(pg_store_url, broker=redis_server.url, queue=worker.queue)
    tag = uuid.uuid4().hex
    backend = app.backend
    gid = str(uuid.uuid4())
    header_ids = [str(uuid.uuid4()) for _ in range(3)]
    body = t.record_callback.s(tag).set(task_id=str(uuid.uuid4()))
    header = [app.AsyncResult(h) for h in header_ids]
    backend.apply_chord((gid, header), body)
    backend.set_chord_size(gid, 3)

    def part(i: int) -> None:
        request = Context(id=header_ids[i], group=gid, group_index=i, chord=dict(body))
        backend.store_result(header_ids[i], i * 10, states.SUCCESS, request=request)
        backend.on_chord_part_return(request, states.SUCCESS, i * 10)

    part(0)
    part(0)  # redelivered
    part(1)
    part(1)
    r = redis.Redis.from_url(redis_server.url)
    time.sleep(0.5)
    assert r.get(f"callback:{tag}") is None  # duplicates did not complete the chord
    # concurrent duplicates of the last part: exactly one claims the callback
    threads = [threading.Thread(target=part, args=(2,)) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert app.AsyncResult(body.id).get(timeout=60) == [0, 10, 20]
    part(2)  # a late duplicate after the callback fired
    time.sleep(1.0)
    assert int(r.get(f"callback:{tag}") or 0) == 1
    # counters expire with the results
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT done, size FROM rs.resultstore_chords WHERE group_id=%s",
                            (gid,)).fetchone() == (3, 3)
        conn.execute("UPDATE rs.resultstore_chords SET created_at = now() - interval '2 days'")
    report = run_cleanup(backend.holder.engine(), backend.holder.config.names, expires=86400)
    assert report.chords_deleted >= 1
    with psycopg.connect(pg_database.dsn()) as conn:
        assert conn.execute("SELECT count(*) FROM rs.resultstore_chords WHERE group_id=%s",
                            (gid,)).fetchone() == (0,)


def test_big_chord_native(pg_store_url: str, workers: WorkerFactory, redis_server: Any) -> None:
    worker = workers.start(pg_store_url, pool="prefork", concurrency=2)
    app, t = make_app(pg_store_url, broker=redis_server.url, queue=worker.queue)
    res = chord(t.add.s(i, 0) for i in range(200))(t.record_callback.s("big"))
    assert res.get(timeout=120) == list(range(200))  # header order, not completion order
    # Celery flattens a group nested in a header; every part still arrives once
    res2 = chord([group(t.add.s(1, 1), t.add.s(2, 2)), t.add.s(3, 3)])(t.record_callback.s("x"))
    assert sorted(res2.get(timeout=60)) == [2, 4, 6]


def test_join_one_query_per_pass_and_timeout(pg_store_url: str, workers: WorkerFactory,
                                             redis_server: Any) -> None:
    worker = workers.start(pg_store_url, pool="prefork", concurrency=2)
    app, t = make_app(pg_store_url, broker=redis_server.url, queue=worker.queue)
    g = group([t.sleep_then.s(i, 0.01) for i in range(40)] + [t.sleep_then.s("slow", 3.0)]
              ).apply_async()
    # count the batch reads themselves (one statement each): pool checkouts no longer
    # say how many queries ran, the engine keeps connections checked out between them
    backend = app.backend
    fetch_many = backend._fetch_many
    batches: list[int] = []

    def counted(ids: list[str], **kwargs: Any) -> list[Any]:
        batches.append(len(ids))
        return fetch_many(ids, **kwargs)

    backend._fetch_many = counted
    t0 = time.monotonic()
    with pytest.raises(CeleryTimeoutError):
        g.get(timeout=0.6, interval=0.1)
    assert time.monotonic() - t0 < 3.0
    # one query reads every pending id at the start; after that a woken waiter reads only
    # the ids it was notified of (plus a bounded safety-net read of the pending ones), so
    # the rows read grow with the tasks, never with tasks x pending (~40 x 41 here)
    assert batches and batches[0] == 41, batches
    assert sum(batches) <= 3 * 41, batches
    batches.clear()
    values = g.get(timeout=60, interval=0.1)
    assert values[:40] == list(range(40)) and values[40] == "slow"
    assert batches and sum(batches) <= 3 * 41, batches
    assert g.ready() and g.successful()
