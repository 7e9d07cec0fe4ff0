"""The canvas scenarios of the differential test, as plain data plus small functions.

Each scenario takes a :class:`Ctx` (a client app, its tasks and a tag private to this run)
and returns an *observation*: plain data of what a Celery user sees - return values,
raised exception types and args, states, ``children``/``parent`` shapes, the type of
``date_done`` and the extended fields. Ids are replaced by their shape and uuids inside
strings by ``<id>``, so observations of different runs (and backends) compare equal when,
and only when, the caller saw the same Celery. Values keep their exact types (a tuple is
not a list, a namedtuple is not a tuple): observations are compared as ``pprint`` text.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from types import SimpleNamespace
from typing import Any

import redis
from celery import Celery, chain, chord, group
from celery.exceptions import ChordError
from celery.result import AsyncResult, GroupResult, ResultSet
from celery.utils import uuid

from tests.helpers import waiting

TIMEOUT = 60.0
BIG = 10 * 1024 * 1024
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TAG = re.compile(r"tag-[0-9a-f]{16}")
_ADDR = re.compile(r"0x[0-9a-f]+")  # object addresses inside reprs


def new_tag() -> str:
    """A tag private to one run of one scenario (replaced by ``<tag>`` in observations)."""
    return "tag-" + secrets.token_hex(8)


@dataclass
class Ctx:
    """What a scenario runs with: one backend's client app, its tasks and a private tag."""

    app: Celery
    t: SimpleNamespace
    tag: str
    queue: str
    worker_name: str
    redis: redis.Redis  # the broker's Redis, where tasks record side effects


# ----------------------------------------------------------------------------- normalising


def norm(value: Any) -> Any:
    """Plain data of a value as the caller sees it, ids replaced by shapes."""
    if isinstance(value, (AsyncResult, ResultSet)):
        return shape(value)
    if isinstance(value, BaseException):
        cls = type(value)
        return {"exc": f"{cls.__module__}.{cls.__qualname__}", "args": norm(value.args)}
    if isinstance(value, str):
        return _ADDR.sub("0x?", _TAG.sub("<tag>", _UUID.sub("<id>", value)))
    if isinstance(value, dict):
        return {norm(k): norm(v) for k, v in value.items()}
    if isinstance(value, list):
        return [norm(v) for v in value]
    if isinstance(value, tuple):
        items = [norm(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


def shape(result: Any) -> Any:
    """The structure of a result (which ids are groups of which), without the ids."""
    if result is None:
        return None
    if isinstance(result, GroupResult):
        return {"group": [shape(r) for r in result.results]}
    if isinstance(result, ResultSet):
        return {"set": [shape(r) for r in result.results]}
    if isinstance(result, AsyncResult):
        return "task"
    return {"unexpected": type(result).__name__}


def outcome(call: Callable[[], Any]) -> dict[str, Any]:
    """What a call returned or raised."""
    try:
        return {"value": norm(call())}
    except Exception as exc:  # the observation is the exception itself
        return {"raised": norm(exc)}


def date_kind(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, datetime):
        return {"type": "datetime", "aware": value.tzinfo is not None,
                "utc": value.utcoffset() is not None and not value.utcoffset()}
    return {"type": type(value).__name__}


def parents(result: AsyncResult) -> list[Any]:
    chain_of: list[Any] = []
    node = result.parent
    while node is not None and len(chain_of) < 20:
        chain_of.append(shape(node))
        node = getattr(node, "parent", None)
    return chain_of


def describe(ctx: Ctx, result: AsyncResult) -> dict[str, Any]:
    """Everything AsyncResult shows about a finished (or never run) task."""
    children = result.children
    return {
        "state": result.state, "ready": result.ready(), "successful": result.successful(),
        "failed": result.failed(), "result": norm(result.result),
        "traceback": None if result.traceback is None else ("Traceback" in result.traceback),
        "date_done": date_kind(result.date_done),
        "children": None if children is None else [shape(c) for c in children],
        "parent": parents(result),
        "name": result.name, "args": norm(result.args), "kwargs": norm(result.kwargs),
        "queue": "<queue>" if result.queue == ctx.queue else result.queue,
        "worker": None if result.worker is None else result.worker == ctx.worker_name,
        "retries": result.retries,
    }


def describe_group(ctx: Ctx, result: GroupResult) -> dict[str, Any]:
    return {
        "shape": shape(result), "ready": result.ready(), "successful": result.successful(),
        "failed": result.failed(), "completed_count": result.completed_count(),
        "parent": None if result.parent is None else shape(result.parent),
        "results": [describe(ctx, r) if not isinstance(r, GroupResult)
                    else describe_group(ctx, r) for r in result.results],
    }


def eventually(check: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll ``check`` until it returns a true value; fail naming ``what`` otherwise (the
    tests' helper, in the scenarios' argument order and with a short interval)."""
    return waiting.eventually(check, timeout, what, interval=0.05)


def records(ctx: Ctx, count: int, key: str | None = None) -> list[Any]:
    """The ``count`` entries errback tasks pushed under the tag (sorted, for determinism)."""
    name = f"diff:{key or ctx.tag}"
    eventually(lambda: ctx.redis.llen(name) >= count, f"{count} record(s) under {name}")
    entries = [json.loads(e) for e in ctx.redis.lrange(name, 0, -1)]
    return sorted(entries, key=lambda e: json.dumps(e, sort_keys=True))


def counter(ctx: Ctx, key: str) -> int:
    return int(ctx.redis.get(f"diff:{key}:{ctx.tag}") or 0)


def fresh(ctx: Ctx, task_id: str) -> AsyncResult:
    """A result object without the client's cached meta (what another process sees)."""
    ctx.app.backend._cache.pop(task_id, None)
    return AsyncResult(task_id, app=ctx.app)


# ----------------------------------------------------------------------------- scenarios


def single_success(ctx: Ctx) -> Any:
    r = ctx.t.add.delay(2, 3)
    return {"get": outcome(lambda: r.get(timeout=TIMEOUT)), "result": describe(ctx, r),
            "fresh": describe(ctx, fresh(ctx, r.id))}


def single_failure(ctx: Ctx) -> Any:
    r = ctx.t.fail.delay("boom")
    return {"get": outcome(lambda: r.get(timeout=TIMEOUT)),
            "get_no_propagate": outcome(lambda: r.get(timeout=TIMEOUT, propagate=False)),
            "result": describe(ctx, r)}


def meta_dict(ctx: Ctx) -> Any:
    """``backend.get_task_meta``: the dict Celery's own code and tools read (types only)."""
    t = ctx.t
    g = group(t.add.s(1, 1), t.fail.s("meta")).apply_async()
    g.get(timeout=TIMEOUT, propagate=False)
    c = chain(t.add.s(1, 1), t.add.s(2)).apply_async()
    c.get(timeout=TIMEOUT)
    c.parent.get(timeout=TIMEOUT)
    obs = {}
    for name, task_id in (("group_ok", g.results[0].id), ("group_failed", g.results[1].id),
                          ("chain_first", c.parent.id), ("chain_last", c.id),
                          ("unknown", uuid())):
        ctx.app.backend._cache.pop(task_id, None)
        meta = ctx.app.backend.get_task_meta(task_id)
        obs[name] = {k: type(v).__name__ for k, v in sorted(meta.items())}
        # which id: the group's own, the first step's (AsyncResult exposes neither)
        for key, owner in (("group_id", g.id), ("parent_id", c.parent.id)):
            if key in meta:
                obs[name][f"{key}_is"] = meta[key] == owner
    return obs


def unknown_id(ctx: Ctx) -> Any:
    r = AsyncResult(uuid(), app=ctx.app)
    return {"result": describe(ctx, r), "info": norm(r.info)}


def on_message_callback(ctx: Ctx) -> Any:
    """``get(on_message=...)`` sees the final state. The task sleeps because Celery itself
    (Redis too) reads a result that is already stored before it installs ``on_message``."""
    seen: list[str] = []
    r = ctx.t.sleep_then.delay(42, 1.0)
    value = outcome(lambda: r.get(timeout=TIMEOUT, on_message=lambda m: seen.append(
        m["status"])))
    return {"get": value, "last_message": seen[-1] if seen else None}


def chain_simple(ctx: Ctx) -> Any:
    t = ctx.t
    c = chain(t.add.s(1, 1), t.add.s(10), t.add.s(100)).apply_async()
    value = outcome(lambda: c.get(timeout=TIMEOUT))
    first = c.parent.parent
    # a chain sends the next step before it stores its own result: wait for each step
    c.parent.get(timeout=TIMEOUT)
    first.get(timeout=TIMEOUT)
    return {"get": value, "result": describe(ctx, c), "middle": describe(ctx, c.parent),
            "first": describe(ctx, first),
            "first_child_is_middle": [ch.id for ch in first.children or []] == [c.parent.id]}


def chain_failing_middle(ctx: Ctx) -> Any:
    t = ctx.t
    c = chain(t.add.s(1, 1), t.fail.si("middle"), t.add.s(100)).apply_async()
    value = outcome(lambda: c.get(timeout=TIMEOUT))
    c.parent.get(timeout=TIMEOUT, propagate=False)
    c.parent.parent.get(timeout=TIMEOUT)
    # the step that never ran is failed by the middle one's worker; read what is stored
    # (the Redis client's cached copy of it has been seen without its children list).
    # Its children: Redis itself answers None in some runs and [] in others (a cold CI run
    # of 2026-12-02 saw None, every other run []); both say "no children", so they are
    # compared as one value here and nowhere else.
    never_ran = describe(ctx, fresh(ctx, c.id))
    never_ran["children"] = never_ran["children"] or []
    return {"get": value, "result": never_ran,
            "middle": describe(ctx, c.parent),
            "first": describe(ctx, c.parent.parent)}


def group_simple(ctx: Ctx) -> Any:
    g = group(ctx.t.add.s(i, i) for i in range(6)).apply_async()
    return {"get": outcome(lambda: g.get(timeout=TIMEOUT)),
            "join": outcome(lambda: g.join(timeout=TIMEOUT)),
            "join_native": outcome(lambda: g.join_native(timeout=TIMEOUT)),
            "iter_native": outcome(lambda: sorted(
                (meta["status"], meta["result"]) for _, meta in g.iter_native(timeout=TIMEOUT))),
            "group": describe_group(ctx, g)}


def group_with_failure(ctx: Ctx) -> Any:
    t = ctx.t
    g = group(t.add.s(1, 1), t.fail.s("in group"), t.add.s(2, 2)).apply_async()
    return {"get": outcome(lambda: g.get(timeout=TIMEOUT)),
            "get_no_propagate": outcome(lambda: g.get(timeout=TIMEOUT, propagate=False)),
            "join_no_propagate": outcome(lambda: g.join(timeout=TIMEOUT, propagate=False)),
            "group": describe_group(ctx, g)}


def _chord_obs(ctx: Ctx, c: AsyncResult) -> dict[str, Any]:
    value = outcome(lambda: c.get(timeout=TIMEOUT))
    return {"get": value, "get_no_propagate": outcome(
        lambda: c.get(timeout=TIMEOUT, propagate=False)), "result": describe(ctx, c)}


def chord_header_task(ctx: Ctx) -> Any:
    t = ctx.t
    return _chord_obs(ctx, chord(t.add.s(2, 2), t.tsum.s()).apply_async())


def chord_header_group(ctx: Ctx) -> Any:
    t = ctx.t
    return _chord_obs(ctx, chord(group(t.add.s(i, 1) for i in range(5)))(t.tsum.s()))


def chord_header_chain(ctx: Ctx) -> Any:
    t = ctx.t
    return _chord_obs(ctx, chord([chain(t.add.s(1, 1), t.add.s(10)), t.add.s(3, 3)])(
        t.tsum.s()))


def chord_header_one_chain(ctx: Ctx) -> Any:
    t = ctx.t
    return _chord_obs(ctx, chord([chain(t.add.s(1, 1), t.add.s(10))], t.echo.s()).apply_async())


def chord_fails_at_start(ctx: Ctx) -> Any:
    """The first header part fails at once; the others finish later."""
    t = ctx.t
    c = chord([t.fail.s("first"), t.sleep_then.s(1, 0.3), t.sleep_then.s(2, 0.3)])(t.tsum.s())
    return _chord_obs(ctx, c)


def chord_fails_at_end(ctx: Ctx) -> Any:
    """The last header part to finish is the one that fails."""
    t = ctx.t
    c = chord([t.add.s(1, 1), t.add.s(2, 2), t.fail_after.s("last", 0.3)])(t.tsum.s())
    return _chord_obs(ctx, c)


def chord_nested(ctx: Ctx) -> Any:
    t = ctx.t
    inner = chord([t.add.s(1, 1), t.add.s(2, 2)], t.tsum.s())
    return _chord_obs(ctx, chord([inner, t.add.s(3, 3)])(t.echo.s()))


def chord_body_chord(ctx: Ctx) -> Any:
    t = ctx.t
    body = chord([t.add.s(1, 1), t.add.s(2, 2)], t.tsum.s())
    c = chain(chord([t.add.s(5, 5), t.add.s(6, 6)], t.tsum.s()), body).apply_async()
    return _chord_obs(ctx, c)


def chord_of_groups(ctx: Ctx) -> Any:
    t = ctx.t
    header = [group(t.add.s(1, 1), t.add.s(2, 2)), group(t.add.s(3, 3), t.add.s(4, 4))]
    return _chord_obs(ctx, chord(header)(t.echo.s()))


def chord_body_chain(ctx: Ctx) -> Any:
    t = ctx.t
    c = chord([t.add.s(1, 1), t.add.s(2, 2)])(chain(t.tsum.s(), t.add.s(100), t.add.s(1000)))
    obs = _chord_obs(ctx, c)
    parent = c.parent
    if isinstance(parent, AsyncResult) and not isinstance(parent, GroupResult):
        parent.get(timeout=TIMEOUT)  # stored after it sent the next step
        obs["body_parent"] = describe(ctx, parent)
    else:
        obs["body_parent"] = shape(parent)
    return obs


def chord_failing_body(ctx: Ctx) -> Any:
    t = ctx.t
    return _chord_obs(ctx, chord([t.add.s(1, 1), t.add.s(2, 2)])(t.fail.si("body")))


def chord_error_errbacks(ctx: Ctx) -> Any:
    """A failing header: the body's new-style errback sees what the chord reports.

    The header fails while the caller waits. (A header failing in the instant between
    get()'s first look at the parents and its first read of the body is a race in Celery
    itself: the Redis backend then raises the body's ChordError as well.)"""
    t = ctx.t
    body = t.tsum.s().on_error(t.errback_new.s(ctx.tag))
    c = chord([t.add.s(1, 1), t.fail_after.s("header", 0.3)])(body)
    obs = _chord_obs(ctx, c)
    entries = records(ctx, 1)
    for e in entries:
        e["request_id"] = e["request_id"] == c.id
    obs["errbacks"] = norm(entries)
    return obs


def chord_failed_before_get(ctx: Ctx) -> Any:
    """The header fails and the body's ChordError is stored *before* ``get()`` starts.

    Gated by a separate read of the body's state (``get_task_meta(cache=False)``, which
    leaves the result object unread). ``AsyncResult.get`` checks the parents before it
    waits (``_maybe_reraise_parent_error``), so both backends raise the header's own
    exception although the drain loop, finding the body ready at its first read, never
    calls ``on_interval``; without ``follow_parents`` it is the body's ChordError."""
    t = ctx.t
    c = chord([t.add.s(1, 1), t.fail.s("header")])(t.tsum.s())
    backend = ctx.app.backend
    eventually(lambda: backend.get_task_meta(c.id, cache=False)["status"] == "FAILURE",
               "the chord body's FAILURE")
    assert c._cache is None, "the gate must not have read the result object itself"
    return {"get": outcome(lambda: c.get(timeout=TIMEOUT)),
            "get_no_follow": outcome(lambda: c.get(timeout=TIMEOUT, follow_parents=False)),
            "get_no_propagate": outcome(lambda: c.get(timeout=TIMEOUT, propagate=False)),
            "result": describe(ctx, c),
            "header": describe_group(ctx, c.parent) if isinstance(c.parent, GroupResult)
            else shape(c.parent)}


class _HeaderFailsAfterParentsCheck(AsyncResult):
    """A chord body's result whose header fails right after ``get()`` looked at the
    parents: a deterministic stand-in for that instant of a live run (the hook runs once,
    in the caller, between Celery's own steps; nothing of the backend is replaced)."""

    fail_header: Callable[[], None] | None = None

    def _maybe_reraise_parent_error(self) -> None:
        super()._maybe_reraise_parent_error()
        hook, self.fail_header = self.fail_header, None
        if hook is not None:
            hook()


def chord_header_fails_during_get(ctx: Ctx) -> Any:
    """The header fails (and the body's ChordError is stored) after ``get()`` checked the
    parents and before its first read of the body: the read finds the body ready, Celery's
    drain loop (``while not p.ready``) then never calls ``on_interval``, and the Redis
    backend raises the body's ChordError; so must resultstore. A later ``get()`` raises
    the header's exception (its parents check finds the failed part)."""
    app, backend = ctx.app, ctx.app.backend
    ok, bad, body_id = uuid(), uuid(), uuid()
    header = GroupResult(uuid(), [AsyncResult(ok, app=app), AsyncResult(bad, app=app)],
                         app=app)
    backend.store_result(ok, 2, "SUCCESS")
    body = _HeaderFailsAfterParentsCheck(body_id, app=app, parent=header)

    def fail() -> None:
        exc = ValueError("header")
        backend.mark_as_failure(bad, exc)
        backend.mark_as_failure(body_id, ChordError(f"Dependency {bad} raised {exc!r}"))

    body.fail_header = fail
    during = outcome(lambda: body.get(timeout=TIMEOUT))
    assert body.fail_header is None, "get() did not check the parents"
    header_again = GroupResult(header.id, [AsyncResult(ok, app=app),
                                           AsyncResult(bad, app=app)], app=app)
    later = AsyncResult(body_id, app=app, parent=header_again)
    backend._cache.pop(body_id, None)
    # not describe(): stored here without a request, Redis keeps children None where
    # resultstore reads [] (a difference of request-less stores, not of this instant)
    return {"get_during": during, "get_later": outcome(lambda: later.get(timeout=TIMEOUT)),
            "state": later.state, "result": norm(later.result),
            "date_done": date_kind(later.date_done), "parent": parents(later)}


def chord_header_retry(ctx: Ctx) -> Any:
    """A header part that retries counts once, when it finally succeeds."""
    t = ctx.t
    return _chord_obs(ctx, chord([t.retry_then.s(ctx.tag, 2), t.add.s(1, 1)])(t.echo.s()))


def chord_empty_header(ctx: Ctx) -> Any:
    t = ctx.t
    return _chord_obs(ctx, chord([])(t.tsum.s()))


def chord_body_group(ctx: Ctx) -> Any:
    t = ctx.t
    res = chord([t.add.s(1, 1), t.add.s(2, 2)])(group(t.tsum.s(), t.echo.s()))
    value = outcome(lambda: res.get(timeout=TIMEOUT))
    return {"get": value, "shape": shape(res)}


def chord_json_values(ctx: Ctx) -> Any:
    """Header values reach the body as JSON gives them (tuples and namedtuples as lists)."""
    t = ctx.t
    return _chord_obs(ctx, chord([t.a_tuple.s(), t.point.s(), t.a_datetime.s(),
                                  t.unicode.s()])(t.echo.s()))


def group_json_values(ctx: Ctx) -> Any:
    t = ctx.t
    g = group(t.a_tuple.s(), t.point.s(), t.shapes.s()).apply_async()
    return {"get": outcome(lambda: g.get(timeout=TIMEOUT)),
            "join": outcome(lambda: g.join(timeout=TIMEOUT))}


def custom_state(ctx: Ctx) -> Any:
    """What a caller sees of a running task's custom state (update_state with meta)."""
    r = ctx.t.gated.delay(ctx.tag)
    try:
        running = eventually(lambda: (m := fresh(ctx, r.id)).state == "PROGRESS" and m,
                             "the PROGRESS state")
        during = describe(ctx, running) | {"info": norm(running.info)}
    finally:
        ctx.redis.rpush(f"diff:gate:{ctx.tag}", "open")
    return {"during": during, "get": outcome(lambda: r.get(timeout=TIMEOUT)),
            "after": describe(ctx, r)}


def started_state(ctx: Ctx) -> Any:
    """track_started: a running task is STARTED, its info the worker's pid and hostname."""
    r = ctx.t.started.delay(ctx.tag)
    try:
        running = eventually(lambda: (m := fresh(ctx, r.id)).state == "STARTED" and m,
                             "the STARTED state")
        info = running.info
        during = describe(ctx, running)
        # pid and hostname differ per worker: their presence is what is compared
        during["result"] = during["info"] = sorted(info) if isinstance(info, dict) \
            else norm(info)
    finally:
        ctx.redis.rpush(f"diff:gate:{ctx.tag}", "open")
    return {"during": during, "get": outcome(lambda: r.get(timeout=TIMEOUT))}


def link_success(ctx: Ctx) -> Any:
    t = ctx.t
    r = t.add.apply_async((1, 1), link=t.add.s(10))
    value = outcome(lambda: r.get(timeout=TIMEOUT))
    children = r.children or []
    child_values = [outcome(partial(c.get, timeout=TIMEOUT)) for c in children]
    return {"get": value, "result": describe(ctx, r), "children_get": child_values,
            "children": [describe(ctx, c) for c in children]}


def link_error_styles(ctx: Ctx) -> Any:
    """Old-style (task_id), new-style (request, exc, traceback) and immutable errbacks."""
    t = ctx.t
    errbacks = [t.errback_new.s(ctx.tag), t.errback_old.s(ctx.tag),
                t.errback_immutable.si(ctx.tag)]
    r = t.fail.apply_async(("linked",), link_error=errbacks)
    value = outcome(lambda: r.get(timeout=TIMEOUT))
    entries = records(ctx, 3)
    for e in entries:
        for key in ("request_id", "task_id"):
            if key in e:
                e[key] = e[key] == r.id
    children = r.children
    return {"get": value, "result": describe(ctx, r), "errbacks": norm(entries),
            "children_get": [outcome(partial(c.get, timeout=TIMEOUT))
                             for c in children or []]}


def link_error_on_chain(ctx: Ctx) -> Any:
    t = ctx.t
    c = chain(t.add.s(1, 1), t.fail.si("chained")).on_error(t.errback_old.s(ctx.tag))
    r = c.apply_async()
    value = outcome(lambda: r.get(timeout=TIMEOUT))
    entries = records(ctx, 1)
    for e in entries:
        e["task_id"] = e["task_id"] == r.id
    return {"get": value, "result": describe(ctx, r), "errbacks": norm(entries)}


def retry_then_succeed(ctx: Ctx) -> Any:
    r = ctx.t.retry_then.delay(ctx.tag, 2)
    return {"get": outcome(lambda: r.get(timeout=TIMEOUT)), "result": describe(ctx, r),
            "runs": counter(ctx, "runs")}


def retry_exhausted_with_exc(ctx: Ctx) -> Any:
    r = ctx.t.retry_exhaust.delay(ctx.tag, True)
    return {"get": outcome(lambda: r.get(timeout=TIMEOUT)), "result": describe(ctx, r),
            "runs": counter(ctx, "runs")}


def retry_exhausted_plain(ctx: Ctx) -> Any:
    r = ctx.t.retry_exhaust.delay(ctx.tag, False)
    return {"get": outcome(lambda: r.get(timeout=TIMEOUT)), "result": describe(ctx, r),
            "runs": counter(ctx, "runs")}


def ignore_result(ctx: Ctx) -> Any:
    r = ctx.t.mark.apply_async((ctx.tag,), ignore_result=True)
    eventually(lambda: counter(ctx, "mark") >= 1, "the ignore_result task to run")
    # a later task on the same worker has been stored: the ignored one had its chance
    ctx.t.add.delay(0, 0).get(timeout=TIMEOUT)
    return {"result": describe(ctx, r), "fresh": describe(ctx, fresh(ctx, r.id))}


def revoked_before_execution(ctx: Ctx) -> Any:
    task_id = uuid()
    replies = ctx.app.control.revoke(task_id, reply=True, timeout=10,
                                     destination=[ctx.worker_name])
    assert replies, f"worker {ctx.worker_name} did not acknowledge the revoke"
    r = ctx.t.mark.apply_async((ctx.tag,), task_id=task_id)
    value = outcome(lambda: r.get(timeout=TIMEOUT))
    # Celery 5.7's worker stores REVOKED twice: at the revoke (no request) and when the
    # message arrives (with the request's extended fields); the second store wins.
    later = eventually(lambda: (m := fresh(ctx, task_id)).name is not None and m,
                       "the REVOKED result stored with the request")
    return {"get": value, "get_no_propagate": outcome(
        lambda: r.get(timeout=TIMEOUT, propagate=False)), "result": describe(ctx, later),
        "ran": counter(ctx, "mark")}


def forget_single(ctx: Ctx) -> Any:
    r = ctx.t.add.delay(4, 4)
    value = outcome(lambda: r.get(timeout=TIMEOUT))
    r.forget()
    return {"get": value, "after_forget": describe(ctx, r),
            "fresh": describe(ctx, fresh(ctx, r.id))}


def expired_before_execution(ctx: Ctx) -> Any:
    r = ctx.t.mark.apply_async((ctx.tag,), expires=datetime.now(UTC) - timedelta(seconds=30))
    value = outcome(lambda: r.get(timeout=TIMEOUT))
    return {"get": value, "result": describe(ctx, fresh(ctx, r.id)),
            "ran": counter(ctx, "mark")}


def chain_with_group(ctx: Ctx) -> Any:
    """chain(task, group, task) upgrades the group and the last task to a chord."""
    t = ctx.t
    c = chain(t.add.s(1, 1), group(t.add.s(10), t.add.s(20)), t.tsum.s()).apply_async()
    return _chord_obs(ctx, c)


def group_of_chains(ctx: Ctx) -> Any:
    t = ctx.t
    g = group(chain(t.add.s(i, i), t.add.s(100)) for i in range(3)).apply_async()
    return {"get": outcome(lambda: g.get(timeout=TIMEOUT)), "group": describe_group(ctx, g)}


def children_graph(ctx: Ctx) -> Any:
    """A task that starts a group: the caller follows ``children`` with ``collect()``."""
    r = ctx.t.spawn.delay(3)
    value = outcome(lambda: r.get(timeout=TIMEOUT))
    for child in r.children or []:
        child.get(timeout=TIMEOUT)
    graph = [(shape(node), norm(v)) for node, v in r.collect(timeout=TIMEOUT)]
    return {"get": value, "result": describe(ctx, r), "collect": graph}


def group_save_restore_forget(ctx: Ctx) -> Any:
    g = group(ctx.t.add.s(i, 10) for i in range(4)).apply_async()
    value = outcome(lambda: g.get(timeout=TIMEOUT))
    g.save()
    restored = ctx.app.GroupResult.restore(g.id)
    obs: dict[str, Any] = {"get": value, "restored_same_ids": None if restored is None else
                           [r.id for r in restored.results] == [r.id for r in g.results]}
    if restored is not None:
        obs["restored"] = describe_group(ctx, restored)
        obs["restored_get"] = outcome(lambda: restored.get(timeout=TIMEOUT))
    g.forget()
    obs["after_forget_children"] = [fresh(ctx, r.id).state for r in g.results]
    again = ctx.app.GroupResult.restore(g.id)
    obs["after_forget_restore"] = None if again is None else shape(again)
    g.delete()
    obs["after_delete_restore"] = outcome(lambda: ctx.app.GroupResult.restore(g.id))
    obs["unknown_restore"] = outcome(lambda: ctx.app.GroupResult.restore(uuid()))
    return obs


def group_of_groups_saved(ctx: Ctx) -> Any:
    t = ctx.t
    g = group(group(t.add.s(1, 1), t.add.s(2, 2)), t.add.s(3, 3)).apply_async()
    value = outcome(lambda: g.get(timeout=TIMEOUT))
    g.save()
    restored = ctx.app.GroupResult.restore(g.id)
    obs = {"get": value, "shape": shape(g),
           "restored": None if restored is None else shape(restored),
           "restored_get": None if restored is None else outcome(
               lambda: restored.get(timeout=TIMEOUT))}
    g.delete()
    return obs


def large_result(ctx: Ctx) -> Any:
    r = ctx.t.big.delay(BIG)
    value = r.get(timeout=TIMEOUT)
    return {"type": type(value).__name__, "len": len(value),
            "sha256": hashlib.sha256(value.encode()).hexdigest(), "state": r.state}


def non_ascii_result(ctx: Ctx) -> Any:
    r = ctx.t.unicode.delay()
    echoed = ctx.t.echo.delay("ünïcödé ✓ 日本語 🎉")
    return {"get": outcome(lambda: r.get(timeout=TIMEOUT)),
            "echo": outcome(lambda: echoed.get(timeout=TIMEOUT)), "args": echoed.args}


def _run_and_get(sig: Any) -> Any:
    return sig.delay().get(timeout=TIMEOUT)


def json_shapes(ctx: Ctx) -> Any:
    t = ctx.t
    return {name: outcome(partial(_run_and_get, sig))
            for name, sig in (("dict", t.shapes), ("namedtuple", t.point),
                              ("tuple", t.a_tuple), ("datetime", t.a_datetime))}


def json_unencodable(ctx: Ctx) -> Any:
    obs = {}
    for name, sig in (("set", ctx.t.a_set), ("object", ctx.t.an_object),
                      ("exception_value", ctx.t.return_exception)):
        r = sig.delay()
        got = outcome(partial(r.get, timeout=TIMEOUT))
        if "raised" in got:  # the encoder's wording is not part of the contract
            got["raised"]["args"] = len(got["raised"]["args"])
        obs[name] = {"get": got, "state": r.state}
    return obs


def exceptions_with_args(ctx: Ctx) -> Any:
    t = ctx.t
    custom = t.raise_custom.delay("several", 2, {"k": ["v", 3]}, None, (4, "five"))
    multi = t.raise_multi.delay()
    return {"custom": outcome(lambda: custom.get(timeout=TIMEOUT)),
            "custom_result": describe(ctx, custom),
            "multi": outcome(lambda: multi.get(timeout=TIMEOUT)),
            "multi_result": describe(ctx, multi)}


def exception_not_importable(ctx: Ctx) -> Any:
    """An exception class the caller cannot import, with arguments JSON cannot carry."""
    r = ctx.t.raise_unserializable.delay()
    got = outcome(lambda: r.get(timeout=TIMEOUT))
    if "raised" in got:
        # Celery (with any backend) wraps it in UnpickleableExceptionWrapper, whose args
        # hold the message string split into characters: compare the joined text
        got["raised"]["args"] = tuple(
            {"chars": _ADDR.sub("0x?", "".join(a))}
            if isinstance(a, (tuple, list)) and a and all(
                isinstance(c, str) and len(c) == 1 for c in a) else a
            for a in got["raised"]["args"])
    return {"get": got, "state": r.state, "traceback": r.traceback is not None}


def get_timeout(ctx: Ctx) -> Any:
    """What a wait that runs out of time raises (then the result still arrives).

    The tasks wait for a gate the test opens afterwards, so every short wait times out
    (Redis's waits overshoot their timeout by up to Celery's 1 s drain interval)."""
    t = ctx.t
    r = t.started.delay(ctx.tag)
    g = group(t.started.s(f"{ctx.tag}-{i}") for i in range(2)).apply_async()
    try:
        obs = {"get": outcome(lambda: r.get(timeout=0.2)),
               "group_get": outcome(lambda: g.get(timeout=0.2)),
               "join_native": outcome(lambda: g.join_native(timeout=0.2)),
               "join": outcome(lambda: g.join(timeout=0.2))}
    finally:
        for gate in (ctx.tag, f"{ctx.tag}-0", f"{ctx.tag}-1"):
            ctx.redis.rpush(f"diff:gate:{gate}", "open")
    obs["later"] = outcome(lambda: r.get(timeout=TIMEOUT))
    obs["group_later"] = outcome(lambda: g.get(timeout=TIMEOUT))
    return obs


def starmap_and_chunks(ctx: Ctx) -> Any:
    t = ctx.t
    starmap = t.add.starmap([(1, 2), (3, 4)]).apply_async()
    mapped = t.tsum.map([[1, 2], [3, 4, 5]]).apply_async()
    chunks = t.add.chunks([(i, i) for i in range(6)], 2).apply_async()
    return {"starmap": outcome(lambda: starmap.get(timeout=TIMEOUT)),
            "map": outcome(lambda: mapped.get(timeout=TIMEOUT)),
            "chunks": outcome(lambda: chunks.get(timeout=TIMEOUT)),
            "chunks_shape": shape(chunks)}


def join_inside_task(ctx: Ctx) -> Any:
    """A task waiting for another inside ``allow_join_result`` (one at a time: the flag is
    process-global, so concurrent joins in a threads pool race in Celery itself)."""
    r = ctx.t.join_inside.delay(21)
    return {"get": outcome(lambda: r.get(timeout=TIMEOUT)), "result": describe(ctx, r)}


def _rerun(ctx: Ctx, first_task: Any) -> Any:
    """``first_task`` runs, then the same task id runs again and succeeds: what is read?"""
    task_id = uuid()
    first = first_task.apply_async((ctx.tag, "first"), task_id=task_id)
    got_first = outcome(lambda: first.get(timeout=TIMEOUT))
    ctx.t.stored.apply_async((ctx.tag, "second"), task_id=task_id)
    eventually(lambda: counter(ctx, "stored") >= 2, "the second run's store")
    return {"first": got_first, "after_rerun": describe(ctx, fresh(ctx, task_id))}


def success_kept_on_rerun(ctx: Ctx) -> Any:
    """The same task id runs again (redelivery, a manual re-send): what does it read?"""
    return _rerun(ctx, ctx.t.stored)


def failure_replaced_on_rerun(ctx: Ctx) -> Any:
    return _rerun(ctx, ctx.t.stored_fail)


SCENARIOS: dict[str, Callable[[Ctx], Any]] = {f.__name__: f for f in (
    single_success, single_failure, unknown_id, meta_dict, on_message_callback,
    chain_simple, chain_failing_middle, group_simple, group_with_failure,
    chord_header_task, chord_header_group, chord_header_chain, chord_header_one_chain,
    chord_fails_at_start, chord_fails_at_end, chord_nested, chord_body_chord,
    chord_of_groups, chord_body_chain, chord_failing_body, chord_error_errbacks,
    chord_failed_before_get, chord_header_fails_during_get,
    chord_header_retry, chord_empty_header, chord_body_group, chord_json_values,
    group_json_values, custom_state, started_state,
    link_success, link_error_styles, link_error_on_chain,
    retry_then_succeed, retry_exhausted_with_exc, retry_exhausted_plain,
    ignore_result, revoked_before_execution, expired_before_execution, forget_single,
    chain_with_group, group_of_chains, children_graph,
    group_save_restore_forget, group_of_groups_saved,
    large_result, non_ascii_result, json_shapes, json_unencodable, exceptions_with_args,
    exception_not_importable, get_timeout, starmap_and_chunks,
    join_inside_task, success_kept_on_rerun, failure_replaced_on_rerun,
)}
