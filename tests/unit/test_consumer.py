"""The result consumer's polling path on embedded SQLite (no services): the same drain loop
as pushed waits, with on_interval after every pass, timeouts, wait_for and get_many."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, states
from celery.backends.asynchronous import greenletDrainer
from celery.exceptions import ImproperlyConfigured
from celery.exceptions import TimeoutError as CeleryTimeoutError

from resultstore_backend.backend import CorruptRowError
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


def _corrupt(app: Celery, task_id: str) -> None:
    """Store ``task_id`` and overwrite its result column with bytes no decoder accepts."""
    app.backend.store_result(task_id, 1, states.SUCCESS)
    path = app.backend.holder.config.url.database
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE celery_taskmeta SET result = X'00ff' WHERE task_id = ?",
                     (task_id,))
    conn.close()


def _store_later(app: Celery, task_id: str, value: Any) -> threading.Timer:
    timer = threading.Timer(0.2, lambda: app.backend.store_result(task_id, value,
                                                                  states.SUCCESS))
    timer.start()
    return timer


def test_corrupt_row_is_raised_by_its_own_wait_only(app: Celery) -> None:
    """A pending result whose row cannot be decoded does not break the backend's other waits:
    every pass reads all pending ids, and the corrupt one used to raise in whichever wait
    read it."""
    _corrupt(app, "bad")
    bad = app.AsyncResult("bad")
    app.backend.add_pending_result(bad)  # pending in this backend, as a result not yet read
    timer = _store_later(app, "good", 2)
    try:
        assert app.AsyncResult("good").get(timeout=10) == 2, "another result's wait broke"
    finally:
        timer.join()
    group = app.GroupResult("grp", [app.AsyncResult("good"), app.AsyncResult("g2")])
    timer = _store_later(app, "g2", 3)
    try:
        assert group.join_native(timeout=10) == [2, 3]
    finally:
        timer.join()
    with pytest.raises(CorruptRowError, match="task bad .* column 'result'"):
        bad.get(timeout=10)
    with pytest.raises(CorruptRowError, match="task bad"):
        app.GroupResult("g", [app.AsyncResult("bad")]).join_native(timeout=10)


class _ThreadDrainer(greenletDrainer):
    """Celery's eventlet/gevent drainer, its greenlet a thread: ``drain_events`` runs in a
    loop of its own and waits block on its drain-complete event (neither library is a
    dependency; this is the code path both take)."""

    def spawn(self, func: Any) -> threading.Thread:
        thread = threading.Thread(target=func, daemon=True, name="rs-test-drainer")
        thread.start()
        return thread

    def _event(self) -> threading.Event:
        return threading.Event()


def test_waits_through_a_greenlet_style_drainer(app: Celery) -> None:
    consumer = app.backend.result_consumer
    drainer = consumer.drainer = _ThreadDrainer(consumer)
    try:
        _corrupt(app, "bad")
        app.backend.add_pending_result(app.AsyncResult("bad"))
        timer = _store_later(app, "t1", {"v": 1})
        try:
            assert app.AsyncResult("t1").get(timeout=10) == {"v": 1}
        finally:
            timer.join()
        # the corrupt row read by the drainer ended neither it nor the next wait
        assert drainer._exc is None and not drainer._shutdown.is_set(), drainer._exc
        timer = _store_later(app, "t2", 5)
        try:
            assert app.GroupResult("g", [app.AsyncResult("t2")]).join_native(timeout=10) == [5]
        finally:
            timer.join()
        with pytest.raises(CorruptRowError, match="task bad"):
            app.AsyncResult("bad").get(timeout=10)
    finally:
        drainer.stop()


def test_interval_settings_are_read_once_and_bounded(tmp_path: Path) -> None:
    """The safety net cannot be switched off (a lost notification would hang a wait), and no
    interval can make a wait spin or fail in time.sleep; errors name the setting."""
    url = f"resultstore+sqlite:///{tmp_path}/r.db"
    app = Celery("u", backend=url, set_as_current=False)
    app.conf.update(resultstore_poll_interval="0.2", resultstore_safety_interval=5)
    consumer = app.backend.result_consumer
    assert (consumer.poll_interval, consumer.safety_interval) == (0.2, 5.0)
    for name, value in (("resultstore_safety_interval", float("inf")),
                        ("resultstore_safety_interval", 3600),
                        ("resultstore_safety_interval", 0),
                        ("resultstore_poll_interval", -1),
                        ("resultstore_poll_interval", float("nan")),
                        ("resultstore_poll_interval", "soon")):
        bad = Celery("u", backend=url, set_as_current=False)
        bad.conf.update({name: value})
        with pytest.raises(ImproperlyConfigured, match=name):
            bad.backend  # noqa: B018 (building the backend reads the settings)
    reset_registry()


def test_listener_that_cannot_connect_backs_off_and_warns_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """A refused LISTEN connection (a closed port on 127.0.0.1): attempts are spaced by a
    growing backoff capped at 2 s (a wait does not reconnect on every pass), one warning for
    the whole outage, without the password."""
    import logging

    from resultstore_backend import consumer as consumer_mod
    from resultstore_backend.config import parse_backend_url
    from resultstore_backend.engine import EngineHolder
    from resultstore_devtools.procs import free_port

    caplog.set_level(logging.WARNING, logger="resultstore_backend.consumer")
    source = parse_backend_url(
        f"postgresql+psycopg://u:s3cret-pw@127.0.0.1:{free_port()}/db?schema=rs")
    holder = EngineHolder(source, create_tables=False)
    listener = consumer_mod.Listener(holder)
    sink = object()
    try:
        listener.update(sink, add=["t1"])  # the first wait: one attempt, refused
        assert not listener.connected
        backoffs = []
        for _ in range(8):
            due = listener._next_attempt
            listener.ensure_connected()  # not due yet: no new attempt
            assert listener._next_attempt == due, "reconnected before the backoff ran out"
            listener._next_attempt = 0.0  # the backoff ran out
            listener.ensure_connected()
            # an attempt was made (and refused): the next one is scheduled again
            assert not listener.connected and listener._next_attempt > 0.0
            backoffs.append(listener._backoff)
        assert backoffs == sorted(backoffs) and backoffs[-1] == consumer_mod._BACKOFF_MAX, \
            backoffs
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1 and "cannot open the LISTEN connection" in warnings[0], \
            warnings
        assert "s3cret-pw" not in warnings[0]
    finally:
        listener.release(sink, ["t1"])
        listener.close()
        holder.dispose()
