"""The controller: per-store locks, backoff and timer decisions around the reconcile.

Kopf calls the async entry points; the blocking work (PostgreSQL, the Kubernetes client)
runs in a bounded thread pool, the event loop only schedules. A per-store asyncio lock
serialises the change handlers and the timer, and each reconcile re-reads the object from
the API (reconcile.py), so a decision is never taken on a stale status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
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
from .reconcile import RECONCILE_ERRORS, Reconciler
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
        #: thread: while there are any, the timer's drift-only checks wait (see `tick`)
        self.changes_pending = 0

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

    async def tick(self, body: Mapping[str, Any]) -> None:
        """The per-store timer: decide cheaply from the cached body whether work is due."""
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return
        state = self.state_for(meta["uid"])
        if state.lock.locked() or not state.handled:
            return
        if state.invalid_generation is not None and \
                state.invalid_generation == meta.get("generation"):
            return
        mono = time.monotonic()
        if state.failures:
            due = mono >= state.next_attempt
        else:
            due = self._work_due(body, state, mono)
        if due:
            async with state.lock:
                await self._reconcile_locked(state, meta["namespace"], meta["name"], "timer",
                                             "timer")

    def _work_due(self, body: Mapping[str, Any], state: ObjectState, mono: float) -> bool:
        """Whether the store needs a reconcile now: its status asks for one (`work_due`:
        not provisioned, rotating, rotation requested or scheduled), or its drift check is
        due. A drift check is a re-check of a Ready store, so it waits while change
        handlers are pending: when 1000 stores are created at once, the first ones' checks
        would otherwise take threads (and API and database time) from the provisioning of
        the rest. It runs at the first tick after they are done."""
        if work_due(body, self.clock()):
            return True
        return mono - state.last_full >= self.settings.drift_interval and \
            self.changes_pending == 0

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
        return Reconciler(self.settings, self.kube, self.database)

    def reconcile_sync(self, namespace: str, name: str, why: str) -> None:
        self._reconciler().reconcile(namespace, name, self.clock(), self._mark_invalid)

    def finalize_sync(self, body: Mapping[str, Any]) -> None:
        deletion.finalize(self._reconciler(), body, self.clock())


def work_due(body: Mapping[str, Any], now: datetime) -> bool:
    """Whether the store's status asks for a reconcile before the next drift check: not
    provisioned yet, a rotation in progress, requested or scheduled."""
    creds = rot.CredentialState.from_status(body.get("status") or {})
    if creds is None:
        return True
    if creds.phase != rot.STABLE:
        return True
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    request = annotations.get(ANNOTATION_ROTATE)
    if request and request != creds.handled_rotate_request:
        return True
    try:
        spec = parse_spec(body.get("spec") or {})
    except SpecError:
        return False
    due = rot.next_rotation_due(creds, spec.credentials)
    return due is not None and now >= due
