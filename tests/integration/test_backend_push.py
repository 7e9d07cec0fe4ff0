"""Push waits over LISTEN/NOTIFY with a live worker and a Redis broker (issue 13).

Every test waits through the real Celery API (``AsyncResult.get``, group joins, chords)
and checks the value it gets; where a test proves the push path was taken it reads
the process's listener counters or pg_stat_activity, never elapsed time.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import chord, group, states
from psycopg import sql

from resultstore_backend.config import render_binding
from resultstore_backend.consumer import close_listeners
from resultstore_backend.notify import channel_for, shard_of
from tests.helpers.kubelet_dir import KubeletDir
from tests.helpers.waiting import eventually
from tests.integration.apps.tasks import define_push_tasks
from tests.integration.conftest import WorkerFactory, make_app
from tests.integration.stores import binding_for, create_role, create_store

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _close_listeners() -> Iterator[None]:
    yield
    close_listeners()


def _wait_all(fns: list[Any], timeout: float = 180) -> list[Any]:
    """Run each ``fn()`` in its own thread; return their results (re-raise the first error)."""
    out: list[Any] = [None] * len(fns)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            out[i] = fns[i]()
        except BaseException as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    alive = sum(t.is_alive() for t in threads)
    assert not alive, f"{alive} of {len(fns)} waits never returned"
    if errors:
        raise errors[0]
    return out


def _wait_all_during(disrupt: Any, fns: list[Any], join_timeout: float) -> list[Any]:
    """:func:`_wait_all` while ``disrupt()`` runs in a thread of its own (a restart, a
    rotation), joined afterwards whatever the waits did."""
    thread = threading.Thread(target=disrupt)
    thread.start()
    try:
        return _wait_all(fns)
    finally:
        thread.join(join_timeout)


def _waits_across_restart(postgres: Any, results: list[Any]) -> list[Any]:
    """Every result's value, each waited for in a thread of its own while PostgreSQL
    restarts a second after the first wait began."""
    started = threading.Event()

    def waiter(i: int) -> Any:
        started.set()
        return results[i].get(timeout=150)

    def restart() -> None:
        started.wait(30)
        time.sleep(1.0)
        postgres.restart()

    return _wait_all_during(restart, [lambda i=i: waiter(i) for i in range(len(results))],
                            120)


def _assert_pushed_again(t: Any, listener: Any, connects: int) -> None:
    """After a restart waits are pushed again over a new LISTEN connection (the waits
    during the outage may all have been answered by polling while the listener was
    still backing off)."""
    def pushed_again() -> bool | None:
        before = listener.received
        assert t.add.delay(2, 3).get(timeout=60) == 5
        return (listener.connects > connects and listener.received > before) or None
    eventually(pushed_again, 60, "a wait answered by a notification after the restart")


def _listen_sessions(pg_database: Any) -> dict[int, tuple[str, str]]:
    """pid -> (role, last query) of the sessions whose last statement was a (UN)LISTEN."""
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, usename, query FROM pg_stat_activity WHERE datname = "
            "current_database() AND pid <> pg_backend_pid() "
            "AND query LIKE '%LISTEN \"rs_%'").fetchall()
    return {int(pid): (user, query) for pid, user, query in rows}


@contextmanager
def _shard_probe(pg_database: Any, backend: Any, task_id: str, *, presence: bool = True
                 ) -> Iterator[tuple[psycopg.Connection[Any], str]]:
    """A session of its own LISTENing to ``task_id``'s channel; with ``presence`` it also
    holds the shard's presence lock, as a waiting process does (so a notifying store
    NOTIFYs it)."""
    channel = channel_for(backend._sql().channel_prefix, task_id)
    with psycopg.connect(pg_database.dsn(), autocommit=True) as probe:
        if presence:
            probe.execute("SELECT pg_advisory_lock_shared(%s, %s)",
                          (backend._sql().lock_key, shard_of(task_id)))
        probe.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        yield probe, channel


def _nothing_notified(probe: psycopg.Connection[Any]) -> bool:
    probe.execute("SELECT 1")  # a round trip: whatever was sent has arrived
    return list(probe.notifies(timeout=0.5)) == []


# ----------------------------------------------------------------------------- the basics


def test_waits_are_pushed_and_callbacks_work_as_with_redis(
        pg_store_url: str, pg_database: Any, workers: WorkerFactory,
        redis_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="resultstore_backend.consumer")
    worker = workers.start(pg_store_url, pool="threads", concurrency=4)
    app, t = make_app(pg_store_url, broker=redis_server.url, queue=worker.queue)
    backend = app.backend
    assert backend.is_async and backend.notifications

    # without a listener on the shard the store sends no NOTIFY at all (the global
    # commit lock of notifying transactions is not taken)
    quiet_id = str(uuid.uuid4())
    with _shard_probe(pg_database, backend, quiet_id, presence=False) as (probe, _):
        t.add.apply_async((5, 5), task_id=quiet_id)  # nobody in any process waits yet
        deadline = time.monotonic() + 60
        while backend.get_task_meta(quiet_id, cache=False)["status"] != states.SUCCESS:
            assert time.monotonic() < deadline, "the worker never stored the quiet task"
            time.sleep(0.05)
        assert _nothing_notified(probe), "notified with nobody on the shard"
    # an independent session that LISTENs and holds the shard's presence lock sees the
    # store's notification (positive control of the notifications-off test below)
    probe_id = str(uuid.uuid4())
    with _shard_probe(pg_database, backend, probe_id) as (probe, channel):
        assert t.add.apply_async((1, 2), task_id=probe_id).get(timeout=60) == 3
        got = [(n.channel, n.payload) for n in probe.notifies(timeout=5, stop_after=1)]
    assert (channel, f"rs1|SUCCESS|{probe_id}") in got, got

    listener = backend.result_consumer.listener()
    assert listener is not None and listener.connected
    assert not [r for r in caplog.records if "pooler" in r.getMessage()], \
        "a direct connection was taken for a pooler"
    before = listener.received
    assert [t.add.delay(i, i).get(timeout=60) for i in range(5)] == [0, 2, 4, 6, 8]
    assert t.add.delay(3, 4).wait(timeout=60) == 7  # AsyncResult.wait: Celery's alias of get
    assert listener.received > before, "results arrived without a notification"
    # the last wait's channel is UNLISTENed shortly after (not per wait: one round trip)
    eventually(lambda: listener.listening == frozenset() or None, 10,
               "the channels UNLISTENed once no wait needs them")

    # groups and chords: get, join, join_native, iterate-like iter_native, get_many
    g = group(t.add.s(i, 1) for i in range(10)).apply_async()
    assert g.get(timeout=60) == [i + 1 for i in range(10)]
    g2 = group(t.add.s(i, 2) for i in range(5)).apply_async()
    assert g2.join(timeout=60) == [i + 2 for i in range(5)]
    g3 = group(t.add.s(i, 3) for i in range(5)).apply_async()
    assert g3.join_native(timeout=60) == [i + 3 for i in range(5)]
    g4 = group(t.add.s(i, 4) for i in range(5)).apply_async()
    assert sorted(meta["result"] for _, meta in g4.iter_native(timeout=60)) == \
        [i + 4 for i in range(5)]
    ids = [t.sleep_then.delay(i, 0.3).id for i in range(5)]
    before = listener.received
    many = dict(backend.get_many(ids, timeout=60))
    assert [many[i]["result"] for i in ids] == list(range(5))
    assert listener.received > before, "get_many was not woken by a notification"
    assert chord(t.add.s(i, i) for i in range(6))(t.tsum.s()).get(timeout=60) == 30

    # on_message / on_interval, compared with the Redis backend on the same task
    seen: dict[str, list[tuple[str, Any]]] = {}
    redis_backend = redis_server.url.rsplit("/", 1)[0] + "/3"
    for name, url in (("resultstore", pg_store_url), ("redis", redis_backend)):
        w = worker if name == "resultstore" else workers.start(url, pool="threads",
                                                               concurrency=2)
        a, _ = make_app(url, broker=redis_server.url, queue=w.queue)
        pt = define_push_tasks(a)
        messages: list[tuple[str, Any]] = []
        ticks: list[int] = []
        r = pt.progress.delay(3, 0.4)
        assert r.get(timeout=60, on_message=lambda m, out=messages: out.append(
            (m["status"], m["result"])), on_interval=lambda out=ticks: out.append(1)) == "done"
        assert ticks, f"{name}: on_interval never called"
        seen[name] = messages
    for name, messages in seen.items():
        progress = [m for m in messages if m[0] == "PROGRESS"]
        assert progress == [("PROGRESS", {"i": i}) for i in range(3)], (name, messages)
        assert messages[-1] == (states.SUCCESS, "done"), (name, messages)
    assert seen["resultstore"] == seen["redis"]


@pytest.mark.parametrize("store", ["postgresql", "sqlite", "redis"])
def test_chord_whose_header_fails_raises_the_header_error(
        store: str, pg_store_url: str, sqlite_store_url: str, workers: WorkerFactory,
        redis_server: Any) -> None:
    """As with Redis: the header's own exception, not the body's ChordError."""
    url = {"postgresql": pg_store_url, "sqlite": sqlite_store_url,
           "redis": redis_server.url.rsplit("/", 1)[0] + "/4"}[store]
    worker = workers.start(url, pool="threads", concurrency=4)
    app, t = make_app(url, broker=redis_server.url, queue=worker.queue)
    for header in ([t.fail.s("header boom"), t.add.s(1, 1)],
                   [t.add.s(1, 1), t.sleep_then.s(0, 0.3), t.fail.s("header boom")]):
        result = chord(header)(t.tsum.s())
        with pytest.raises(ValueError, match="header boom"):
            result.get(timeout=60)


# ----------------------------------------------------------------------------- robustness


def test_postgres_restart_while_50_clients_wait(pg_store_url: str, postgres: Any,
                                                workers: WorkerFactory, redis_server: Any,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="resultstore_backend.consumer")
    worker = workers.start(pg_store_url, pool="threads", concurrency=50)
    app, t = make_app(pg_store_url, broker=redis_server.url, queue=worker.queue)
    assert t.add.delay(1, 1).get(timeout=60) == 2  # listener and pools warm
    listener = app.backend.result_consumer.listener()
    assert listener is not None
    connects = listener.connects
    results = [t.sleep_then.delay(i, 3.0) for i in range(50)]
    assert _waits_across_restart(postgres, results) == list(range(50))
    _assert_pushed_again(t, listener, connects)
    assert worker.proc.poll() is None
    # one warning for the outage (not one per failed reconnect), naming the target only
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "resultstore_backend.consumer" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "LISTEN connection to 127.0.0.1:" in warnings[0], warnings
    assert postgres.password not in warnings[0], "the listener logged the password"


def test_threads_sharing_one_backend_all_wake(pg_store_url: str, workers: WorkerFactory,
                                               redis_server: Any) -> None:
    """result_backend_thread_safe: one backend (one consumer) for all threads of a web app."""
    worker = workers.start(pg_store_url, pool="threads", concurrency=20)
    app, t = make_app(pg_store_url, broker=redis_server.url, queue=worker.queue,
                      result_backend_thread_safe=True)
    results = [t.sleep_then.delay(i, 0.5 + (i % 5) * 0.1) for i in range(20)]
    assert len({id(r.backend) for r in results}) == 1
    got = _wait_all([lambda r=r: r.get(timeout=60) for r in results])
    assert got == list(range(20))
    listener = app.backend.result_consumer.listener()
    assert listener is not None and listener.received > 0


def test_one_listen_session_for_many_apps_and_exiting_threads(
        pg_store_url: str, pg_database: Any) -> None:
    """Five apps on one store, four waiting threads each (one backend per app and thread):
    one LISTEN session for the process, and once the threads are gone the listener keeps
    no subscription, inbox or consumer of theirs."""
    import gc

    from resultstore_backend import consumer as consumer_mod

    apps = [make_app(pg_store_url)[0] for _ in range(5)]
    ids = [[str(uuid.uuid4()) for _ in range(4)] for _ in apps]
    consumers_before = len(consumer_mod._CONSUMERS)
    fns = [lambda a=a, i=i: a.AsyncResult(i).get(timeout=60)
           for a, group_ids in zip(apps, ids, strict=True) for i in group_ids]
    listener = apps[0].backend.result_consumer.listener()
    assert listener is not None and all(
        a.backend.result_consumer.listener() is listener for a in apps), \
        "apps of one store do not share the process's listener"
    channels = {channel_for(apps[0].backend._sql().channel_prefix, i)
                for group_ids in ids for i in group_ids}

    def store_when_all_listen() -> None:
        eventually(lambda: channels <= listener.listening or None, 30,
                   "all 20 waits LISTENing")
        sessions = _listen_sessions(pg_database)
        assert len(sessions) == 1, f"{len(sessions)} LISTEN sessions: {sessions}"
        for n, task_id in enumerate(i for group_ids in ids for i in group_ids):
            apps[0].backend.store_result(task_id, n, states.SUCCESS)
    errors: list[BaseException] = []
    storer = threading.Thread(target=_capture, args=(store_when_all_listen, errors),
                              daemon=True)
    storer.start()
    got = _wait_all(fns)
    storer.join(60)
    assert not errors, errors
    assert got == list(range(20))
    gc.collect()
    with listener._lock:
        subs, inbox = dict(listener._subs), dict(listener._inbox)
    assert not subs and not inbox, f"left after the waits: subs {subs}, inboxes {inbox}"
    alive = len(consumer_mod._CONSUMERS) - consumers_before
    assert alive <= len(apps), f"{alive} consumers alive: those of exited threads leak"


def _capture(fn: Any, errors: list[BaseException]) -> None:
    try:
        fn()
    except BaseException as exc:  # reported by the caller
        errors.append(exc)


def _rotate_while_waiting(workers: WorkerFactory, redis_server: Any, tmp_path: Path,
                          first: dict[str, str], second: dict[str, str]) -> int:
    """20 clients wait while the binding directory switches from ``first`` to ``second``
    (role A to role B); every wait is answered and the LISTEN session is replaced. Nothing
    terminates role A's sessions: the client itself must move its LISTEN session to role B
    (so the operator's drain can finish). Returns the new LISTEN session's pid."""
    kd = KubeletDir(tmp_path / "binding")
    kd.write(first)
    url = f"resultstore://{tmp_path / 'binding'}"
    worker = workers.start(url, pool="threads", concurrency=20, extra_env={"RS_RELOAD": "0.1"})
    app, t = make_app(url, broker=redis_server.url, queue=worker.queue,
                      resultstore_reload_interval=0.1)
    assert t.add.delay(1, 1).get(timeout=60) == 2
    listener = app.backend.result_consumer.listener()
    assert listener is not None
    old_pid = listener.backend_pid()
    results = [t.sleep_then.delay(i, 2.5) for i in range(20)]
    started = threading.Event()

    def rotate() -> None:
        started.wait(30)
        time.sleep(0.5)
        kd.write(second)

    def waiter(i: int) -> Any:
        started.set()
        return results[i].get(timeout=120)

    got = _wait_all_during(rotate, [lambda i=i: waiter(i) for i in range(20)], 60)
    assert got == list(range(20))
    assert t.add.delay(4, 4).get(timeout=60) == 8
    new_pid = listener.backend_pid()
    assert new_pid is not None and new_pid != old_pid, "the LISTEN session was not replaced"
    return new_pid


def test_credential_rotation_while_clients_wait(pg_database: Any, workers: WorkerFactory,
                                                redis_server: Any, tmp_path: Path) -> None:
    names = create_store(pg_database)
    role_a = create_role(pg_database, names)
    role_b = create_role(pg_database, names)
    new_pid = _rotate_while_waiting(
        workers, redis_server, tmp_path,
        render_binding(binding_for(pg_database, *role_a, application_name="rs-a")),
        render_binding(binding_for(pg_database, *role_b, application_name="rs-b")))
    sessions = _listen_sessions(pg_database)
    assert sessions.get(new_pid, ("?",))[0] == role_b[0], sessions
    assert all(user != role_a[0] for user, _ in sessions.values()), \
        f"a LISTEN session of the old role is still open: {sessions}"


def test_prefork_children_wait_inside_tasks(pg_store_url: str, pg_database: Any,
                                            workers: WorkerFactory, redis_server: Any) -> None:
    # two children wait at once (both busy, so two processes); the third runs the subtasks
    worker = workers.start(pg_store_url, pool="prefork", concurrency=3)
    app, t = make_app(pg_store_url, broker=redis_server.url, queue=worker.queue)
    p = define_push_tasks(app)
    outer = [p.wait_inside.delay(n) for n in (3, 5)]
    got = [r.get(timeout=120) for r in outer]
    assert len({out["pid"] for out in got}) == 2, got
    for n, out in zip((3, 5), got, strict=True):
        assert out["group"] == [2 * i for i in range(n)] and out["single"] == n + 1, out
        assert out["notified"] > 0, f"a child waited without notifications: {out}"
    child_listens = {out["pid"]: out["listen_pid"] for out in got}
    # each child has its own LISTEN session (nothing shared across fork)
    assert len(set(child_listens.values())) == len(child_listens), child_listens
    client = app.backend.result_consumer.listener()
    assert client is not None and client.backend_pid() not in child_listens.values()
    log = worker.log_text()
    assert "Traceback" not in log, log[-4000:]


def test_forked_child_opens_its_own_listen_session_and_leaves_the_parents(
        pg_store_url: str, pg_database: Any) -> None:
    """A process with an open LISTEN session forks (as a prefork pool or multiprocessing
    does after the parent waited): the child waits on a session of its own, and neither its
    waits nor its exit touch the parent's session, whose waits are still pushed."""
    import json
    import os

    app, _ = make_app(pg_store_url)
    backend = app.backend
    first = str(uuid.uuid4())
    threading.Timer(0.3, lambda: backend.store_result(first, 1, states.SUCCESS)).start()
    assert app.AsyncResult(first).get(timeout=30) == 1
    listener = backend.result_consumer.listener()
    assert listener is not None and listener.connected
    parent_session = listener.backend_pid()
    child_id = str(uuid.uuid4())
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it saw, never return into pytest
        code = 1
        try:
            os.close(read_end)
            threading.Timer(0.3, lambda: app.backend.store_result(
                child_id, "child", states.SUCCESS)).start()
            value = app.AsyncResult(child_id).get(timeout=30)
            own = app.backend.result_consumer.listener()
            report = {"value": value, "same_listener": own is listener,
                      "session": own.backend_pid() if own is not None else None,
                      "received": own.received if own is not None else 0}
            os.write(write_end, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        raw = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and raw, f"the child failed ({status})"
    child = json.loads(raw)
    assert child["value"] == "child" and not child["same_listener"], child
    assert child["session"] not in (None, parent_session), \
        f"the child used the parent's LISTEN session: {child}"
    assert child["received"] > 0, f"the child's wait was not pushed: {child}"
    # the parent's session survived the child's waits and exit, and still pushes
    assert listener.connected and listener.backend_pid() == parent_session
    before = listener.received
    later = str(uuid.uuid4())
    threading.Timer(0.3, lambda: backend.store_result(later, 2, states.SUCCESS)).start()
    assert app.AsyncResult(later).get(timeout=30) == 2
    assert listener.received > before and listener.backend_pid() == parent_session
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        alive = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                             (parent_session,)).fetchone()
    assert alive == (1,), "the parent's LISTEN session is gone"


def test_wait_for_a_result_stored_before_the_listen_began(
        pg_store_url: str, workers: WorkerFactory, redis_server: Any) -> None:
    worker = workers.start(pg_store_url, pool="threads", concurrency=2)
    app, t = make_app(pg_store_url, broker=redis_server.url, queue=worker.queue)
    # stored by the worker before this process ever LISTENed (no listener exists yet)
    r = t.add.delay(20, 22)
    other, _ = make_app(pg_store_url)
    deadline = time.monotonic() + 60
    while other.backend.get_task_meta(r.id, cache=False)["status"] != states.SUCCESS:
        assert time.monotonic() < deadline, "the worker never stored the result"
        time.sleep(0.05)
    from resultstore_backend.consumer import _LISTENERS
    assert app.backend.holder not in _LISTENERS
    fresh = app.AsyncResult(r.id)
    assert fresh.get(timeout=30) == 42
    # and a group whose members are all stored already
    g = group(t.add.s(i, i) for i in range(5)).apply_async()
    for child in g.results:
        while other.backend.get_task_meta(child.id, cache=False)["status"] != states.SUCCESS:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert app.GroupResult(g.id, [app.AsyncResult(c.id) for c in g.results]).join_native(
        timeout=30) == [0, 2, 4, 6, 8]


def test_listener_that_cannot_connect_falls_back_to_polling(
        pg_database: Any, pg_store_url: str, workers: WorkerFactory, redis_server: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    names = create_store(pg_database)
    role, password = create_role(pg_database, names)
    worker = workers.start(pg_store_url, pool="threads", concurrency=2)  # superuser: no limit
    client_url = "resultstore+" + pg_database.url(user=role, password=password) + "?schema=rs"
    app, t = make_app(client_url, broker=redis_server.url, queue=worker.queue)
    backend = app.backend
    backend.get_task_meta("warm-the-pool", cache=False)  # the one pooled session
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT 1").format(sql.Identifier(role)))
    caplog.set_level(logging.WARNING, logger="resultstore_backend.consumer")
    assert [t.add.delay(i, 1).get(timeout=60) for i in range(3)] == [1, 2, 3]
    g = group(t.add.s(i, 10) for i in range(4)).apply_async()
    assert g.get(timeout=60) == [10, 11, 12, 13]
    listener = backend.result_consumer.listener()
    assert listener is not None and not listener.connected
    warnings = [r for r in caplog.records if "LISTEN connection" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    text = warnings[0].getMessage()
    assert "cannot open the LISTEN connection" in text and role in text, text
    assert str(pg_database.server.port) in text and pg_database.name in text, text
    assert password not in text and "polling" in text, text


# ----------------------------------------------------------------------------- bad input / off


def test_foreign_notifications_on_our_channel_are_ignored(
        pg_store_url: str, pg_database: Any) -> None:
    app, _ = make_app(pg_store_url)
    backend = app.backend
    task_id = str(uuid.uuid4())
    channel = channel_for(backend._sql().channel_prefix, task_id)
    result = app.AsyncResult(task_id)
    out: list[Any] = []
    waiter = threading.Thread(target=lambda: out.append(result.get(timeout=60)), daemon=True)
    waiter.start()
    listener = backend.result_consumer.listener()
    assert listener is not None
    deadline = time.monotonic() + 30
    while channel not in listener.listening:
        assert time.monotonic() < deadline, "the wait never LISTENed on the id's channel"
        time.sleep(0.02)
    ignored, received = listener.ignored, listener.received
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        for payload in ("hello", '{"task_id": "x"}', "rs9|SUCCESS|" + task_id,
                        f"rs1|SUCCESS|{uuid.uuid4()}"):
            conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        # well-formed and for our id, but nothing is stored: a read, and the wait goes on
        conn.execute("SELECT pg_notify(%s, %s)", (channel, f"rs1|SUCCESS|{task_id}"))
    deadline = time.monotonic() + 30
    while listener.ignored < ignored + 4 or listener.received < received + 1:
        assert time.monotonic() < deadline, \
            f"payloads not seen (ignored {listener.ignored}, received {listener.received})"
        time.sleep(0.02)
    time.sleep(0.2)  # let the woken waiter read the (absent) row
    assert not out, f"the wait returned on a foreign notification: {out}"
    backend.store_result(task_id, {"real": True}, states.SUCCESS)
    waiter.join(60)
    assert out == [{"real": True}]


def test_corrupt_row_notified_to_a_waiting_consumer_reaches_only_its_wait(
        pg_store_url: str, pg_database: Any) -> None:
    """A pending id whose row cannot be decoded, notified while another id is waited for:
    the other wait returns its result, the listener stays connected, and the wait for the
    corrupt id raises CorruptRowError."""
    from resultstore_backend.backend import CorruptRowError

    app, _ = make_app(pg_store_url)
    backend = app.backend
    bad_id, good_id = str(uuid.uuid4()), str(uuid.uuid4())
    backend.store_result(bad_id, 1, states.SUCCESS)
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        conn.execute("UPDATE rs.celery_taskmeta SET result = '\\x00ff'::bytea "
                     "WHERE task_id = %s", (bad_id,))
    bad = app.AsyncResult(bad_id)
    backend.add_pending_result(bad)  # pending in this backend: LISTENed during its waits
    listener = backend.result_consumer.listener()
    assert listener is not None
    bad_channel = channel_for(backend._sql().channel_prefix, bad_id)
    errors: list[BaseException] = []

    def notify_bad_then_store_good() -> None:
        try:
            eventually(lambda: bad_channel in listener.listening or None, 30,
                       "the pending corrupt id's channel LISTENed during the other wait")
            received = listener.received
            with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
                conn.execute("SELECT pg_notify(%s, %s)", (bad_channel, f"rs1|SUCCESS|{bad_id}"))
            eventually(lambda: listener.received > received or None, 30,
                       "the notification of the corrupt id")
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            app.backend.store_result(good_id, {"ok": True}, states.SUCCESS)  # this thread's
    helper = threading.Thread(target=notify_bad_then_store_good, daemon=True)
    helper.start()
    try:
        # the same backend (this thread's) waits for good_id with bad_id pending
        assert app.AsyncResult(good_id).get(timeout=60) == {"ok": True}
    finally:
        helper.join(60)
    assert not errors, errors
    assert listener.connected
    with pytest.raises(CorruptRowError, match=f"task {bad_id} .* column 'result'"):
        bad.get(timeout=30)


def test_notifications_off_store_answers_every_wait_by_polling(
        pg_database: Any, workers: WorkerFactory, redis_server: Any) -> None:
    url = "resultstore+" + pg_database.url() + "?schema=rs&notify=false"
    worker = workers.start(url, pool="threads", concurrency=4)
    app, t = make_app(url, broker=redis_server.url, queue=worker.queue)
    backend = app.backend
    assert not backend.notifications and backend.result_consumer.listener() is None
    probe_id = str(uuid.uuid4())
    # a listener on the shard, presence lock held: a notifying store would NOTIFY
    with _shard_probe(pg_database, backend, probe_id) as (probe, _):
        assert t.add.apply_async((2, 2), task_id=probe_id).get(timeout=60) == 4
        assert _nothing_notified(probe), "a notifications-off store notified"
    assert [t.add.delay(i, i).get(timeout=60) for i in range(5)] == [0, 2, 4, 6, 8]
    assert group(t.add.s(i, 1) for i in range(8)).apply_async().get(timeout=60) == \
        [i + 1 for i in range(8)]
    assert chord(t.add.s(i, i) for i in range(4))(t.tsum.s()).get(timeout=60) == 12
    assert _listen_sessions(pg_database) == {}, "a notifications-off client LISTENed"


def test_app_setting_turns_notifications_off(pg_store_url: str) -> None:
    app, _ = make_app(pg_store_url, resultstore_notify=False)
    assert not app.backend.notifications
    task_id = secrets.token_hex(8)
    app.backend.store_result(task_id, 5, states.SUCCESS)
    assert app.AsyncResult(task_id).get(timeout=10) == 5
