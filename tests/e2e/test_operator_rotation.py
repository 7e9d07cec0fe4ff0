"""Credential rotation: resumable after a crash, drained by its timeout, scheduled.

The operator runs as a local process; no pod reads the Secret here. Zero failed stores under
load through a rotation, with a worker pod reading its Secret volume as the real kubelet
refreshes it (and the events, conditions and logins checked afterwards), is
test_realnode_workloads.py's (it was also tested here, with a stand-in refresh: folded).
StoreLoop (used by test_operator_ownership.py) stores results through the real backend.
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
