"""The result consumer's polling path on embedded SQLite (no services): the same drain loop
as pushed waits, with on_interval after every pass, timeouts, wait_for and get_many."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, states
from celery.exceptions import TimeoutError as CeleryTimeoutError

from resultstore_backend.consumer import DEFAULT_SQLITE_POLL_INTERVAL, ResultConsumer
from resultstore_backend.engine import reset_registry


@pytest.fixture
def app(tmp_path: Path) -> Any:
    reset_registry()
    app = Celery("u", backend=f"resultstore+sqlite:///{tmp_path}/r.db", set_as_current=False)
    yield app
    reset_registry()


def test_sqlite_backend_is_async_and_polls(app: Celery) -> None:
    b = app.backend
    assert b.is_async and not b.notifications
    consumer = b.result_consumer
    assert isinstance(consumer, ResultConsumer) and not consumer.push
    assert consumer.poll_interval == DEFAULT_SQLITE_POLL_INTERVAL
    assert consumer.listener() is None


def test_wait_returns_a_result_stored_while_waiting(app: Celery) -> None:
    b = app.backend
    store = threading.Timer(0.2, lambda: b.store_result("t1", {"v": 1}, states.SUCCESS))
    ticks: list[int] = []
    store.start()
    try:
        assert app.AsyncResult("t1").get(timeout=10, on_interval=lambda: ticks.append(1)) \
            == {"v": 1}
    finally:
        store.join()
    assert ticks, "on_interval was never called between polling passes"


def test_timeout_raises_celerys_timeout_error(app: Celery) -> None:
    with pytest.raises(CeleryTimeoutError):
        app.AsyncResult("never").get(timeout=0.1)


def test_failure_propagates_and_wait_for_returns_the_meta(app: Celery) -> None:
    b = app.backend
    b.mark_as_failure("f1", ValueError("bad"))
    with pytest.raises(ValueError, match="bad"):
        app.AsyncResult("f1").get(timeout=5)
    meta = b.wait_for("f1", timeout=5)
    assert meta["status"] == states.FAILURE
    with pytest.raises(CeleryTimeoutError):
        b.wait_for("never", timeout=0.1)


def test_group_join_native_and_get_many_poll(app: Celery) -> None:
    b = app.backend
    ids = [f"g{i}" for i in range(5)]
    group = app.GroupResult("grp", [app.AsyncResult(i) for i in ids])

    def store_all() -> None:
        for n, task_id in enumerate(ids):
            b.store_result(task_id, n, states.SUCCESS)
    timer = threading.Timer(0.2, store_all)
    timer.start()
    try:
        assert group.join_native(timeout=10) == list(range(5))
    finally:
        timer.join()
    assert dict(b.get_many(ids, timeout=5)).keys() == set(ids)
    # one pass only, never a sleep, for Celery's ResultSet._iter_meta
    assert list(b.get_many(["absent"], max_iterations=1)) == []
