"""Shortcuts on the store/get hot path keep Celery's observable behaviour.

SQLite-backed (no services): what is proved here is behaviour, not speed.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from celery import Celery, states


def _app(tmp_path: Path, **conf: object) -> Celery:
    app = Celery("hotpath", backend=f"resultstore+sqlite:///{tmp_path}/h.db",
                 set_as_current=False)
    app.conf.update(result_serializer="json", accept_content=["json"], **conf)
    return app


def test_eager_mode_warning_still_raised_on_reads(tmp_path: Path) -> None:
    app = _app(tmp_path, task_always_eager=True)
    backend = app.backend
    backend.store_result("e1", {"v": 1}, states.SUCCESS)
    for _ in range(2):  # the setting is read once; the warning is given on every read
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            meta = backend.get_task_meta("e1", cache=False)
        assert meta["result"] == {"v": 1}
        assert any(issubclass(w.category, RuntimeWarning) and "task_always_eager" in
                   str(w.message) for w in seen), f"no eager warning: {seen!r}"


def test_no_eager_warning_when_results_are_stored(tmp_path: Path) -> None:
    for conf in ({}, {"task_always_eager": True, "task_store_eager_result": True}):
        app = _app(tmp_path, **conf)
        backend = app.backend
        backend.store_result("e2", 2, states.SUCCESS)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert backend.get_task_meta("e2", cache=False)["result"] == 2
        eager = [w for w in seen if "task_always_eager" in str(w.message)]
        assert eager == [], f"unexpected eager warning with {conf}: {eager!r}"


# --------------------------------------------------------------------------- json identity

IDENTITY_VALUES: list[object] = [
    None, True, 0, -1, 2**80, 1.5, -0.0, float("inf"), "", "ünïcödé \ud800",
    [], {}, [1, "a", None, [2.5, [True]]], {"a": 1, "b": [1, {"c": "d"}]},
    {"value": 42, "label": "benchmark result", "items": [1, 2, 3]},
]

NOT_IDENTITY_VALUES: list[object] = [
    (1, 2), [1, (2,)], {1: "int key"}, {"a": {None: 1}}, {"__type__": "datetime",
                                                          "__value__": "2020-01-01"},
    {"x": {"__type__": "bytes", "__value__": "q"}}, b"bytes", {"s": {1, 2}},
    type("S", (str,), {})("str subclass"), [list(range(300))],
]


def test_json_identity_answers_true_only_when_the_round_trip_is_the_identity() -> None:
    from kombu.utils.json import dumps, loads

    from resultstore_backend.backend import json_identity

    for value in IDENTITY_VALUES:
        assert json_identity(value), f"should skip the round trip: {value!r}"
        back = loads(dumps(value))
        assert repr(back) == repr(value), f"json changes {value!r} into {back!r}"
    for value in NOT_IDENTITY_VALUES:
        assert not json_identity(value), f"must round-trip: {value!r}"
    cyclic: list[object] = []
    cyclic.append(cyclic)
    assert not json_identity(cyclic), "a cycle must go to the (failing) round trip"


def test_stored_results_read_back_as_the_json_round_trip_gives_them(tmp_path: Path) -> None:
    from kombu.utils.json import dumps, loads

    app = _app(tmp_path)
    backend = app.backend
    for i, value in enumerate(IDENTITY_VALUES + NOT_IDENTITY_VALUES[:3]):
        task_id = f"j{i}"
        backend.store_result(task_id, value, states.SUCCESS)
        got = backend.get_task_meta(task_id, cache=False)["result"]
        expected = loads(dumps(value))
        assert repr(got) == repr(expected), f"{value!r} read back as {got!r}"


def test_joining_ready_results_does_not_yield_the_cpu_per_result(
        tmp_path: Path, monkeypatch: Any) -> None:
    import celery.backends.asynchronous as celery_async
    from celery.result import GroupResult

    app = _app(tmp_path)
    backend = app.backend
    ids = [f"r{i}" for i in range(20)]
    for i, task_id in enumerate(ids):
        backend.store_result(task_id, i, states.SUCCESS)
    yields: list[float] = []
    real_sleep = celery_async.sleep

    def counting_sleep(seconds: float) -> None:
        if seconds == 0:
            yields.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(celery_async, "sleep", counting_sleep)
    group = GroupResult("g-hot", [app.AsyncResult(i) for i in ids], app=app)
    assert group.get(timeout=30) == list(range(20))
    assert len(yields) < len(ids), f"{len(yields)} sleep(0) calls for {len(ids)} results"
    # a state seen before anyone waits is buffered, as Celery's own consumer does
    backend.result_consumer.on_state_change(
        {"task_id": "early", "status": states.SUCCESS, "result": 5}, None)
    assert backend._pending_messages.take("early")["result"] == 5
