"""Celery app used by the backend's integration tests (configured from the environment).

RS_BROKER, RS_BACKEND: broker and result backend URLs; RS_QUEUE: a queue private
to one test; RS_EXTENDED=1: result_extended; RS_RELOAD: reload interval (s);
RS_REDIS: Redis URL where tasks record side effects (run counters).
Test clients build their own app and call :func:`define_tasks` on it, so both
sides agree on task names without sharing configuration.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, date, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any, NamedTuple
from uuid import UUID

import redis
from celery import Celery, Task, group
from celery.result import allow_join_result


def _r() -> redis.Redis:
    return redis.Redis.from_url(os.environ["RS_REDIS"])


def define_tasks(app: Celery) -> SimpleNamespace:
    @app.task(shared=False, name="rs.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(shared=False, name="rs.tsum")
    def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(shared=False, name="rs.fail")
    def fail(message: str) -> None:
        raise ValueError(message)

    @app.task(shared=False, name="rs.sleep_then")
    def sleep_then(value: Any, seconds: float) -> Any:
        time.sleep(seconds)
        return value

    @app.task(shared=False, name="rs.record_run", bind=True)
    def record_run(self: Any, tag: str) -> str:
        """Count executions under ``tag`` in Redis and return a per-run value."""
        n = _r().incr(f"runs:{tag}")
        return f"run-{n}"

    @app.task(shared=False, name="rs.record_callback")
    def record_callback(values: list[Any], tag: str) -> list[Any]:
        _r().incr(f"callback:{tag}")
        return values

    @app.task(shared=False, name="rs.whoami")
    def whoami() -> dict[str, Any]:
        return {"pid": os.getpid()}

    return SimpleNamespace(add=add, tsum=tsum, fail=fail, sleep_then=sleep_then,
                           record_run=record_run, record_callback=record_callback,
                           whoami=whoami)


# ----------------------------------------------------------------------------- differential
# Tasks of tests/integration/test_differential.py (the same canvas on every result backend).


class Point(NamedTuple):
    x: int
    y: int


class CustomError(Exception):
    """A user-defined exception with several arguments (reconstructed by the caller)."""


def _record(tag: str, entry: dict[str, Any]) -> None:
    _r().rpush(f"diff:{tag}", json.dumps(entry, sort_keys=True))


class _MarksStored(Task):
    """Signals in Redis once the result is stored (after_return runs after the store)."""

    def after_return(self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any,
                     einfo: Any) -> None:
        _r().incr(f"diff:stored:{args[0]}")


def define_differential_tasks(app: Celery) -> SimpleNamespace:
    """Register the differential test's tasks on ``app``, one group of concerns at a time."""
    return SimpleNamespace(**_value_tasks(app), **_failure_tasks(app), **_flow_tasks(app),
                           **_errback_tasks(app))


def _value_tasks(app: Celery) -> dict[str, Any]:
    """Tasks returning values of every shape the serialisers must carry (or refuse)."""
    @app.task(shared=False, name="rs.d.echo")
    def echo(value: Any) -> Any:
        return value

    @app.task(shared=False, name="rs.d.shapes")
    def shapes() -> Any:
        return {
            "tuple": (1, 2, (3, 4)),
            "namedtuple": Point(5, 6),
            "list_of_tuples": [(7, 8)],
            "int_keys": {1: "one", 2: "two"},
            "nested": {"a": {"b": [None, True, 1.5, "s"]}},
            "datetime": datetime(2026, 12, 1, 12, 30, 15, 123456, tzinfo=UTC),
            "naive_datetime": datetime(2026, 12, 1, 12, 30, 15),
            "date": date(2026, 12, 1),
            "decimal": Decimal("1.10"),
            "uuid": UUID("12345678-1234-5678-1234-567812345678"),
            "bytes": b"raw\x00bytes",
            "big_int": 2 ** 70,
        }

    @app.task(shared=False, name="rs.d.point")
    def point() -> Any:
        return Point(1, 2)

    @app.task(shared=False, name="rs.d.a_tuple")
    def a_tuple() -> Any:
        return (1, "two", (3,))

    @app.task(shared=False, name="rs.d.a_datetime")
    def a_datetime() -> Any:
        return datetime(2026, 12, 1, 23, 59, 59, 999999, tzinfo=UTC)

    @app.task(shared=False, name="rs.d.a_set")
    def a_set() -> Any:
        return {1, 2, 3}

    @app.task(shared=False, name="rs.d.an_object")
    def an_object() -> Any:
        return object()

    @app.task(shared=False, name="rs.d.unicode")
    def unicode() -> Any:
        return {"héllo": "wörld ✓ 日本語 🎉", "emoji🎉": ["ÄÖÜ", "\u0000nul", "∑"]}

    @app.task(shared=False, name="rs.d.big")
    def big(size: int) -> str:
        block = "0123456789abcdef"
        return (block * (size // len(block) + 1))[:size]

    return {"echo": echo, "shapes": shapes, "point": point, "a_tuple": a_tuple,
            "a_datetime": a_datetime, "a_set": a_set, "an_object": an_object,
            "unicode": unicode, "big": big}


def _failure_tasks(app: Celery) -> dict[str, Any]:
    """Tasks that fail, retry or return an exception."""
    @app.task(shared=False, name="rs.d.fail_after")
    def fail_after(message: str, seconds: float) -> None:
        time.sleep(seconds)
        raise ValueError(message)

    @app.task(shared=False, name="rs.d.raise_custom")
    def raise_custom(*args: Any) -> None:
        raise CustomError(*args)

    @app.task(shared=False, name="rs.d.raise_multi")
    def raise_multi() -> None:
        raise KeyError("missing", 2, [3, "four"])

    @app.task(shared=False, name="rs.d.retry_then", bind=True, max_retries=5)
    def retry_then(self: Any, tag: str, times: int) -> dict[str, int]:
        n = int(_r().incr(f"diff:runs:{tag}"))
        if n <= times:
            raise self.retry(countdown=0)
        return {"runs": n, "retries": self.request.retries}

    @app.task(shared=False, name="rs.d.retry_exhaust", bind=True, max_retries=2)
    def retry_exhaust(self: Any, tag: str, with_exc: bool) -> None:
        _r().incr(f"diff:runs:{tag}")
        if with_exc:
            raise self.retry(exc=ValueError("gave up", 3), countdown=0)
        raise self.retry(countdown=0)

    @app.task(shared=False, name="rs.d.raise_unserializable")
    def raise_unserializable() -> None:
        class LocalError(Exception):
            """Not importable by the caller (defined inside the task)."""
        raise LocalError({1, 2}, object(), "kept")

    @app.task(shared=False, name="rs.d.return_exception")
    def return_exception() -> Any:
        return ValueError("returned, not raised")

    return {"fail_after": fail_after, "raise_custom": raise_custom,
            "raise_multi": raise_multi, "retry_then": retry_then,
            "retry_exhaust": retry_exhaust, "raise_unserializable": raise_unserializable,
            "return_exception": return_exception}


def _flow_tasks(app: Celery) -> dict[str, Any]:
    """Tasks the test synchronises with: stored marks, gates, joins and groups inside tasks."""
    @app.task(shared=False, name="rs.d.stored", base=_MarksStored)
    def stored(tag: str, value: Any) -> Any:
        return value

    @app.task(shared=False, name="rs.d.stored_fail", base=_MarksStored)
    def stored_fail(tag: str, message: str) -> None:
        raise ValueError(message)

    @app.task(shared=False, name="rs.d.mark")
    def mark(tag: str) -> str:
        _r().incr(f"diff:mark:{tag}")
        return tag

    @app.task(shared=False, name="rs.d.join_inside")
    def join_inside(x: int) -> int:
        with allow_join_result():
            return int(app.tasks["rs.add"].delay(x, x).get(timeout=30))

    @app.task(shared=False, name="rs.d.gated", bind=True, track_started=True)
    def gated(self: Any, tag: str) -> str:
        """Reports PROGRESS, then waits until the test opens ``diff:gate:<tag>``."""
        self.update_state(state="PROGRESS", meta={"step": 1, "pair": (1, 2)})
        if _r().blpop(f"diff:gate:{tag}", timeout=60) is None:
            raise TimeoutError(f"gate {tag} never opened")
        return "opened"

    @app.task(shared=False, name="rs.d.started", bind=True, track_started=True)
    def started(self: Any, tag: str) -> str:
        """Runs (state STARTED, as track_started stores it) until the gate opens."""
        if _r().blpop(f"diff:gate:{tag}", timeout=60) is None:
            raise TimeoutError(f"gate {tag} never opened")
        return "opened"

    @app.task(shared=False, name="rs.d.spawn")
    def spawn(n: int) -> Any:
        """Starts a group from inside a task: the group becomes this task's child."""
        return group(app.tasks["rs.add"].s(i, i) for i in range(n)).delay()

    return {"stored": stored, "stored_fail": stored_fail, "mark": mark,
            "join_inside": join_inside, "gated": gated, "started": started, "spawn": spawn}


def _errback_tasks(app: Celery) -> dict[str, Any]:
    """Error callbacks in the three signatures Celery accepts."""
    @app.task(shared=False, name="rs.d.errback_new")
    def errback_new(request: Any, exc: BaseException, traceback: Any, tag: str) -> None:
        _record(tag, {"style": "new", "request_id": request.id, "exc_type": type(exc).__name__,
                      "exc_args": [repr(a) for a in exc.args],
                      "traceback": isinstance(traceback, str) or traceback is not None})

    @app.task(shared=False, name="rs.d.errback_old")
    def errback_old(task_id: str, tag: str) -> None:
        _record(tag, {"style": "old", "task_id": task_id})

    @app.task(shared=False, name="rs.d.errback_immutable")
    def errback_immutable(tag: str) -> None:
        _record(tag, {"style": "immutable"})
    return {"errback_new": errback_new, "errback_old": errback_old,
            "errback_immutable": errback_immutable}


# ----------------------------------------------------------------------------- push waits
# Tasks of tests/integration/test_backend_push.py.


def define_push_tasks(app: Celery) -> SimpleNamespace:
    @app.task(shared=False, name="rs.p.progress", bind=True)
    def progress(self: Any, steps: int, pause: float) -> str:
        """Report PROGRESS ``steps`` times (what ``on_message`` callbacks watch)."""
        for i in range(steps):
            self.update_state(state="PROGRESS", meta={"i": i})
            time.sleep(pause)
        return "done"

    @app.task(shared=False, name="rs.p.wait_inside")
    def wait_inside(n: int) -> dict[str, Any]:
        """Wait for a group and a task from inside a task (prefork child, allow_join_result)."""
        from celery import group

        # the subtasks take a moment, so they finish after this wait began LISTENing
        slow = app.tasks["rs.sleep_then"]
        with allow_join_result():
            values = group(slow.s(2 * i, 0.3) for i in range(n)).apply_async().get(timeout=60)
            single = slow.delay(n + 1, 0.3).get(timeout=60)
        consumer = app.backend.result_consumer
        listener = consumer.listener() if consumer.push else None
        return {"group": values, "single": single, "pid": os.getpid(),
                "notified": listener.received if listener is not None else 0,
                "listen_pid": listener.backend_pid() if listener is not None else None}

    return SimpleNamespace(progress=progress, wait_inside=wait_inside)


app = Celery("rs_tests", broker=os.environ.get("RS_BROKER", "memory://"),
             backend=os.environ.get("RS_BACKEND"))
app.conf.update(
    task_default_queue=os.environ.get("RS_QUEUE", "celery"),
    result_extended=os.environ.get("RS_EXTENDED") == "1",
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    resultstore_reload_interval=float(os.environ.get("RS_RELOAD", "1.0")),
)
tasks = define_tasks(app)
differential_tasks = define_differential_tasks(app)
push_tasks = define_push_tasks(app)
