"""Differential test: the same Celery canvas on the Redis result backend and on resultstore.

Every scenario of tests/integration/canvas.py runs with a live worker per result backend
(Redis, ``resultstore+postgresql+psycopg://`` and ``resultstore+sqlite://``; one Redis
broker, one queue each) and the caller's observation of each resultstore variant must
equal Redis's. Redis is the reference because it is what most Celery users run: a user
switching backends must not see a different Celery. A difference fails with a diff
naming the scenario and the backend.

Workers are started once for the module (threads pool, enough threads that tasks joining
other tasks cannot starve the pool); each scenario gets fresh client apps.
"""

from __future__ import annotations

import difflib
import pprint
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from tests.integration.apps.tasks import define_differential_tasks
from tests.integration.canvas import SCENARIOS, Ctx, new_tag
from tests.integration.conftest import Worker, WorkerFactory, make_app

pytestmark = pytest.mark.integration

REFERENCE = "redis"
VARIANTS = ("postgresql", "sqlite")
REDIS_RESULT_DB = 7  # the Redis result backend's own db (the broker uses db 0)
CONCURRENCY = 10


@dataclass
class Side:
    name: str
    backend: str
    worker: Worker

    @property
    def worker_name(self) -> str:
        return f"{self.worker.queue}@{socket.gethostname()}"


@pytest.fixture(scope="module")
def sides(postgres: Any, redis_server: Any) -> Iterator[dict[str, Side]]:
    """One live worker per result backend, all on the same Redis broker."""
    tmp = Path(tempfile.mkdtemp(prefix="rs-differential-"))
    database = "diff_" + secrets.token_hex(6)
    postgres.start()
    postgres.create_database(database)
    factory = WorkerFactory(redis_server.url, tmp)
    backends = {
        "redis": f"redis://127.0.0.1:{redis_server.port}/{REDIS_RESULT_DB}",
        "postgresql": "resultstore+" + postgres.url(database) + "?schema=rs",
        "sqlite": f"resultstore+sqlite:///{tmp}/results.db",
    }
    try:
        out = {}
        for name, backend in backends.items():
            worker = factory.start(backend, pool="threads", concurrency=CONCURRENCY,
                                   queue=f"diff_{name}_{secrets.token_hex(3)}",
                                   extra_env={"RS_EXTENDED": "1"})
            out[name] = Side(name, backend, worker)
        yield out
    finally:
        factory.stop_all()
        if postgres.running():
            postgres.drop_database(database)
        broker = redis.Redis.from_url(redis_server.url)
        keys = list(broker.scan_iter("diff:*"))
        if keys:
            broker.delete(*keys)
        redis.Redis(port=redis_server.port, host="127.0.0.1", db=REDIS_RESULT_DB).flushdb()
        shutil.rmtree(tmp, ignore_errors=True)


def _observe(side: Side, scenario: str, broker_url: str) -> Any:
    app, t = make_app(side.backend, broker=broker_url, queue=side.worker.queue,
                      result_extended=True)
    tasks = SimpleNamespace(**vars(t), **vars(define_differential_tasks(app)))
    ctx = Ctx(app=app, t=tasks, tag=new_tag(),
              queue=side.worker.queue, worker_name=side.worker_name,
              redis=redis.Redis.from_url(broker_url))
    try:
        return SCENARIOS[scenario](ctx)
    except Exception as exc:
        raise AssertionError(
            f"scenario {scenario!r} could not be observed on the {side.name} backend: "
            f"{exc!r}\nworker log tail:\n{side.worker.log_text()[-3000:]}") from exc
    finally:
        app.close()


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_same_observation_as_redis(scenario: str, sides: dict[str, Side],
                                   redis_server: Any) -> None:
    expected = pprint.pformat(_observe(sides[REFERENCE], scenario, redis_server.url),
                              width=100)
    failures = []
    for name in VARIANTS:
        got = pprint.pformat(_observe(sides[name], scenario, redis_server.url), width=100)
        if got != expected:
            diff = "\n".join(difflib.unified_diff(
                expected.splitlines(), got.splitlines(), "redis", name, lineterm=""))
            failures.append(f"--- scenario {scenario!r}: {name} differs from redis:\n{diff}")
    assert not failures, "\n".join(failures)


def test_workers_logged_no_backend_errors(sides: dict[str, Side]) -> None:
    """After all scenarios: no store error or crash in any worker (runs last in the module)."""
    for side in sides.values():
        log = side.worker.log_text()
        for marker in ("BackendStoreError", "Failed operation", "Unrecoverable error",
                       "OperationalError"):
            assert marker not in log, f"{side.name} worker logged {marker}:\n{log[-4000:]}"
