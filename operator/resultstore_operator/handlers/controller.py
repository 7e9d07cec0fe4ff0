"""The controller: per-store locks, backoff and the periodic checks around the reconcile.

Kopf calls the async entry points; the blocking work (PostgreSQL, the Kubernetes client)
runs in a bounded thread pool, the event loop only schedules. A per-store asyncio lock
serialises the change handlers and the periodic checks, and each reconcile re-reads the
object from the API (reconcile.py), so a decision is never taken on a stale status.

The periodic checks (drift checks, rotation progress, retries with backoff) are one loop of
the controller (`checks`), not a Kopf timer per store: every `tick_interval` it walks the
stores as the watch last showed them (`StoreView`, kept by the observe event handler), asks
the pure `due_checks` which are due, and runs them, at most `check_concurrency` at once
(each check that ends starts the next due one). At
1000 stores the per-store Kopf timers were a fifth of the leader's CPU (a task, a kwargs
build and a handler call per store every 5 s). The loop runs where Kopf runs: only on the
replica that holds the Lease (main.py), started by Kopf's startup and stopped by its cleanup.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import kopf

from .. import database as dbio
from .. import metrics
from ..builders import rotation as rot
from ..kube import Kube, new_api_client
from ..settings import OperatorSettings
from ..spec import ANNOTATION_ROTATE, ANNOTATION_SKIP_DB_CLEANUP, SpecError, parse_spec
from . import deletion
from .reconcile import RECONCILE_ERRORS, AdminSecrets, Reconciler
from .run import StoreApi

log = logging.getLogger("resultstore.operator")

T = TypeVar("T")


@dataclass
class ObjectState:
    """In-memory bookkeeping per store (lost on restart, which only costs one extra check)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    failures: int = 0
    next_attempt: float = 0.0
    last_full: float = 0.0
    invalid_generation: int | None = None
    # A change handler (create/resume/spec/rotate) has run: until then the timer leaves the
    # store alone, so a new store is attempted once (by create), not by a racing tick too.
    handled: bool = False


#: `StoreView.asks_at` of a store whose status asks for work at once
AT_ONCE = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True)
class StoreView:
    """What the periodic checks need of a store, from its last watch event (small: 1000 of
    them are kept; the body itself is not)."""

    uid: str
    namespace: str
    name: str
    generation: int | None
    deleting: bool
    #: when the store's status asks for a reconcile (`status_due`), None: only drift checks
    asks_at: datetime | None

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> StoreView:
        meta = body.get("metadata") or {}
        return cls(str(meta.get("uid") or ""), str(meta.get("namespace") or ""),
                   str(meta.get("name") or ""), meta.get("generation"),
                   bool(meta.get("deletionTimestamp")), status_due(body))


def _now() -> datetime:
    return datetime.now(UTC)


class Controller:
    """Owns the per-store state, the thread pool, the API client and the database seam.

    `kube` and `database` default to the real ones (the API client is made on first use);
    the unit tests pass in-memory ones (tests/unit/fake_kube.py, fake_database.py).
    """

    def __init__(self, settings: OperatorSettings, kube: StoreApi | None = None,
                 database: dbio.Database | None = None,
                 clock: Callable[[], datetime] = _now) -> None:
        self.settings = settings
        self._kube = kube
        # One admin pool per server and admin credentials, as large as the thread pool
        # (the reconcile threads are its only users), instead of a connection per reconcile.
        self.database: dbio.Database = database or dbio.Postgres(
            dbio.AdminEngines(size=settings.workers, overflow=settings.workers))
        self.clock = clock
        self.executor = ThreadPoolExecutor(max_workers=settings.workers,
                                           thread_name_prefix="reconcile")
        self.states: dict[str, ObjectState] = {}
        #: change-handler reconciles (create/resume/spec/rotate) waiting for or holding a
        #: thread: while there are any, the drift-only checks wait (see `due_checks`)
        self.changes_pending = 0
        #: the stores as the watch last showed them, by uid (`observe`)
        self.views: dict[str, StoreView] = {}
        #: uids whose periodic check is running (started by `start_due`)
        self.checking: set[str] = set()
        #: at most this many periodic checks at once: half the threads, so that a change
        #: handler always finds one soon (and 1000 due checks are never 1000 tasks)
        self.check_concurrency = max(1, settings.workers // 2)
        self._checks_task: asyncio.Task[None] | None = None
        #: the current pass's due checks not started yet (uids, most overdue first)
        self._queue: collections.deque[str] = collections.deque()
        #: admin credentials by Secret version, shared by the reconciles (reconcile.py)
        self.admin_secrets = AdminSecrets()

    @property
    def kube(self) -> StoreApi:
        if self._kube is None:
            # Connections for every reconcile thread (and a spare): the client's default
            # pool (5 per CPU) made the threads beyond it open and drop a TLS connection
            # per request.
            self._kube = Kube(new_api_client(pool_size=self.settings.workers + 4))
        return self._kube

    def state_for(self, uid: str) -> ObjectState:
        state = self.states.get(uid)
        if state is None:
            state = self.states[uid] = ObjectState()
        return state

    def _mark_invalid(self, uid: str, generation: int | None) -> None:
        self.state_for(uid).invalid_generation = generation

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, fn, *args)

    # --- async entry points (called by Kopf) ------------------------------------------------

    async def reconcile(self, body: Mapping[str, Any], why: str, handler: str) -> None:
        """Change handlers: converge now; an invalid spec fails permanently (until edited).

        `handler` is the Kopf handler id, the `handler` label of the reconcile metrics."""
        meta = body.get("metadata") or {}
        state = self.state_for(meta["uid"])
        self.changes_pending += 1
        try:
            async with state.lock:
                state.handled = True
                error = await self._reconcile_locked(state, meta["namespace"], meta["name"],
                                                     why, handler)
        finally:
            self.changes_pending -= 1
        if error is not None:
            raise kopf.PermanentError(f"invalid spec: {error}")

    async def _reconcile_locked(self, state: ObjectState, namespace: str, name: str,
                                why: str, handler: str) -> SpecError | None:
        """Run one reconcile; transient failures schedule a retry with backoff (the timer
        performs it), so there is exactly one retry mechanism."""
        started = time.monotonic()
        try:
            await self._in_thread(self.reconcile_sync, namespace, name, why)
        except Exception as exc:
            metrics.record_reconcile(handler, exc, time.monotonic() - started)
            return self._reconcile_failed(state, namespace, name, exc)
        metrics.record_reconcile(handler, None, time.monotonic() - started)
        state.failures = 0
        state.invalid_generation = None
        state.last_full = time.monotonic()
        log.debug("%s/%s reconciled (%s) in %.3fs", namespace, name, why,
                  time.monotonic() - started)
        return None

    def _reconcile_failed(self, state: ObjectState, namespace: str, name: str,
                          exc: Exception) -> SpecError | None:
        """Book-keeping after a failed reconcile: an invalid spec is returned (the caller
        fails permanently); anything else schedules a retry with backoff."""
        if isinstance(exc, SpecError):
            state.failures = 0
            return exc
        state.failures += 1
        delay = self.settings.backoff(state.failures)
        state.next_attempt = time.monotonic() + delay
        if isinstance(exc, RECONCILE_ERRORS):
            log.warning("%s/%s: reconcile failed (%s: %s), retrying in %.0fs", namespace,
                        name, exc.__class__.__name__, getattr(exc, "reason", "-"), delay)
        else:
            log.error("%s/%s: unexpected reconcile error, retrying in %.0fs", namespace,
                      name, delay, exc_info=exc)
        return None

    # --- the periodic checks --------------------------------------------------------------------

    def observe(self, body: Mapping[str, Any], event_type: str | None) -> None:
        """A watch event of a store: keep its view (DELETED forgets it)."""
        view = StoreView.of(body)
        if not view.uid:
            return
        if event_type == "DELETED":
            self.views.pop(view.uid, None)
        else:
            self.views[view.uid] = view

    def start_due(self) -> list[asyncio.Task[None]]:
        """A pass: the checks due now, most overdue first, become the queue; start as many
        as `check_concurrency` allows (returns them). Each check that ends starts the next
        of the queue (`_fill`), so the pass runs at the threads' pace, not one batch per
        tick: at 1000 stores a drift round needs ~17 checks a second."""
        self._queue = collections.deque(
            v.uid for v in due_checks(self.views.values(), self.states, self.clock(),
                                      time.monotonic(), self.settings.drift_interval,
                                      self.changes_pending > 0, self.checking))
        return self._fill()

    def _fill(self) -> list[asyncio.Task[None]]:
        """Start queued checks while slots are free; each is decided again right before it
        starts (a change handler may have run it meanwhile, or taken its lock)."""
        started: list[asyncio.Task[None]] = []
        now, mono = self.clock(), time.monotonic()
        while self._queue and len(self.checking) < self.check_concurrency:
            uid = self._queue.popleft()
            view = self.views.get(uid)
            if view is None or uid in self.checking or not check_due(
                    view, self.states.get(uid), now, mono, self.settings.drift_interval,
                    self.changes_pending > 0):
                continue
            self.checking.add(uid)
            started.append(asyncio.ensure_future(self._check(view)))
        return started

    async def _check(self, view: StoreView) -> None:
        try:
            state = self.state_for(view.uid)
            async with state.lock:
                await self._reconcile_locked(state, view.namespace, view.name, "timer",
                                             "timer")
        finally:
            self.checking.discard(view.uid)
            if self._queue:
                self._fill()

    async def checks(self) -> None:
        """The periodic loop: every `tick_interval`, start the checks that are due."""
        while True:
            try:
                self.start_due()
            except Exception:  # noqa: BLE001 - one bad pass must not end the checks
                log.exception("periodic checks: pass failed")
            await asyncio.sleep(self.settings.tick_interval)

    def start_checks(self) -> None:
        """Start the periodic loop (Kopf's startup, on the leader only)."""
        if self._checks_task is None or self._checks_task.done():
            self._checks_task = asyncio.ensure_future(self.checks())

    async def stop_checks(self) -> None:
        """Stop the loop (Kopf's cleanup); checks in flight finish under their lock."""
        task, self._checks_task = self._checks_task, None
        self._queue.clear()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def finalize(self, body: Mapping[str, Any], retry: int) -> None:
        meta = body.get("metadata") or {}
        state = self.state_for(meta["uid"])
        async with state.lock:
            started = time.monotonic()
            try:
                await self._in_thread(self.finalize_sync, dict(body))
            except Exception as exc:
                metrics.record_reconcile("finalize", exc, time.monotonic() - started)
                if not isinstance(exc, RECONCILE_ERRORS):
                    raise
                raise kopf.TemporaryError(
                    f"database cleanup failed ({getattr(exc, 'reason', 'error')}); set the "
                    f"annotation {ANNOTATION_SKIP_DB_CLEANUP}=\"true\" to delete without it",
                    delay=self.settings.backoff(retry + 1)) from None
            metrics.record_reconcile("finalize", None, time.monotonic() - started)
        self.states.pop(meta["uid"], None)

    # --- synchronous work (runs in the thread pool) -----------------------------------------

    def _reconciler(self) -> Reconciler:
        return Reconciler(self.settings, self.kube, self.database, self.admin_secrets)

    def reconcile_sync(self, namespace: str, name: str, why: str) -> None:
        self._reconciler().reconcile(namespace, name, self.clock(), self._mark_invalid)

    def finalize_sync(self, body: Mapping[str, Any]) -> None:
        deletion.finalize(self._reconciler(), body, self.clock())


def status_due(body: Mapping[str, Any]) -> datetime | None:
    """When the store's status asks for a reconcile before its next drift check: AT_ONCE
    when not provisioned yet or a rotation is in progress or requested, the scheduled
    rotation's time, or None (nothing asked: drift checks only)."""
    creds = rot.CredentialState.from_status(body.get("status") or {})
    if creds is None or creds.phase != rot.STABLE:
        return AT_ONCE
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    request = annotations.get(ANNOTATION_ROTATE)
    if request and request != creds.handled_rotate_request:
        return AT_ONCE
    try:
        spec = parse_spec(body.get("spec") or {})
    except SpecError:
        return None
    return rot.next_rotation_due(creds, spec.credentials)


def check_due(view: StoreView, state: ObjectState | None, now: datetime, mono: float,
              drift_interval: float, provisioning: bool) -> bool:
    """Whether the periodic check of one store is due (`now`: wall clock, for a scheduled
    rotation; `mono`: the monotonic clock of `ObjectState`'s times).

    Never for a store being deleted, one no change handler has seen yet (the create handler
    attempts a new store first), one whose lock is held, or an invalid spec of the current
    generation. A failed store is due when its backoff has passed; otherwise when its status
    asks for work, or for a drift check `drift_interval` after its last full reconcile. A
    drift check is a re-check of a Ready store, so it waits while change handlers are
    pending (`provisioning`): when 1000 stores are created at once, the first ones' checks
    would otherwise take threads from the provisioning of the rest."""
    if view.deleting or state is None or not state.handled or state.lock.locked():
        return False
    if state.invalid_generation is not None and state.invalid_generation == view.generation:
        return False
    if state.failures:
        return mono >= state.next_attempt
    if view.asks_at is not None and now >= view.asks_at:
        return True
    return not provisioning and mono - state.last_full >= drift_interval


def due_checks(views: Iterable[StoreView], states: Mapping[str, ObjectState], now: datetime,
               mono: float, drift_interval: float, provisioning: bool,
               running: Iterable[str] = ()) -> list[StoreView]:
    """The stores whose periodic check is due (`check_due`) and not `running`, the most
    overdue first: retries and work the status asks for before drift checks, each by how
    long it has waited."""
    skip = set(running)
    due = []
    for view in views:
        if view.uid in skip:
            continue
        state = states.get(view.uid)
        if check_due(view, state, now, mono, drift_interval, provisioning):
            assert state is not None
            asked = state.failures > 0 or (view.asks_at is not None and now >= view.asks_at)
            since = state.next_attempt if state.failures else state.last_full
            due.append((not asked, since, view.uid, view))
    due.sort(key=lambda item: item[:3])
    return [item[3] for item in due]
