"""The Lease loop: acquire, renew, release, and the guard that ends a leader that cannot renew.

The decisions are `leadership.decide` (pure); this module only reads and writes the Lease
through the one client (`Kube.read_lease/create_lease/replace_lease`) and keeps the
monotonic times. Why the process exits instead of pausing Kopf is in docs/ARCHITECTURE.md
("Leadership"): Kopf's sync handlers run in threads nothing can cancel, so only the end of
the process guarantees that no side effect continues past the renew deadline.

The guard is a thread, not a task: a blocked event loop (a handler that forgot to go to a
thread, a GIL-hungry parse) must not delay the step-down past the deadline. For the same
reason the leader renews from a thread of its own (`keep`), not from the event loop, and
its Lease calls run in a pool of their own, never queued behind other `to_thread` work.

Renewal under an overloaded API server (issue 16: at 1000 stores the leader lost the Lease
twice with no failed renewal logged; a read and a replace took more than the 4 s the 6 s
deadline left after the 2 s retry period):

- The leader renews with one request, not two: it replaces the Lease with the
  resourceVersion of its own last write. If anyone wrote since, that is a Conflict, and the
  next attempt reads the Lease and decides again (and steps down if another holds it), so
  mutual exclusion is as before.
- Each renewal attempt has its own timeout, bounded by the time left before the deadline,
  and a failed attempt is retried after a quarter of the retry period instead of a whole
  one: one slow request no longer eats the whole deadline.
- Unchanged: the deadline counts from the time *before* the last successful write, and a
  replica that cannot renew in time ends its process before a standby can acquire.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

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
#: A leader's next attempt after a failed renewal, as a fraction of the retry period.
RENEW_RETRY_FRACTION = 0.25
#: The shortest timeout a Lease request gets (below that it cannot succeed anyway).
MIN_REQUEST_TIMEOUT = 0.2

T = TypeVar("T")


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
        #: the leader replaces the Lease it wrote last without reading it first; a Conflict
        #: (or not leading) makes the next attempt read
        self._must_read = True
        #: Lease calls only (two: one may still be timing out while the next is sent)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lease")
        self._keeper: threading.Thread | None = None
        self._keep_stop = threading.Event()

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

    def _timeout_now(self) -> float:
        """A request's timeout: `_request_timeout`, and for the leader never beyond its
        renew deadline (a write that lands after it would be of no use: it has stopped)."""
        timeout = self._request_timeout
        last = self.last_renew
        if last is not None:
            timeout = min(timeout, last + self.timing.renew_deadline - self._clock())
        return max(MIN_REQUEST_TIMEOUT, timeout)

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

    def _read(self) -> None:
        lease = self.kube.read_lease(self.settings.namespace, self.settings.lease_name,
                                     self._timeout_now())
        self.observation = observe(self.observation, LeaseRecord.from_lease(lease),
                                   self._clock())
        self._must_read = False

    def _failed_wait(self) -> float:
        """After a failed request: the leader tries again soon (its deadline runs), a
        standby after the retry period."""
        if self.leader:
            return self.timing.retry_period * RENEW_RETRY_FRACTION
        return self.timing.retry_period

    def attempt_sync(self) -> float:
        """One round: read (unless the leader renews what it wrote), decide, write. Returns
        the seconds to wait before the next. Blocking: runs in a Lease thread."""
        s = self.settings
        if self._stepped_down:
            return 0.0
        self._check_deadline()
        if self._must_read or not self.leader or self.observation is None:
            try:
                self._read()
            except KubeError as exc:
                log.warning("could not read Lease %s/%s: %s", s.namespace, s.lease_name, exc)
                self._check_deadline()
                return self._failed_wait()
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
                written = self.kube.create_lease(s.namespace, decision.body,
                                                 self._timeout_now())
            else:
                written = self.kube.replace_lease(s.namespace, s.lease_name, decision.body,
                                                  self._timeout_now())
        except Conflict:
            # Someone wrote first (or our last write is not the current Lease): read and
            # decide again at once.
            log.info("Lease %s changed under us; re-reading", s.lease_name)
            self._must_read = True
            return 0.0
        except KubeError as exc:
            log.warning("could not %s Lease %s/%s: %s", decision.action.value, s.namespace,
                        s.lease_name, exc)
            self._check_deadline()
            return self._failed_wait()
        if self._stepped_down:
            return 0.0
        was_leader = self.leader
        self.last_renew = sent
        self.observation = observe(self.observation, LeaseRecord.from_lease(written), sent)
        if not was_leader:
            log.info("leadership acquired by %s (%s)", s.identity, decision.reason)
        return decision.wait

    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def attempt(self) -> float:
        """`attempt_sync` from the event loop (in a Lease thread)."""
        return await self._in_pool(self.attempt_sync)

    async def acquire(self) -> None:
        """Stand by until this replica holds the Lease."""
        log.info("standing by for Lease %s/%s as %s", self.settings.namespace,
                 self.settings.lease_name, self.settings.identity)
        while not self.leader:
            await asyncio.sleep(await self.attempt())

    def _keep_loop(self) -> None:
        wait = self.timing.retry_period
        while not self._keep_stop.wait(wait) and not self._stepped_down:
            try:
                wait = self.attempt_sync()
            except Exception:  # noqa: BLE001 - the guard still ends a leader that cannot renew
                log.exception("Lease renewal failed unexpectedly")
                wait = self._failed_wait()

    async def keep(self) -> None:
        """Renew every retry period until cancelled (a lost Lease ends the process), from a
        thread of its own: a busy event loop does not delay a renewal."""
        self._keep_stop.clear()
        self._keeper = threading.Thread(target=self._keep_loop, name="lease-renew",
                                        daemon=True)
        self._keeper.start()
        try:
            while self._keeper.is_alive():
                await asyncio.sleep(GUARD_INTERVAL)
        finally:
            self._keep_stop.set()

    async def _stop_keeping(self) -> None:
        """Stop the renewal thread and wait for an attempt in flight (its timeout bounds it)."""
        self._keep_stop.set()
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            await asyncio.to_thread(keeper.join, self._request_timeout + 1)

    async def release(self) -> None:
        """Hand over at once (graceful stop, after Kopf has stopped): no holder, 1 s."""
        s = self.settings
        await self._stop_keeping()
        record = self.observation.record if self.observation else None
        body = release_body(record, s.identity, self._wall(), s.namespace, s.lease_name)
        if body is not None and self.leader:
            try:
                await self._in_pool(self.kube.replace_lease, s.namespace, s.lease_name,
                                    body, self._timeout_now())
                log.info("Lease %s released by %s", s.lease_name, s.identity)
            except KubeError as exc:
                log.warning("could not release Lease %s (%s); a standby takes over when it "
                            "lapses", s.lease_name, exc)
        self.last_renew = None
        self._guard_stop.set()
        self._pool.shutdown(wait=False)
