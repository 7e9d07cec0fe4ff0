"""Backend internals without services (embedded SQLite)."""

from __future__ import annotations

import pickle
from collections import namedtuple
from datetime import UTC, datetime
from decimal import Decimal
from enum import IntEnum
from pathlib import Path
from uuid import uuid4

import pytest
from celery import Celery, states
from kombu.exceptions import EncodeError

from resultstore_backend.backend import ResultStoreBackend, _is_pickle
from resultstore_backend.engine import reset_registry
from resultstore_backend.schema import TableNames
from resultstore_backend.sql import statements


@pytest.fixture
def app(tmp_path: Path) -> Celery:
    reset_registry()
    return Celery("u", backend=f"resultstore+sqlite:///{tmp_path}/r.db", set_as_current=False)


class Color(IntEnum):
    RED = 1


class Custom:
    pass


def test_entry_point_and_class(app: Celery) -> None:
    assert isinstance(app.backend, ResultStoreBackend)
    assert app.backend.supports_native_join


def test_json_safe_pickle_round_trip(app: Celery) -> None:
    """With the json serializer a result reads back as kombu's JSON round trip gives it."""
    b = app.backend
    Point = namedtuple("Point", "x y")
    value = {"d": datetime.now(UTC), "u": uuid4(), "n": Decimal("1.5"),
             "e": Color.RED, "p": Point(1, 2), "t": (1, (2,)), "b": b"x", 7: "int key"}
    payload = b._dump_result(value)
    assert _is_pickle(payload)
    out = b._load_result(payload)
    assert out == b.decode(b.encode(value))
    assert out["e"] == 1 and type(out["e"]) is int
    assert out["p"] == [1, 2] and out["t"] == [1, [2]] and out["7"] == "int key"
    assert out["d"] == value["d"] and out["u"] == value["u"] and out["n"] == value["n"]
    assert out["b"] == b"x"
    with pytest.raises(EncodeError):
        b._dump_result(Custom())
    with pytest.raises(EncodeError):  # kombu's json has no sets: refused as Redis does
        b._dump_result({1, 2})
    evil = pickle.dumps(Custom())
    with pytest.raises(pickle.UnpicklingError):
        b._load_result(evil)


def test_pickle_accepted(tmp_path: Path) -> None:
    reset_registry()
    app = Celery("u", backend=f"resultstore+sqlite:///{tmp_path}/p.db", set_as_current=False)
    app.conf.update(result_serializer="pickle", accept_content=["pickle", "json"])
    b = app.backend
    b.store_result("t", Custom(), states.SUCCESS)
    assert isinstance(b.get_task_meta("t")["result"], Custom)


def test_store_rules_and_kv(app: Celery) -> None:
    b = app.backend
    b.store_result("t", None, states.STARTED)
    b.store_result("t", 5, states.SUCCESS)
    b.store_result("t", None, states.STARTED)
    b.store_result("t", 6, states.SUCCESS)
    assert b.get_task_meta("t", cache=False)["result"] == 5
    value = b.get("celery-task-meta-t")
    assert b.decode(value)["result"] == 5
    b.set("celery-task-meta-u", b.encode({"status": "SUCCESS", "result": [1],
                                          "date_done": "2024-01-01T00:00:00+00:00"}))
    assert b.get_task_meta("u")["result"] == [1]
    values = b.mget(["celery-task-meta-t", "celery-task-meta-u", "celery-task-meta-none"])
    assert [v is None for v in values] == [False, False, True]
    b.delete("celery-task-meta-u")
    assert b.get("celery-task-meta-u") is None
    assert not b.task_result_exists("u") and b.task_result_exists("t")
    with pytest.raises(KeyError):
        b.get("something-else")


def test_get_many_and_timeout(app: Celery) -> None:
    b = app.backend
    for i in range(3):
        b.store_result(f"m{i}", i, states.SUCCESS)
    got = dict(b.get_many([f"m{i}" for i in range(3)]))
    assert {k: v["result"] for k, v in got.items()} == {"m0": 0, "m1": 1, "m2": 2}
    with pytest.raises(b.TimeoutError):
        list(b.get_many(["never"], timeout=0.2, interval=0.05))


def test_statements_quote_identifiers() -> None:
    sql = statements("postgresql", TableNames("team_a", "tm", "gm"))
    assert 'INSERT INTO "team_a"."tm" AS t' in sql.upsert_task
    assert "nextval('\"team_a\".\"task_id_sequence\"')" in sql.upsert_task
    assert "ON CONFLICT (task_id) DO UPDATE" in sql.upsert_task
    assert "t.status <> 'SUCCESS'" in sql.upsert_task
    assert "= ANY(%s)" in sql.select_many_ready
    lite = statements("sqlite", TableNames())
    assert "?" in lite.upsert_task and "%s" not in lite.upsert_task


def test_corrupt_row_error_survives_pickling() -> None:
    """A task re-raising it with the pickle serializer ships it to the caller intact."""
    from resultstore_backend.backend import CorruptRowError

    exc = CorruptRowError("row of task t1 is corrupt", task_id="t1", table="rs.celery_taskmeta",
                          column="result")
    back = pickle.loads(pickle.dumps(exc))
    assert isinstance(back, CorruptRowError) and str(back) == str(exc)
    assert (back.task_id, back.table, back.column) == ("t1", "rs.celery_taskmeta", "result")
