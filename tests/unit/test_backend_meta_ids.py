"""``group_id`` / ``parent_id`` in the task meta, exactly as Celery's key-value backends.

Celery's ``Backend._get_result_meta`` (what the Redis backend stores) puts ``group_id``
and ``parent_id`` in the meta whenever the request has them, whether or not
``result_extended`` is on, and omits the keys otherwise. These tests take that function as
the reference for each request shape and check that what this backend reads back carries
the same keys with the same values (embedded SQLite; PostgreSQL is covered by the
differential and migration integration tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from celery import Celery, states
from celery.app.task import Context

from resultstore_backend.engine import reset_registry

IDS = ("group_id", "parent_id")

#: request shapes: none, one id, the other, both, empty strings (falsy: omitted)
REQUESTS: dict[str, Any] = {
    "no request": None,
    "plain": Context(id="r-plain", task="rs.x", args=[], kwargs={}),
    "group": Context(id="r-group", group="g-1", task="rs.x", args=[], kwargs={}),
    "parent": Context(id="r-parent", parent_id="p-1", task="rs.x", args=[], kwargs={}),
    "both": Context(id="r-both", group="g-2", parent_id="p-2", task="rs.x", args=[1],
                    kwargs={"k": 1}),
    "empty": Context(id="r-empty", group="", parent_id="", task="rs.x", args=[], kwargs={}),
}


def _app(tmp_path: Path, extended: bool) -> Celery:
    reset_registry()
    app = Celery("u", backend=f"resultstore+sqlite:///{tmp_path}/ids.db", set_as_current=False)
    app.conf.result_extended = extended
    return app


def _ids(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta[k] for k in IDS if k in meta}


@pytest.mark.parametrize("extended", [False, True], ids=["plain", "extended"])
@pytest.mark.parametrize("state", [states.SUCCESS, states.STARTED, states.FAILURE])
def test_ids_in_meta_exactly_as_celery_builds_them(tmp_path: Path, extended: bool,
                                                   state: str) -> None:
    app = _app(tmp_path, extended)
    b = app.backend
    value: Any = ValueError("x") if state == states.FAILURE else {"v": 1}
    for label, request in REQUESTS.items():
        task_id = f"t-{label}-{state}"
        b.store_result(task_id, value, state, request=request)
        expected = _ids(b._get_result_meta(value, state, None, request))
        got = b.get_task_meta(task_id, cache=False)
        assert _ids(got) == expected, (label, got)
        # every read path: the woken waiter's many-row read, the native join, mget
        (row,) = b._fetch_metas([task_id])
        assert _ids(b._meta_from_row(task_id, row[1:])) == expected, label
        if state in states.READY_STATES:
            joined = dict(b.get_many([task_id], timeout=5))
            assert _ids(joined[task_id]) == expected, label
        (raw,) = b.mget([b.get_key_for_task(task_id)])
        assert _ids(b.decode(raw)) == expected, label


def test_ids_follow_the_last_store(tmp_path: Path) -> None:
    """A store replaces the whole meta (as Redis SETs it): a later store without the
    request's ids (e.g. a REVOKED stored at revoke time) leaves none behind."""
    b = _app(tmp_path, False).backend
    b.store_result("t", None, states.STARTED, request=REQUESTS["both"])
    assert _ids(b.get_task_meta("t", cache=False)) == {"group_id": "g-2", "parent_id": "p-2"}
    b.store_result("t", None, states.REVOKED)
    assert _ids(b.get_task_meta("t", cache=False)) == {}


def test_key_value_api_keeps_ids(tmp_path: Path) -> None:
    """``set`` of an encoded meta (what a key-value client writes) stores the ids too."""
    b = _app(tmp_path, False).backend
    meta = {"status": states.SUCCESS, "result": 3, "traceback": None, "children": [],
            "date_done": None, "group_id": "g-kv", "parent_id": "p-kv", "task_id": "kv"}
    b.set(b.get_key_for_task("kv"), b.encode(meta))
    got = b.decode(b.get(b.get_key_for_task("kv")))
    assert _ids(got) == {"group_id": "g-kv", "parent_id": "p-kv"}, got
    del meta["group_id"], meta["parent_id"]
    b.set(b.get_key_for_task("kv2"), b.encode(meta | {"task_id": "kv2"}))
    assert _ids(b.get_task_meta("kv2", cache=False)) == {}


def test_version_1_sqlite_store_without_migration(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A store not migrated to version 2 (resultstore_create_tables off): stores and reads
    work without the id columns, as with the previous release, after one warning."""
    import sqlite3

    _app(tmp_path, False).backend.store_result("warm", 1, states.SUCCESS)  # migrates
    with sqlite3.connect(tmp_path / "ids.db") as conn:
        for column in ("group_id", "parent_id"):
            conn.execute(f"ALTER TABLE celery_taskmeta DROP COLUMN {column}")
        conn.execute("DELETE FROM resultstore_schema_version WHERE version > 1")
    reset_registry()
    app = Celery("u", backend=f"resultstore+sqlite:///{tmp_path}/ids.db", set_as_current=False)
    app.conf.resultstore_create_tables = False
    caplog.set_level("WARNING", logger="resultstore_backend.backend")
    b = app.backend
    b.store_result("v1", 5, states.SUCCESS, request=REQUESTS["both"])
    meta = b.get_task_meta("v1", cache=False)
    assert meta["result"] == 5 and _ids(meta) == {}, meta
    assert dict(b.get_many(["v1", "warm"], timeout=5))["warm"]["result"] == 1
    warnings = [r.getMessage() for r in caplog.records if "schema version 1" in r.getMessage()]
    assert len(warnings) == 1 and "celery_taskmeta" in warnings[0], warnings
