"""Credential rotation: zero failed stores under load, resumable after a crash, scheduled.

The test plays the kubelet (SecretMirror re-materialises the Secret every second) and runs
the real backend (`resultstore:///<dir>`) storing results in a loop through the rotation.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import Celery

from tests.e2e.operator_support import (
    OpEnv,
    SecretMirror,
    can_login,
    connect_as,
    eventually,
    make_openv,
)


@pytest.fixture
def env(kube: Any, api_client: Any, namespace: str, postgres: Any,
        pg_database: Any) -> Iterator[OpEnv]:
    yield from make_openv(kube, api_client, namespace, postgres, pg_database)


class StoreLoop:
    """Store results continuously through the backend, counting successes and failures."""

    def __init__(self, config_dir: Path) -> None:
        self.app = Celery("rotation-load", set_as_current=False)
        self.app.conf.update(result_backend=f"resultstore://{config_dir}",
                             result_serializer="json", accept_content=["json"],
                             resultstore_reload_interval=0.2)
        self.ok = 0
        self.failures: list[str] = []
        self.ids: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="store-loop")

    def _run(self) -> None:
        backend = self.app.backend
        i = 0
        while not self._stop.is_set():
            task_id = str(uuid.uuid4())
            try:
                backend.store_result(task_id, {"i": i}, "SUCCESS")
                assert backend.get_task_meta(task_id)["result"] == {"i": i}
                self.ok += 1
                self.ids.append(task_id)
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and asserted
                self.failures.append(f"{type(exc).__name__}: {exc}")
            i += 1
            self._stop.wait(0.01)

    def __enter__(self) -> StoreLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def wait_more(self, n: int, timeout: float = 60) -> None:
        target = self.ok + n
        eventually(lambda: self.ok >= target or None, timeout, f"{n} more stored results")


def credentials(env: OpEnv, name: str) -> dict[str, Any]:
    store = env.cluster.store(env.namespace, name) or {}
    return dict((store.get("status") or {}).get("credentials") or {})


def request_rotation(env: OpEnv, name: str, value: str) -> None:
    env.cluster.patch_store(env.namespace, name, {"metadata": {"annotations": {
        "resultstore.dev/rotate": value}}})


def wait_rotations(env: OpEnv, name: str, count: int, timeout: float = 90) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        creds = credentials(env, name)
        if creds.get("rotations", 0) >= count and creds.get("phase") == "Stable":
            return creds
        return None

    return eventually(done, timeout, f"{count} completed rotation(s) of {name}")


def test_rotation_under_load_has_zero_failed_stores(env: OpEnv, tmp_path: Path) -> None:
    env.create("orders", "orders", credentials={"drainTimeout": "2m"})
    env.ready("orders")
    old = env.binding("orders")
    config_dir = tmp_path / "orders"
    with SecretMirror(env.cluster.fetch, env.namespace, "orders-resultstore", config_dir,
                      period=1.0) as mirror, StoreLoop(config_dir) as loop:
        loop.wait_more(50)
        request_rotation(env, "orders", "rotate-1")
        creds = wait_rotations(env, "orders", 1)
        loop.wait_more(50)
        assert mirror.versions >= 2
        ready = env.cluster.condition(env.namespace, "orders", "Ready")
        assert ready is not None and ready["status"] == "True", ready
    assert loop.failures == [], loop.failures[:5]
    new = env.binding("orders")
    assert new["username"] == creds["activeRole"] != old["username"]
    assert new["password"] != old["password"]
    assert can_login(new)
    assert not can_login(old), "the previous role still logs in after the rotation"
    assert env.query("SELECT count(*) FROM pg_roles WHERE rolname = %s",
                     (old["username"],)) == [(0,)]
    # every result stored through the rotation is there
    stored = env.query("SELECT count(*) FROM orders.celery_taskmeta WHERE task_id = ANY(%s)",
                       (loop.ids,))
    assert stored == [(len(loop.ids),)]
    reasons = env.cluster.reasons(env.namespace, "orders")
    for reason in ("RotationStarted", "NextRoleReady", "SecretSwitched",
                   "PreviousRoleRemoved", "RotationComplete"):
        assert reason in reasons, reasons
    rotating = env.cluster.condition(env.namespace, "orders", "CredentialsRotating")
    assert rotating is not None and (rotating["status"], rotating["reason"]) == (
        "False", "RotationComplete")


def test_rotation_resumes_after_the_operator_is_killed_mid_drain(env: OpEnv) -> None:
    env.create("orders", "orders", credentials={"drainTimeout": "1h"})
    env.ready("orders")
    old = env.binding("orders")
    with connect_as(old) as lingering:  # a worker that has not reloaded yet
        request_rotation(env, "orders", "r1")
        eventually(lambda: credentials(env, "orders").get("phase") == "Draining", 30,
                   "the rotation to reach Draining")
        env.cluster.wait_condition(env.namespace, "orders", "CredentialsRotating", "True",
                                   reason="DrainingPreviousRole")
        env.restart_operator(crash=True)
        new = env.binding("orders")
        assert new["username"] != old["username"] and can_login(new)
        assert can_login(old), "the previous role must live while its sessions drain"
        assert credentials(env, "orders")["phase"] == "Draining"
        lingering.execute("SELECT 1")
    creds = wait_rotations(env, "orders", 1)
    assert creds["activeRole"] == new["username"]
    assert not can_login(old)
    assert env.binding("orders") == new  # the resumed operator did not rotate again


def test_drain_timeout_ends_lingering_sessions_of_the_previous_role(env: OpEnv) -> None:
    env.create("orders", "orders", credentials={"drainTimeout": "3s"})
    env.ready("orders")
    old = env.binding("orders")
    lingering = connect_as(old)  # never reloads, never disconnects
    try:
        request_rotation(env, "orders", "r1")
        wait_rotations(env, "orders", 1, timeout=60)
        with pytest.raises(psycopg.OperationalError):
            lingering.execute("SELECT 1")
    finally:
        lingering.close()
    assert not can_login(old)
    assert "SessionsTerminated" in env.cluster.reasons(env.namespace, "orders")


def test_rotation_resumes_from_a_step_persisted_before_a_crash(env: OpEnv) -> None:
    """Status says Rotating (next role chosen, Secret not yet switched): the restarted
    operator prepares the next role, switches the Secret and completes."""
    env.create("orders", "orders", credentials={"drainTimeout": "30s"})
    env.ready("orders")
    old = env.binding("orders")
    base = credentials(env, "orders")["roleBase"]
    nxt = f"{base}_b" if old["username"].endswith("_a") else f"{base}_a"

    def half_done() -> None:
        env.cluster.patch_store_status(env.namespace, "orders", {"credentials": {
            "phase": "Rotating", "nextRole": nxt,
            "rotationStartedAt": "2026-01-01T00:00:00Z"}})

    env.restart_operator(crash=True, between=half_done)
    creds = wait_rotations(env, "orders", 1)
    assert creds["activeRole"] == nxt
    new = env.binding("orders")
    assert new["username"] == nxt and can_login(new)
    assert not can_login(old)


def test_scheduled_rotation_with_rotate_every(env: OpEnv) -> None:
    env.create("orders", "orders", credentials={"rotateEvery": "12s", "drainTimeout": "5s"})
    env.ready("orders")
    first = env.binding("orders")["username"]
    wait_rotations(env, "orders", 1, timeout=60)
    second = env.binding("orders")["username"]
    assert second != first
    wait_rotations(env, "orders", 2, timeout=60)
    assert env.binding("orders")["username"] == first  # the two roles alternate
    assert "rotating credentials (scheduled)" in " ".join(
        str(e.get("message")) for e in env.cluster.events(env.namespace, "orders"))
