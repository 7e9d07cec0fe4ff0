"""Events about pods that went uninjected: when one is deserved (pure), its body (pure), and
the aggregator that folds repeats into one Event per (namespace, store, reason).

Why so careful (issue 14): an admission *warning* goes back only to the caller, so answering
a forged review costs nothing; an *Event* is written into a namespace and would let a caller
spam any namespace about objects it names. So an Event is posted only when (a) the review has
the exact shape the API server sends (admission.review_problem), (b) it is no dry run, (c)
the ResultStore it names exists (looked up in the API, so a caller cannot conjure Events
about stores that are not there), and (d) it concerns that store, not an object the caller
named: the Event's involvedObject is the ResultStore. Repeats are aggregated in one Event
per key whose ``count`` grows (at most one API write per key and window), in a bounded
in-memory cache: 301 reviews give one Event.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..api import API_VERSION, CORE_VERSION, EVENT_KIND, KIND
from ..injection import InjectionPlan, StoreLookup, StoreState
from ..settings import WEBHOOK_COMPONENT
from .admission import AdmissionRequest

log = logging.getLogger("resultstore.webhook")

#: Event reasons only for a store that exists (the lookup found it): a missing store or an
#: unanswered lookup gives the admission warning alone, never an Event.
EVENT_STATES = frozenset({StoreState.READY, StoreState.NOT_READY})
#: Characters of an Event's message.
MAX_MESSAGE = 1000


def event_reason_for(admission: AdmissionRequest, plan: InjectionPlan,
                     lookup: StoreLookup) -> str | None:
    """The reason of the Event this admission deserves, or None for no Event (pure)."""
    if admission.problem is not None or admission.dry_run or not plan.event_reason:
        return None
    if plan.store is None or lookup.state not in EVENT_STATES:
        return None
    return plan.event_reason


def event_timestamp(now: dt.datetime) -> str:
    """An Event's first/lastTimestamp (whole seconds, UTC, as the API server writes them)."""
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def _event_name(base: str) -> str:
    base = base.strip("-.")[:200] or "resultstore"
    return f"{base}.{uuid.uuid4().hex[:12]}"


def build_event(namespace: str, store: str, reason: str, message: str, count: int = 1, *,
                now: dt.datetime, instance: str,
                component: str = WEBHOOK_COMPONENT) -> dict[str, Any]:
    """A Warning Event on the ResultStore saying why labelled pods went uninjected.

    The ResultStore (which exists: see :func:`event_reason_for`) is the involved object, not
    an object named in the review, and ``count`` aggregates repeats. ``instance`` (the
    replica: the settings' ``instance``, read once at start-up) and ``now`` are passed in.
    """
    stamp = event_timestamp(now)
    return {
        "apiVersion": CORE_VERSION,
        "kind": EVENT_KIND,
        "metadata": {"name": _event_name(store), "namespace": namespace},
        "involvedObject": {"apiVersion": API_VERSION, "kind": KIND,
                           "name": store, "namespace": namespace},
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "type": "Warning",
        "source": {"component": component},
        "reportingComponent": component,
        "reportingInstance": instance[:128],
        "action": "Inject",
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": count,
    }


EventKey = tuple[str, str, str]  # (namespace, store, reason)
CreateFn = Callable[[Mapping[str, Any]], Awaitable[None]]
#: (namespace, event name, count, lastTimestamp, message) -> None
UpdateFn = Callable[[str, str, int, str, str], Awaitable[None]]


@dataclass
class _Aggregate:
    namespace: str
    store: str
    reason: str
    message: str
    count: int = 0
    posted: int = 0
    name: str | None = None
    last_post: float = float("-inf")
    task: asyncio.Task[None] | None = None


class EventAggregator:
    """One Event per (namespace, store, reason), its ``count`` following the occurrences.

    At most one API write per key and ``window`` seconds (the first occurrence is posted at
    once, later ones are folded into a count update), and at most ``max_keys`` keys in
    memory (least recently seen dropped): a flood of reviews costs a bounded number of API
    writes and bytes, whatever its size.
    """

    def __init__(self, create: CreateFn, update: UpdateFn | None, window: float,
                 max_keys: int = 1024, *, instance: str, component: str = WEBHOOK_COMPONENT,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        self._create = create
        self._update = update
        self._instance = instance
        self._component = component
        self._clock = clock
        self.window = window
        self.max_keys = max_keys
        self._entries: OrderedDict[EventKey, _Aggregate] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def count(self, key: EventKey) -> int:
        entry = self._entries.get(key)
        return entry.count if entry else 0

    def record(self, namespace: str, store: str, reason: str, message: str) -> None:
        key = (namespace, store, reason)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Aggregate(namespace, store, reason, message)
            while len(self._entries) > self.max_keys:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        entry.count += 1
        entry.message = message
        if entry.task is None:
            entry.task = asyncio.get_running_loop().create_task(self._flush(entry))

    async def _write(self, entry: _Aggregate, count: int) -> None:
        """One API write: the Event created, or its count raised."""
        if entry.name is None:
            body = build_event(entry.namespace, entry.store, entry.reason, entry.message,
                               count, now=self._clock(), instance=self._instance,
                               component=self._component)
            await self._create(body)
            entry.name = body["metadata"]["name"]
        elif self._update is not None:
            await self._update(entry.namespace, entry.name, count,
                               event_timestamp(self._clock()), entry.message[:MAX_MESSAGE])

    async def _flush(self, entry: _Aggregate) -> None:
        """Bring the API's Event up to the entry's count; one writer per key at a time."""
        try:
            while entry.posted != entry.count:
                wait = entry.last_post + self.window - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                count = entry.count
                try:
                    await self._write(entry, count)
                except Exception as exc:
                    # Best effort: the next occurrence tries again (a fresh Event if the
                    # old one expired or could not be updated).
                    log.warning("could not post Event %s in %s: %s", entry.reason,
                                entry.namespace, type(exc).__name__)
                    entry.name = None
                    entry.last_post = time.monotonic()
                    entry.posted = entry.count
                    return
                entry.posted = count
                entry.last_post = time.monotonic()
        finally:
            entry.task = None

    async def stop(self) -> None:
        tasks = [e.task for e in self._entries.values() if e.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
