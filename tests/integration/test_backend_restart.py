"""PostgreSQL restarted mid-run: no result the worker stored is lost and the worker
recovers by itself (engine invalidation + bounded retries)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.integration.conftest import WorkerFactory, make_app

pytestmark = pytest.mark.integration


def test_postgres_restart_mid_run(pg_store_url: str, postgres: Any, workers: WorkerFactory,
                                  redis_server: Any) -> None:
    worker = workers.start(pg_store_url, pool="prefork", concurrency=2)
    app, t = make_app(pg_store_url, broker=redis_server.url, queue=worker.queue)
    assert t.add.delay(1, 1).get(timeout=60) == 2  # warm pools everywhere
    results = [t.sleep_then.delay(i, 0.02) for i in range(150)]
    time.sleep(1.0)
    postgres.restart()
    for i, r in enumerate(results):
        assert r.get(timeout=120) == i
    # the worker keeps working without a restart of its own
    assert t.add.delay(20, 22).get(timeout=60) == 42
    log = worker.log_text()
    assert "BackendStoreError" not in log, log[-4000:]
    assert worker.proc.poll() is None
    print("retries logged:", log.count("Failed operation"))
