"""The engine holder's cache of checked-out connections (the store/get hot path).

Each test proves one guarantee the pool gave before the cache existed: reuse without a pool
checkout, no starvation at the pool limit, the idle ping, invalidation on connection errors,
the pool's reset after an interrupted operation, and fork safety.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.pool import QueuePool

from resultstore_backend.config import StoreConfig, parse_backend_url
from resultstore_backend.engine import EngineHolder


def _holder(tmp_path: Path, idle_ping_after: float = 10.0) -> EngineHolder:
    source = parse_backend_url(f"sqlite:///{tmp_path}/cache.db")
    assert isinstance(source, StoreConfig)
    return EngineHolder(source, idle_ping_after=idle_ping_after)


def _count_checkouts(holder: EngineHolder) -> list[int]:
    seen: list[int] = []
    event.listen(holder.engine(), "checkout", lambda *a: seen.append(1))
    return seen


def test_consecutive_operations_reuse_one_connection_without_pool_checkout(
        tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    with holder.connection() as first:
        first.execute("SELECT 1")
    checkouts = _count_checkouts(holder)
    for _ in range(5):
        with holder.connection() as conn:
            assert conn is first, "a returned connection was not reused"
            conn.execute("SELECT 1")
    assert checkouts == [], f"{len(checkouts)} pool checkouts for cached connections"
    holder.dispose()


def test_waiter_at_pool_limit_gets_the_returned_connection(tmp_path: Path) -> None:
    # One connection in total; if the holder kept the returned one in its cache, the
    # waiting thread would fail with the pool's TimeoutError after pool_timeout.
    holder = _holder(tmp_path)
    engine = holder.engine()  # SQLite engines ignore pool limits in engine options: set them

    def connect() -> Any:
        return sqlite3.connect(f"{tmp_path}/cache.db", check_same_thread=False)

    engine.pool = QueuePool(connect, pool_size=1, max_overflow=0, timeout=3)
    holding = threading.Event()
    waiting = threading.Event()
    outcome: list[object] = []

    def second() -> None:
        waiting.set()
        try:
            with holder.connection() as conn:
                outcome.append(conn.execute("SELECT 2").fetchone()[0])
        except Exception as exc:  # reported by the assertion below
            outcome.append(exc)

    with holder.connection() as conn:
        conn.execute("SELECT 1")
        holding.set()
        thread = threading.Thread(target=second)
        thread.start()
        waiting.wait(10)
        # let the thread reach the pool's checkout (it counts itself as waiting first)
        for _ in range(2000):
            if holder._slot is not None and holder._slot.waiting:
                break
            threading.Event().wait(0.005)
        assert holder._slot is not None and holder._slot.waiting == 1, \
            "the second thread never waited for the pool"
    thread.join(30)
    assert not thread.is_alive(), "the second thread is still waiting for a connection"
    assert outcome == [2], f"waiting thread did not get the returned connection: {outcome!r}"
    holder.dispose()


def test_idle_cached_connection_is_pinged_and_replaced_when_dead(tmp_path: Path) -> None:
    holder = _holder(tmp_path, idle_ping_after=0.0)
    with holder.connection() as first:
        first.execute("SELECT 1")
    first.close()  # the cached connection dies while idle (server restart, idle timeout)
    with holder.connection() as conn:
        assert conn is not first, "a dead idle connection was handed out"
        assert conn.execute("SELECT 3").fetchone()[0] == 3
    holder.dispose()


def test_connection_error_drops_every_cached_connection(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    gate = threading.Barrier(2)
    cached: list[Any] = []

    def use() -> None:
        with holder.connection() as conn:
            cached.append(conn)
            gate.wait(10)

    threads = [threading.Thread(target=use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert holder._slot is not None and len(holder._slot.idle) == 2
    with pytest.raises(sa.exc.DisconnectionError):
        with holder.connection() as conn:
            raise sa.exc.DisconnectionError("socket gone")
    assert holder._slot is not None and holder._slot.idle == [], \
        "cached connections survived a connection error"
    with holder.connection() as conn:
        assert conn not in cached
        assert conn.execute("SELECT 4").fetchone()[0] == 4
    holder.dispose()


def test_interrupted_operation_returns_connection_to_the_pool(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    with holder.connection() as conn:
        conn.execute("SELECT 1")
    resets: list[int] = []
    event.listen(holder.engine(), "reset", lambda *a: resets.append(1))
    with pytest.raises(ValueError):
        with holder.connection() as conn:
            conn.execute("BEGIN")
            raise ValueError("operation failed mid-transaction")
    assert resets == [1], "the pool did not reset the interrupted connection"
    assert holder._slot is not None and holder._slot.idle == []
    with holder.connection() as again:
        assert not again.in_transaction, "a connection was reused mid-transaction"
    holder.dispose()


def test_fork_child_never_uses_the_parents_cached_connection(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    with holder.connection() as parent_conn:
        parent_conn.execute("SELECT 1")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            with holder.connection() as conn:
                ok = conn is not parent_conn and conn.execute("SELECT 1").fetchone()[0] == 1
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    answer = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert answer == b"1", "the forked child reused the parent's cached connection"
    with holder.connection() as conn:
        assert conn is parent_conn, "the parent lost its cached connection to the child"
        assert conn.execute("SELECT 5").fetchone()[0] == 5
    holder.dispose()
    assert isinstance(parent_conn, sqlite3.Connection)


def test_cursor_is_reused_with_its_connection_and_dropped_with_it(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    with holder.cursor() as first:
        assert first.execute("SELECT 6").fetchone()[0] == 6
    with holder.cursor() as again:
        assert again is first, "the cached connection's cursor was not reused"
        assert again.execute("SELECT 7").fetchone()[0] == 7
    with holder.connection() as conn:
        assert conn is first.connection, "cursor() and connection() lease different connections"
    with pytest.raises(sa.exc.DisconnectionError):
        with holder.cursor():
            raise sa.exc.DisconnectionError("socket gone")
    with holder.cursor() as fresh:
        assert fresh is not first, "a cursor of an invalidated connection was handed out"
        assert fresh.execute("SELECT 8").fetchone()[0] == 8
    holder.dispose()


def test_operation_racing_a_reload_uses_the_new_engine(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload that retires (and reaps) the slot an operation has just looked up, before
    the operation counts itself in: the operation must not open a connection of the old
    settings, which nothing would ever close (CI saw such a session outlive a reload)."""
    holder = _holder(tmp_path)
    with holder.connection() as conn:
        conn.execute("SELECT 1")
    stale = holder._current_slot()
    lookup = holder._current_slot

    def reload_right_after_lookup() -> Any:
        slot = lookup()
        with holder._lock:
            holder._swap_locked(slot.config)  # what another thread's reload does
        return slot

    monkeypatch.setattr(holder, "_current_slot", reload_right_after_lookup)
    with holder.connection() as conn:
        conn.execute("SELECT 1")
    monkeypatch.undo()
    pool = stale.engine.pool
    assert isinstance(pool, QueuePool)
    assert pool.checkedin() + pool.checkedout() == 0, (
        "the operation checked a connection out of the retired engine: it stays open "
        "there after the reload")
    assert holder._retiring == [], "the retired slot was not reaped"
    assert holder._current_slot() is not stale
    holder.dispose()
