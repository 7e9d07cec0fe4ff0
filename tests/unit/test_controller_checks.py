"""The controller's one periodic loop (instead of a Kopf timer per store).

`check_due`/`due_checks` decide from the stores as the watch showed them (`StoreView`) and the
controller's bookkeeping, with `now` and the monotonic time passed in; the loop itself runs
over the in-memory API server (fake_kube.py), where a reconcile is seen as a read of the store.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from resultstore_operator.builders.ownership import ADMIN_CREDENTIALS_LABEL
from resultstore_operator.database import Credentials
from resultstore_operator.handlers import Controller, ObjectState
from resultstore_operator.handlers.controller import (
    AT_ONCE,
    StoreView,
    check_due,
    due_checks,
)
from resultstore_operator.settings import OperatorSettings
from tests.unit.fake_database import FakeDatabase
from tests.unit.fake_kube import FakeKube

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
MONO = 10_000.0
DRIFT = 60.0


def view(uid: str = "u1", asks_at: datetime | None = None, deleting: bool = False,
         generation: int = 1) -> StoreView:
    return StoreView(uid, "team", f"store-{uid}", generation, deleting, asks_at)


def state(handled: bool = True, failures: int = 0, next_attempt: float = 0.0,
          last_full: float = MONO - 1, invalid_generation: int | None = None) -> ObjectState:
    return ObjectState(failures=failures, next_attempt=next_attempt, last_full=last_full,
                       invalid_generation=invalid_generation, handled=handled)


@pytest.mark.parametrize(("v", "s", "provisioning", "due"), [
    (view(), None, False, False),                                    # never seen by a handler
    (view(), state(handled=False), False, False),                    # create runs first
    (view(), state(), False, False),                                 # checked 1 s ago
    (view(), state(last_full=MONO - DRIFT), False, True),            # drift check due
    (view(), state(last_full=MONO - DRIFT), True, False),            # ...waits for provisioning
    (view(asks_at=AT_ONCE), state(), True, True),                    # status asks: no waiting
    (view(asks_at=NOW + timedelta(seconds=1)), state(), False, False),  # rotation not yet
    (view(asks_at=NOW), state(), False, True),                       # rotation scheduled now
    (view(deleting=True), state(last_full=0), False, False),         # the finalizer's business
    (view(), state(failures=2, next_attempt=MONO + 1), False, False),  # backoff not over
    (view(), state(failures=2, next_attempt=MONO), True, True),      # retry due, no waiting
    (view(generation=3), state(last_full=0, invalid_generation=3), False, False),  # invalid
    (view(generation=4), state(last_full=0, invalid_generation=3), False, True),   # edited
])
def test_check_due(v: StoreView, s: ObjectState | None, provisioning: bool, due: bool) -> None:
    assert check_due(v, s, NOW, MONO, DRIFT, provisioning) is due


def test_a_store_whose_lock_is_held_is_not_due() -> None:
    s = state(last_full=0)

    async def locked() -> bool:
        async with s.lock:
            return check_due(view(), s, NOW, MONO, DRIFT, False)

    assert asyncio.run(locked()) is False


def test_due_checks_most_overdue_first_asked_work_before_drift_running_skipped() -> None:
    views = [view("drift-recent"), view("drift-old"), view("asked", asks_at=AT_ONCE),
             view("retry"), view("running"), view("fresh")]
    states = {"drift-recent": state(last_full=MONO - DRIFT - 1),
              "drift-old": state(last_full=MONO - DRIFT - 100),
              "asked": state(), "retry": state(failures=1, next_attempt=MONO - 5),
              "running": state(last_full=0), "fresh": state()}
    due = due_checks(views, states, NOW, MONO, DRIFT, False, running={"running"})
    assert [v.uid for v in due] == ["retry", "asked", "drift-old", "drift-recent"]


@pytest.mark.parametrize(("status", "asks"), [
    ({}, AT_ONCE),                                                       # not provisioned
    ({"credentials": {"roleBase": "rs_x", "activeRole": "rs_x_a", "phase": "Stable",
                      "lastRotationTime": "2026-12-02T11:00:00Z"}}, None),  # drift only
])
def test_store_view_of_a_watch_body(status: dict[str, Any], asks: datetime | None) -> None:
    body = {"metadata": {"uid": "u", "namespace": "team", "name": "orders", "generation": 2},
            "spec": {"database": {"host": "db", "name": "app",
                                  "adminSecretRef": {"name": "a"}}, "schema": "orders"},
            "status": status}
    assert StoreView.of(body) == StoreView("u", "team", "orders", 2, False, asks)


# --- the loop over the in-memory API server -----------------------------------------------------

ADMIN = Credentials("postgres", "admin-password")


class SlowKube(FakeKube):
    """Reads of the store wait for `gate` while `hold` is set, counting the concurrent ones."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.hold = False
        self.inside = 0
        self.most = 0
        self._count = threading.Lock()

    def read_store(self, namespace: str, name: str) -> dict[str, Any] | None:
        if self.hold:
            with self._count:
                self.inside += 1
                self.most = max(self.most, self.inside)
            try:
                assert self.gate.wait(10), "the test never opened the gate"
            finally:
                with self._count:
                    self.inside -= 1
        return super().read_store(namespace, name)


@pytest.fixture
def kube() -> SlowKube:
    fake = SlowKube()
    fake.add_secret({"metadata": {"name": "pg-admin", "namespace": "team",
                                  "labels": {ADMIN_CREDENTIALS_LABEL: "true"}},
                     "data": {"username": base64.b64encode(b"postgres").decode(),
                              "password": base64.b64encode(b"admin-password").decode()}})
    for i in range(10):
        fake.add_store({
            "apiVersion": "resultstore.dev/v1alpha1", "kind": "ResultStore",
            "metadata": {"name": f"s{i}", "namespace": "team", "generation": 1,
                         "uid": f"uid-{i}"},
            "spec": {"database": {"host": "db.example", "name": "app", "sslMode": "disable",
                                  "adminSecretRef": {"name": "pg-admin"}},
                     "schema": f"s{i}"}})
    return fake


@pytest.fixture
def ctl(kube: SlowKube) -> Iterator[Controller]:
    controller = Controller(OperatorSettings(workers=4, tick_interval=0.2), kube=kube,
                            database=FakeDatabase(ADMIN))
    try:
        yield controller
    finally:
        kube.gate.set()
        controller.executor.shutdown(wait=True)


def _provision_all(ctl: Controller, kube: FakeKube) -> None:
    async def create() -> None:
        for body in list(kube.stores.values()):
            await ctl.reconcile(copy.deepcopy(body), "create", "create")
        for body in kube.stores.values():  # the watch events of the status patches
            ctl.observe(copy.deepcopy(body), "MODIFIED")

    asyncio.run(create())


def test_a_pass_runs_every_due_check_at_most_check_concurrency_at_once(
        ctl: Controller, kube: SlowKube) -> None:
    """The pass starts `check_concurrency` checks; each that ends starts the next due one
    (not one batch per tick), until every due store was checked once."""
    _provision_all(ctl, kube)
    for s in ctl.states.values():
        s.last_full -= ctl.settings.drift_interval  # every drift check is due
    kube.hold = True
    reads_before = kube.calls.count("read_store")

    async def scenario() -> tuple[int, int]:
        first = ctl.start_due()
        again = ctl.start_due()  # a second pass meanwhile: the running ones not doubled
        while kube.inside < len(first):
            await asyncio.sleep(0.01)
        kube.gate.set()
        while ctl.checking:  # the queue drains as checks end
            await asyncio.sleep(0.01)
        return len(first), len(again)

    first, again = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert ctl.check_concurrency == 2
    assert (first, again) == (2, 0)
    assert kube.most == 2, "more checks ran at once than check_concurrency"
    assert kube.calls.count("read_store") - reads_before == len(kube.stores), \
        "not every due store was checked once by the pass"
    # all checked: the next pass finds nothing due
    assert not asyncio.run(_one_pass(ctl))


async def _one_pass(ctl: Controller) -> list[asyncio.Task[None]]:
    return ctl.start_due()


def test_deleted_store_is_forgotten_and_never_checked(ctl: Controller, kube: SlowKube) -> None:
    _provision_all(ctl, kube)
    for s in ctl.states.values():
        s.last_full -= ctl.settings.drift_interval
    for body in kube.stores.values():
        ctl.observe(copy.deepcopy(body), "DELETED")
    assert ctl.views == {}

    async def one_pass() -> int:
        return len(ctl.start_due())

    assert asyncio.run(one_pass()) == 0


def test_the_loop_runs_checks_until_stopped(ctl: Controller, kube: SlowKube) -> None:
    _provision_all(ctl, kube)
    for s in ctl.states.values():
        s.last_full -= ctl.settings.drift_interval
    reads_before = kube.calls.count("read_store")

    async def scenario() -> tuple[int, int]:
        ctl.start_checks()
        ctl.start_checks()  # idempotent: still one loop
        while kube.calls.count("read_store") - reads_before < len(kube.stores):
            await asyncio.sleep(0.02)
        await ctl.stop_checks()
        while ctl.checking:  # checks in flight finish under their lock
            await asyncio.sleep(0.01)
        stopped_at = kube.calls.count("read_store")
        for s in ctl.states.values():
            s.last_full -= ctl.settings.drift_interval  # due again, but nobody runs them
        await asyncio.sleep(ctl.settings.tick_interval * 3)
        return stopped_at, kube.calls.count("read_store")

    stopped_at, later = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert later == stopped_at, "a check ran after the loop was stopped"
    assert ctl._checks_task is None
