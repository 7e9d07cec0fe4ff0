"""The Lease loop (elector.py) over an in-memory Lease API with the API server's own rules
(resourceVersion preconditions, AlreadyExists), a hand-driven monotonic clock, and the exit
call recorded instead of ending the test process. The real API server is in
tests/e2e/test_operator_failover.py."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from resultstore_devtools.procs import free_port
from resultstore_operator.elector import EXIT_LOST_LEADERSHIP, LeaderElector
from resultstore_operator.health import HealthServer
from resultstore_operator.kube import Conflict, Unavailable
from resultstore_operator.settings import LeaderSettings


class LeaseApi:
    """The Lease endpoints as the API server answers them (one namespace)."""

    def __init__(self) -> None:
        self.leases: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise Unavailable("read Lease: connection refused")

    def _stored(self, body: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        out = copy.deepcopy(body)
        out["metadata"]["resourceVersion"] = str(self.version)
        self.leases[out["metadata"]["name"]] = out
        return copy.deepcopy(out)

    def read_lease(self, namespace: str, name: str, timeout: float = 30) -> Any:
        self._check()
        return copy.deepcopy(self.leases.get(name))

    def create_lease(self, namespace: str, body: dict[str, Any], timeout: float = 30) -> Any:
        self._check()
        if body["metadata"]["name"] in self.leases:
            raise Conflict("create Lease: AlreadyExists", 409)
        return self._stored(body)

    def replace_lease(self, namespace: str, name: str, body: dict[str, Any],
                      timeout: float = 30) -> Any:
        self._check()
        live = self.leases.get(name)
        if live is None or live["metadata"]["resourceVersion"] != \
                body["metadata"].get("resourceVersion"):
            raise Conflict("replace Lease: the object has been modified", 409)
        return self._stored(body)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SETTINGS = LeaderSettings(enabled=True, namespace="ops", lease_name="leader",
                          lease_duration=10, renew_deadline=6, retry_period=2)


def elector(api: LeaseApi, clock: Clock, name: str, exits: list[int]) -> LeaderElector:
    from dataclasses import replace

    return LeaderElector(api, replace(SETTINGS, identity=name), clock=clock,  # type: ignore[arg-type]
                         wall=lambda: datetime(2026, 12, 2, tzinfo=UTC),
                         exit_process=exits.append)


def test_one_acquires_the_other_waits_out_the_lease_on_its_own_clock() -> None:
    api, clock, exits = LeaseApi(), Clock(), list[int]()
    a, b = elector(api, clock, "a_1", exits), elector(api, clock, "b_2", exits)
    asyncio.run(a.attempt())
    asyncio.run(b.attempt())
    assert a.leader and not b.leader
    assert api.leases["leader"]["spec"]["holderIdentity"] == "a_1"
    # a dies silently; b saw its last record at 1000 and waits leaseDuration from there.
    clock.now += 9.9
    asyncio.run(b.attempt())
    assert not b.leader
    clock.now += 0.2
    asyncio.run(b.attempt())
    assert b.leader
    assert api.leases["leader"]["spec"]["leaseTransitions"] == 1
    assert exits == []


def test_a_renewing_leader_keeps_the_lease_and_a_standby_never_takes_it() -> None:
    api, clock, exits = LeaseApi(), Clock(), list[int]()
    a, b = elector(api, clock, "a_1", exits), elector(api, clock, "b_2", exits)
    asyncio.run(a.attempt())
    for _ in range(20):
        clock.now += 2
        asyncio.run(a.attempt())
        asyncio.run(b.attempt())
        assert a.leader and not b.leader
    assert exits == []


def test_a_leader_that_cannot_renew_exits_before_the_standby_may_start() -> None:
    api, clock, exits = LeaseApi(), Clock(), list[int]()
    a = elector(api, clock, "a_1", exits)
    asyncio.run(a.attempt())
    api.down = True
    clock.now += 5.9
    asyncio.run(a.attempt())
    assert exits == []
    clock.now += 0.2  # past renewDeadline (6 s), 3.9 s before leaseDuration could elapse
    asyncio.run(a.attempt())
    assert exits == [EXIT_LOST_LEADERSHIP]


def test_the_guard_thread_exits_even_if_the_loop_never_runs() -> None:
    api, exits = LeaseApi(), list[int]()
    clock = Clock()
    a = elector(api, clock, "a_1", exits)
    asyncio.run(a.attempt())
    a.start_guard()
    clock.now += 7  # the event loop is "blocked": no attempt runs any more
    for _ in range(40):
        if exits:
            break
        time.sleep(0.05)
    assert exits == [EXIT_LOST_LEADERSHIP]


def test_conflicting_acquisitions_have_one_winner() -> None:
    api, clock, exits = LeaseApi(), Clock(), list[int]()
    a, b = elector(api, clock, "a_1", exits), elector(api, clock, "b_2", exits)
    # Both read "no Lease" before either writes: the second create is AlreadyExists.
    async def both() -> None:
        await asyncio.gather(a.attempt(), b.attempt())

    asyncio.run(both())
    assert [a.leader, b.leader].count(True) == 1


def test_release_hands_over_at_once() -> None:
    api, clock, exits = LeaseApi(), Clock(), list[int]()
    a, b = elector(api, clock, "a_1", exits), elector(api, clock, "b_2", exits)
    asyncio.run(a.attempt())
    asyncio.run(b.attempt())
    asyncio.run(a.release())
    assert not a.leader
    assert api.leases["leader"]["spec"]["holderIdentity"] == ""
    asyncio.run(b.attempt())  # no waiting for the lease duration
    assert b.leader
    assert exits == []


@pytest.mark.parametrize(("webhook_ready", "status"), [(True, 200), (False, 503)])
def test_health_liveness_is_the_loop_readiness_is_the_webhook(webhook_ready: bool,
                                                               status: int) -> None:
    async def scenario() -> tuple[int, dict[str, Any], int, dict[str, Any]]:
        port = free_port()
        server = HealthServer("127.0.0.1", port, lambda: {"leader": "standby"},
                              lambda: webhook_ready)
        await server.start()
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as live:
                    live_body = await live.json()
                async with http.get(f"http://127.0.0.1:{port}/readyz") as ready:
                    ready_body = await ready.json()
                return live.status, live_body, ready.status, ready_body
        finally:
            await server.stop()

    live, live_body, ready, ready_body = asyncio.run(scenario())
    assert live == 200 and live_body == {"leader": "standby", "loop": "alive"}
    assert ready == status and ready_body["ready"] is webhook_ready


class CountingLeaseApi(LeaseApi):
    """LeaseApi that records each call and the timeout it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, float]] = []

    def read_lease(self, namespace: str, name: str, timeout: float = 30) -> Any:
        self.calls.append(("read", timeout))
        return super().read_lease(namespace, name, timeout)

    def create_lease(self, namespace: str, body: dict[str, Any], timeout: float = 30) -> Any:
        self.calls.append(("create", timeout))
        return super().create_lease(namespace, body, timeout)

    def replace_lease(self, namespace: str, name: str, body: dict[str, Any],
                      timeout: float = 30) -> Any:
        self.calls.append(("replace", timeout))
        return super().replace_lease(namespace, name, body, timeout)


def test_a_leader_renews_with_one_request_per_attempt() -> None:
    api, clock, exits = CountingLeaseApi(), Clock(), list[int]()
    a = elector(api, clock, "a_1", exits)
    asyncio.run(a.attempt())
    assert [c for c, _ in api.calls] == ["read", "create"]
    api.calls.clear()
    for _ in range(5):
        clock.now += 2
        asyncio.run(a.attempt())
    assert [c for c, _ in api.calls] == ["replace"] * 5, \
        "the leader read the Lease before renewing it"
    assert a.leader and exits == []


def test_a_renewal_that_conflicts_reads_again_and_steps_down_if_another_holds_it() -> None:
    api, clock, exits = CountingLeaseApi(), Clock(), list[int]()
    a = elector(api, clock, "a_1", exits)
    asyncio.run(a.attempt())
    # someone else wrote the Lease (an admin, or a replica that believes it lapsed)
    lease = api.leases["leader"]
    lease["spec"]["holderIdentity"] = "b_2"
    api._stored(lease)
    api.calls.clear()
    clock.now += 2
    assert asyncio.run(a.attempt()) == 0.0  # Conflict: decide again at once
    assert exits == []
    asyncio.run(a.attempt())
    assert [c for c, _ in api.calls] == ["replace", "read"]
    assert exits == [EXIT_LOST_LEADERSHIP]


def test_a_failed_renewal_is_retried_soon_with_a_timeout_inside_the_deadline() -> None:
    api, clock, exits = CountingLeaseApi(), Clock(), list[int]()
    a = elector(api, clock, "a_1", exits)
    asyncio.run(a.attempt())
    api.down = True
    api.calls.clear()
    clock.now += 2
    wait = asyncio.run(a.attempt())
    assert wait < SETTINGS.retry_period, "a failed renewal waited a whole retry period"
    clock.now += 3.5  # 5.5 s after the last renewal: 0.5 s of the 6 s deadline left
    asyncio.run(a.attempt())
    timeouts = [t for _, t in api.calls]
    assert timeouts[0] <= SETTINGS.renew_deadline / 3
    assert timeouts[-1] <= 0.5 + 1e-9, \
        "a renewal request may run past the renew deadline"
    api.down = False
    clock.now += 0.4
    asyncio.run(a.attempt())
    assert a.leader and exits == []


def test_keep_renews_from_its_own_thread_while_the_event_loop_is_blocked() -> None:
    from dataclasses import replace

    api, exits = CountingLeaseApi(), list[int]()
    fast = replace(SETTINGS, identity="a_1", lease_duration=5, renew_deadline=4,
                   retry_period=0.05)
    a = LeaderElector(api, fast, exit_process=exits.append)  # type: ignore[arg-type]

    async def scenario() -> int:
        await a.attempt()
        keeping = asyncio.ensure_future(a.keep())
        await asyncio.sleep(0)  # keep() started its thread
        before = len(api.calls)
        time.sleep(1.0)  # the event loop is blocked (a GIL-hungry handler, say)
        renewed = len(api.calls) - before
        keeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeping
        await a.release()
        return renewed

    renewed = asyncio.run(scenario())
    assert renewed >= 1, "no renewal while the event loop was blocked"
    assert api.leases["leader"]["spec"]["holderIdentity"] == ""
    assert exits == []
