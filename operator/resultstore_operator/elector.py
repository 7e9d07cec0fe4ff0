"""The Lease loop: acquire, renew, release, and the guard that ends a leader that cannot renew.

The decisions are `leadership.decide` (pure); this module only reads and writes the Lease
through the one client (`Kube.read_lease/create_lease/replace_lease`) and keeps the
monotonic times. Why the process exits instead of pausing Kopf is in docs/ARCHITECTURE.md
("Leadership"): Kopf's sync handlers run in threads nothing can cancel, so only the end of
the process guarantees that no side effect continues past the renew deadline.

The guard is a thread, not a task: a blocked event loop (a handler that forgot to go to a
thread, a GIL-hungry parse) must not delay the step-down past the deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from .kube import Conflict, Kube, KubeError
from .leadership import (
    Action,
    LeaseRecord,
    LeaseTiming,
    Observation,
    decide,
    observe,
    release_body,
)
from .settings import LeaderSettings

log = logging.getLogger("resultstore.leader")

#: Exit status of a replica that lost the Lease (the kubelet restarts it as a standby).
EXIT_LOST_LEADERSHIP = 3
#: How often the guard thread compares the last renewal with the deadline.
GUARD_INTERVAL = 0.25


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    sys.stderr.flush()
    sys.stdout.flush()


class LeaderElector:
    """One replica's side of the election (one per process)."""

    def __init__(self, kube: Kube, settings: LeaderSettings,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], datetime] = lambda: datetime.now(UTC),
                 exit_process: Callable[[int], object] = os._exit) -> None:
        self.kube = kube
        self.settings = settings
        self.timing = LeaseTiming(settings.lease_duration, settings.renew_deadline,
                                  settings.retry_period)
        self._clock = clock
        self._wall = wall
        self._exit = exit_process
        self.observation: Observation | None = None
        #: Monotonic time before the last successful acquire/renew write (None: not leader).
        self.last_renew: float | None = None
        self._guard_stop = threading.Event()
        self._guard: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stepped_down = False

    @property
    def leader(self) -> bool:
        return self.last_renew is not None

    @property
    def state(self) -> str:
        return "leader" if self.leader else "standby"

    @property
    def _request_timeout(self) -> float:
        # A renewal that hangs must fail while another attempt still fits in the deadline.
        return max(0.5, self.timing.renew_deadline / 3)

    # --- the guard ---------------------------------------------------------------------------

    def start_guard(self) -> None:
        self._guard = threading.Thread(target=self._guard_loop, name="lease-guard",
                                       daemon=True)
        self._guard.start()

    def _guard_loop(self) -> None:
        while not self._guard_stop.wait(GUARD_INTERVAL) and not self._stepped_down:
            self._check_deadline()

    def _check_deadline(self) -> None:
        """Step down when the last successful renewal is older than the renew deadline (the
        guard thread checks the same; whichever sees it first ends the process)."""
        last = self.last_renew
        if last is not None and self._clock() - last > self.timing.renew_deadline:
            self.step_down(f"not renewed within {self.timing.renew_deadline:g}s")

    def step_down(self, reason: str) -> None:
        """Stop acting now: the process ends (no thread of it keeps a side effect going)."""
        with self._lock:
            if self._stepped_down:
                return
            self._stepped_down = True
        log.critical("leadership lost (%s): %s stops acting and exits with %d",
                     reason, self.settings.identity, EXIT_LOST_LEADERSHIP)
        _flush_logs()
        self._exit(EXIT_LOST_LEADERSHIP)

    # --- the loop ------------------------------------------------------------------------------

    async def _read(self) -> None:
        lease = await asyncio.to_thread(self.kube.read_lease, self.settings.namespace,
                                        self.settings.lease_name, self._request_timeout)
        self.observation = observe(self.observation, LeaseRecord.from_lease(lease),
                                   self._clock())

    async def attempt(self) -> float:
        """One round: read, decide, write. Returns the seconds to wait before the next."""
        s = self.settings
        try:
            await self._read()
        except KubeError as exc:
            log.warning("could not read Lease %s/%s: %s", s.namespace, s.lease_name, exc)
            self._check_deadline()
            return self.timing.retry_period
        assert self.observation is not None
        now = self._clock()
        decision = decide(self.observation, s.identity, self.last_renew, now, self.timing,
                          self._wall(), s.namespace, s.lease_name)
        if decision.action is Action.STEP_DOWN:
            self.step_down(decision.reason)
            return 0.0
        if decision.body is None:
            return decision.wait
        sent = self._clock()
        try:
            if decision.create:
                written = await asyncio.to_thread(self.kube.create_lease, s.namespace,
                                                  decision.body, self._request_timeout)
            else:
                written = await asyncio.to_thread(self.kube.replace_lease, s.namespace,
                                                  s.lease_name, decision.body,
                                                  self._request_timeout)
        except Conflict:
            # Someone wrote first: re-read and decide again at once.
            log.info("Lease %s changed under us; re-reading", s.lease_name)
            return 0.0
        except KubeError as exc:
            log.warning("could not %s Lease %s/%s: %s", decision.action.value, s.namespace,
                        s.lease_name, exc)
            self._check_deadline()
            return self.timing.retry_period
        if self._stepped_down:
            return 0.0
        was_leader = self.leader
        self.last_renew = sent
        self.observation = observe(self.observation, LeaseRecord.from_lease(written), sent)
        if not was_leader:
            log.info("leadership acquired by %s (%s)", s.identity, decision.reason)
        return decision.wait

    async def acquire(self) -> None:
        """Stand by until this replica holds the Lease."""
        log.info("standing by for Lease %s/%s as %s", self.settings.namespace,
                 self.settings.lease_name, self.settings.identity)
        while not self.leader:
            await asyncio.sleep(await self.attempt())

    async def keep(self) -> None:
        """Renew every retry period, forever (a lost Lease ends the process)."""
        while True:
            await asyncio.sleep(await self.attempt())

    async def release(self) -> None:
        """Hand over at once (graceful stop, after Kopf has stopped): no holder, 1 s."""
        s = self.settings
        record = self.observation.record if self.observation else None
        body = release_body(record, s.identity, self._wall(), s.namespace, s.lease_name)
        if body is not None and self.leader:
            try:
                await asyncio.to_thread(self.kube.replace_lease, s.namespace, s.lease_name,
                                        body, self._request_timeout)
                log.info("Lease %s released by %s", s.lease_name, s.identity)
            except KubeError as exc:
                log.warning("could not release Lease %s (%s); a standby takes over when it "
                            "lapses", s.lease_name, exc)
        self.last_renew = None
        self._guard_stop.set()
