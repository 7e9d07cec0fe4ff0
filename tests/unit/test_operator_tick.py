"""The periodic checks leave a store to its change handlers until one of them has run.

Found through the reconcile metrics: a new (invalid) store was attempted twice, once by a
tick that fired before the create handler took the store's lock. The controller runs over
the in-memory API server (fake_kube.py): a reconcile is seen as a read of the store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from resultstore_operator.builders.ownership import ADMIN_CREDENTIALS_LABEL
from resultstore_operator.database import Credentials
from resultstore_operator.handlers import Controller
from resultstore_operator.handlers.controller import ObjectState, StoreView, check_due
from resultstore_operator.settings import OperatorSettings
from resultstore_operator.spec import ANNOTATION_ROTATE
from tests.unit.fake_database import FakeDatabase
from tests.unit.fake_kube import FakeKube

BODY = {"metadata": {"uid": "u1", "namespace": "ns", "name": "orders", "generation": 1},
        "spec": {}, "status": {}}


@pytest.fixture
def kube() -> FakeKube:
    fake = FakeKube()
    fake.add_store(BODY)  # an invalid spec: each reconcile reads it and fails permanently
    return fake


@pytest.fixture
def ctl(kube: FakeKube) -> Iterator[Controller]:
    controller = Controller(OperatorSettings(), kube=kube,
                            database=FakeDatabase(Credentials("postgres", "x")))
    try:
        yield controller
    finally:
        controller.executor.shutdown(wait=True)


def _check_pass(ctl: Controller, body: dict[str, Any]) -> None:
    """The store as the watch shows it, then one pass of the periodic checks."""
    async def one_pass() -> None:
        ctl.observe(body, None)
        await asyncio.gather(*ctl.start_due())

    asyncio.run(one_pass())


def test_tick_before_any_change_handler_does_nothing(ctl: Controller, kube: FakeKube) -> None:
    _check_pass(ctl, BODY)
    assert kube.calls == [], "the timer reconciled a store no change handler has seen yet"


def test_tick_after_create_reconciles_when_work_is_due(ctl: Controller,
                                                        kube: FakeKube) -> None:
    kube.add_secret({"metadata": {"name": "pg-admin", "namespace": "ns",
                                  "labels": {ADMIN_CREDENTIALS_LABEL: "true"}},
                     "data": {"username": "cG9zdGdyZXM=", "password": "eA=="}})  # postgres/x
    spec = {"database": {"host": "db.example", "name": "app",
                         "adminSecretRef": {"name": "pg-admin"}}, "schema": "orders"}
    kube.stores[("ns", "orders")]["spec"] = spec
    body = {**BODY, "spec": spec}
    asyncio.run(ctl.reconcile(body, "create", "create"))
    assert ctl.states["u1"].failures == 0 and kube.calls.count("read_store") == 1
    # The cached body has no credentials status yet, so work is due: the tick reconciles.
    _check_pass(ctl, body)
    assert kube.calls.count("read_store") == 2, "the due tick did not reconcile"


# --- the periodic check's decision from the watched body (StoreView, check_due) -----------

NOW = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)
STABLE = {"roleBase": "rs_x", "activeRole": "rs_x_a", "phase": "Stable",
          "lastRotationTime": "2026-05-06T06:08:09Z", "handledRotateRequest": "r1"}
VALID = {"database": {"host": "db.example", "name": "app",
                      "adminSecretRef": {"name": "pg-admin"}}, "schema": "orders"}


@pytest.mark.parametrize(("credentials", "annotation", "spec", "due"), [
    (None, None, VALID, True),                                   # never provisioned
    (STABLE, None, VALID, False),                                # nothing to do
    ({**STABLE, "phase": "Draining"}, None, VALID, True),        # rotation in progress
    (STABLE, "r2", VALID, True),                                 # a new rotate request
    (STABLE, "r1", VALID, False),                                # already handled
    (STABLE, None, {**VALID, "credentials": {"rotateEvery": "30m"}}, True),  # scheduled
    (STABLE, None, {**VALID, "credentials": {"rotateEvery": "2h"}}, False),  # not yet
    (STABLE, None, {"schema": "Not A Schema!"}, False),          # invalid: change handlers
])
def test_work_due(credentials: dict[str, Any] | None, annotation: str | None,
                  spec: dict[str, Any], due: bool) -> None:
    body = {"metadata": {"annotations": {ANNOTATION_ROTATE: annotation} if annotation else {}},
            "spec": spec, "status": {"credentials": credentials} if credentials else {}}
    assert work_due(body, NOW) is due


def work_due(body: dict[str, Any], now: datetime) -> bool:
    """Whether the status alone makes the check due: a handled, idle store whose drift
    check is not due (its last full reconcile is now)."""
    body = {**body, "metadata": {**body["metadata"], "uid": "u", "namespace": "ns",
                                 "name": "orders"}}
    state = ObjectState(handled=True, last_full=1000.0)
    return check_due(StoreView.of(body), state, now, 1000.0, drift_interval=60.0,
                     provisioning=False)
