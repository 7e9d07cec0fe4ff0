"""Celery app used by the backend's integration tests (configured from the environment).

RS_BROKER, RS_BACKEND: broker and result backend URLs; RS_QUEUE: a queue private
to one test; RS_EXTENDED=1: result_extended; RS_RELOAD: reload interval (s);
RS_REDIS: Redis URL where tasks record side effects (run counters).
Test clients build their own app and call :func:`define_tasks` on it, so both
sides agree on task names without sharing configuration.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace
from typing import Any

import redis
from celery import Celery


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
