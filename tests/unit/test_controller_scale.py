"""The controller at scale, in memory: what keeps 1000 stores created at once fast.

A drift check (the timer's periodic re-check of a Ready store) waits while change handlers
(create/resume/spec/rotate) are pending, so that the first stores' re-checks do not take
threads from the provisioning of the others; work a store's status asks for (a retry, a
rotation) does not wait. Over the fake API server and PostgreSQL of test_controller.py.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from resultstore_operator.builders import reasons as r
from resultstore_operator.builders.ownership import ADMIN_CREDENTIALS_LABEL
from resultstore_operator.database import Credentials
from resultstore_operator.handlers import Controller
from resultstore_operator.settings import OperatorSettings
from resultstore_operator.spec import ANNOTATION_ROTATE
from tests.unit.fake_database import FakeDatabase
from tests.unit.fake_kube import FakeKube

NS = "team"
ADMIN = Credentials("postgres", "admin-password")


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


class GatedKube(FakeKube):
    """Reads of the stores named in `gated` wait until `gate` is set (a slow provisioning)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gated: set[str] = set()

    def read_store(self, namespace: str, name: str) -> dict[str, Any] | None:
        if name in self.gated:
            assert self.gate.wait(10), "the test never released the gated read"
        return super().read_store(namespace, name)


def _store(kube: FakeKube, name: str, uid: str) -> dict[str, Any]:
    return kube.add_store({
        "apiVersion": "resultstore.dev/v1alpha1", "kind": "ResultStore",
        "metadata": {"name": name, "namespace": NS, "generation": 1, "uid": uid},
        "spec": {"database": {"host": "db.example", "name": "app", "sslMode": "disable",
                              "adminSecretRef": {"name": "pg-admin"}},
                 "schema": name}})


@pytest.fixture
def kube() -> GatedKube:
    kube = GatedKube()
    kube.add_secret({"metadata": {"name": "pg-admin", "namespace": NS,
                                  "labels": {ADMIN_CREDENTIALS_LABEL: "true"}},
                     "data": {"username": _b64(ADMIN.username),
                              "password": _b64(ADMIN.password)}})
    return kube


@pytest.fixture
def ctl(kube: GatedKube) -> Iterator[Controller]:
    controller = Controller(OperatorSettings(), kube=kube, database=FakeDatabase(ADMIN))
    try:
        yield controller
    finally:
        kube.gate.set()
        controller.executor.shutdown(wait=True)


async def _check_pass(ctl: Controller, kube: FakeKube) -> None:
    """One pass of the periodic checks, over the stores as the watch would show them."""
    for body in kube.stores.values():
        ctl.observe(copy.deepcopy(body), None)
    await asyncio.gather(*ctl.start_due())


def _reads_of(kube: FakeKube) -> int:
    return kube.calls.count("read_store")


def test_drift_check_waits_while_other_stores_are_being_provisioned(
        kube: GatedKube, ctl: Controller) -> None:
    ready = _store(kube, "orders", "uid-orders")
    new = _store(kube, "invoices", "uid-invoices")
    asyncio.run(ctl.reconcile(copy.deepcopy(ready), "create", "create"))
    assert kube.status(NS, "orders")["phase"] == r.PHASE_READY
    # its drift check is due
    ctl.states["uid-orders"].last_full -= ctl.settings.drift_interval
    kube.gated.add("invoices")

    async def scenario() -> tuple[int, int]:
        creating = asyncio.ensure_future(
            ctl.reconcile(copy.deepcopy(new), "create", "create"))
        await asyncio.sleep(0)  # the create handler is now waiting for its thread's work
        assert ctl.changes_pending == 1
        before = _reads_of(kube)
        await _check_pass(ctl, kube)
        during = _reads_of(kube) - before
        kube.gate.set()
        await creating
        assert ctl.changes_pending == 0
        before = _reads_of(kube)
        await _check_pass(ctl, kube)
        return during, _reads_of(kube) - before

    during, after = asyncio.run(scenario())
    assert during == 0, "a drift check ran while another store was being provisioned"
    assert after == 1, "the drift check did not run once the provisioning was done"
    assert kube.status(NS, "invoices")["phase"] == r.PHASE_READY


def test_requested_rotation_does_not_wait_for_pending_provisioning(
        kube: GatedKube, ctl: Controller) -> None:
    ready = _store(kube, "orders", "uid-orders")
    new = _store(kube, "invoices", "uid-invoices")
    asyncio.run(ctl.reconcile(copy.deepcopy(ready), "create", "create"))
    kube.stores[(NS, "orders")]["metadata"]["annotations"] = {ANNOTATION_ROTATE: "now"}
    kube.gated.add("invoices")

    async def scenario() -> int:
        creating = asyncio.ensure_future(
            ctl.reconcile(copy.deepcopy(new), "create", "create"))
        await asyncio.sleep(0)
        assert ctl.changes_pending == 1
        before = _reads_of(kube)
        await _check_pass(ctl, kube)
        ran = _reads_of(kube) - before
        kube.gate.set()
        await creating
        return ran

    assert asyncio.run(scenario()) == 1, "a requested rotation waited for other stores"
    assert r.ROTATION_STARTED in kube.reasons()

