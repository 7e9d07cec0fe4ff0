"""Spec updates: engine and retention changes rewrite the Secret and the CronJob in place,
Ready stays True, and a running Celery worker picks up the new pool settings by itself."""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from celery import Celery

from tests.e2e.operator_support import (
    CeleryWorker,
    OpEnv,
    SecretMirror,
    eventually,
    make_openv,
)


@pytest.fixture
def env(kube: Any, api_client: Any, namespace: str, postgres: Any,
        pg_database: Any) -> Iterator[OpEnv]:
    yield from make_openv(kube, api_client, namespace, postgres, pg_database)


class TaskLoop:
    """Send tasks and wait for each result; every failure is recorded."""

    def __init__(self, config_dir: Path, broker: str, queue: str) -> None:
        self.app = Celery("update-client", set_as_current=False)
        self.app.conf.update(broker_url=broker, result_backend=f"resultstore://{config_dir}",
                             task_serializer="json", result_serializer="json",
                             accept_content=["json"], resultstore_reload_interval=0.5)
        self.queue = queue
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                result = self.app.send_task("operator_e2e.mul", (i, 3), queue=self.queue)
                assert result.get(timeout=30) == i * 3
                self.ok += 1
            except Exception as exc:  # noqa: BLE001 - recorded and asserted
                self.failures.append(f"{type(exc).__name__}: {exc}")
            i += 1

    def __enter__(self) -> TaskLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def app_names(env: OpEnv, role: str) -> set[str]:
    rows = env.query("SELECT DISTINCT application_name FROM pg_stat_activity "
                     "WHERE usename = %s", (role,))
    return {r[0] for r in rows}


def sessions(env: OpEnv, role: str) -> list[str]:
    """The role's sessions, each with the local process that holds it (by client port)."""
    rows = env.query("SELECT application_name, client_port, state, backend_start, "
                     "left(query, 60) FROM pg_stat_activity WHERE usename = %s", (role,))
    owners = {c.laddr.port: c.pid for c in psutil.net_connections("tcp") if c.laddr}
    return [f"{name} port {port} pid {owners.get(port)} {state} since {start:%H:%M:%S.%f} "
            f"{query!r}" for name, port, state, start, query in rows]


def test_engine_and_retention_changes_reach_a_running_worker(
        env: OpEnv, redis_server: Any, tmp_path: Path) -> None:
    env.create("orders", "orders",
               engine={"poolSize": 2, "maxOverflow": 0, "applicationName": "pool-v1"},
               retention={"batchSize": 100, "expires": "1h"})
    env.ready("orders")
    role = env.binding("orders")["username"]
    config_dir = tmp_path / "orders"
    queue = f"q-{uuid.uuid4().hex[:8]}"
    not_ready: list[str] = []
    sampling = threading.Event()

    def sample_ready() -> None:
        while not sampling.wait(0.2):
            cond = env.cluster.condition(env.namespace, "orders", "Ready") or {}
            if cond.get("status") != "True":
                not_ready.append(json.dumps(cond))

    with SecretMirror(env.cluster.fetch, env.namespace, "orders-resultstore", config_dir,
                      period=1.0):
        worker = CeleryWorker(config_dir, redis_server.url, queue, tmp_path / "worker.log",
                              concurrency=4)
        try:
            with TaskLoop(config_dir, redis_server.url, queue) as loop:
                eventually(lambda: loop.ok >= 20, 90, "the worker to run tasks")
                eventually(lambda: "pool-v1" in app_names(env, role), 30,
                           "pool-v1 sessions of the store role")
                pid = worker.proc.pid
                sampler = threading.Thread(target=sample_ready, daemon=True)
                sampler.start()
                env.cluster.patch_store(env.namespace, "orders", {"spec": {
                    "engine": {"poolSize": 4, "applicationName": "pool-v2"},
                    "retention": {"batchSize": 250, "expires": "30m"}}})

                def secret_updated() -> bool:
                    b = env.binding("orders")
                    options = json.loads(b["engine_options.json"])
                    celery = json.loads(b["celery.json"])
                    return (options["pool_size"] == 4
                            and options["connect_args"]["application_name"] == "pool-v2"
                            and celery["result_expires"] == 1800)

                eventually(secret_updated, 30, "the Secret to carry the new settings")

                def cronjob_updated() -> bool:
                    cj = env.cluster.cronjob(env.namespace, "orders") or {}
                    command = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"][
                        "containers"][0]["command"]
                    return bool(command[-1] == "250")

                eventually(cronjob_updated, 30, "the CronJob to carry the new batch size")
                # the worker (same process) now connects with the new engine options
                seen: list[str] = []

                def only_v2() -> bool:
                    rows = sessions(env, role)
                    seen[:] = [row for row in rows if "pool-v2" not in row]
                    return bool(rows) and not seen

                try:
                    eventually(only_v2, 60, "only pool-v2 sessions of the store role")
                except AssertionError as exc:
                    raise AssertionError(
                        f"{exc}; sessions of other settings (test pid {os.getpid()}, worker "
                        f"pid {worker.proc.pid}): {seen}") from None
                before = loop.ok
                eventually(lambda: loop.ok >= before + 20, 60, "tasks after the change")
                sampling.set()
                sampler.join(timeout=5)
                assert worker.proc.poll() is None and worker.proc.pid == pid
        finally:
            worker.stop()
    assert loop.failures == [], loop.failures[:5]
    assert not_ready == [], not_ready[:3]
    reasons = env.cluster.reasons(env.namespace, "orders")
    assert "SecretUpdated" in reasons and "CronJobUpdated" in reasons
    assert "result store config reloaded" in (tmp_path / "worker.log").read_text()
