"""The per-store timer leaves a store to its change handlers until one of them has run.

Found through the reconcile metrics: a new (invalid) store was attempted twice, once by a
tick that fired before the create handler took the store's lock.
"""

from __future__ import annotations

import asyncio
from typing import Any

from resultstore_operator.handlers import Controller
from resultstore_operator.settings import OperatorSettings

BODY = {"metadata": {"uid": "u1", "namespace": "ns", "name": "orders", "generation": 1},
        "spec": {}, "status": {}}


def _controller(calls: list[str]) -> Controller:
    ctl = Controller(OperatorSettings())

    async def fake_reconcile(state: Any, namespace: str, name: str, why: str,
                             handler: str) -> None:
        calls.append(handler)
        return None

    ctl._reconcile_locked = fake_reconcile  # type: ignore[method-assign]
    return ctl


def test_tick_before_any_change_handler_does_nothing() -> None:
    calls: list[str] = []
    ctl = _controller(calls)
    asyncio.run(ctl.tick(BODY))
    assert calls == [], "the timer reconciled a store no change handler has seen yet"


def test_tick_after_create_reconciles_when_work_is_due() -> None:
    calls: list[str] = []
    ctl = _controller(calls)
    asyncio.run(ctl.reconcile(BODY, "create", "create"))
    # Credentials status is missing, so work is due: the tick reconciles.
    asyncio.run(ctl.tick(BODY))
    assert calls == ["create", "timer"], calls
