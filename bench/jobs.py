"""Measurement jobs, each run in its own fresh interpreter: `python -m bench.jobs IN OUT`.

Two process modes, because the stock backend behaves very differently in them:

* worker: this process plays a Celery prefork worker's parent. It builds the app, touches
  `app.backend` (the worker does, for its banner) and forks children with
  multiprocessing's fork context, which runs the after-fork hooks exactly like billiard's
  pool does; each child then runs Celery's own `process_initializer`, the function a
  prefork pool child runs, before it measures.
* client: a plain process (think web server or script) that never forked, building the app
  and calling `AsyncResult.get()` / backend methods directly.

Results that the timed part reads (for get and join) are written beforehand by a forked
"seeding" child, so seeding never pollutes the measuring process's caches or pools and is
fast even for backends that are slow in client mode.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from celery import Celery, chord, group, states
from celery.result import GroupResult

from bench.backends import AppSpec
from bench.celeryapp import CALLBACK, NOOP, build_app

HOSTNAME = "bench-worker@localhost"
PAYLOAD: dict[str, Any] = {"value": 42, "label": "benchmark result", "items": [1, 2, 3]}

Workload = Callable[[Celery, dict[str, Any]], Any]


# ---------------------------------------------------------------------------------------
# process modes


def _child_main(app: Celery, workload: Workload, params: dict[str, Any],
                conn: Connection) -> None:
    from celery.concurrency.prefork import process_initializer

    try:
        process_initializer(app, HOSTNAME)
        conn.send(("ok", workload(app, params)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_in_pool_children(app: Celery, workload: Workload,
                         params_per_child: list[dict[str, Any]]) -> list[Any]:
    """Fork one prefork-like child per params dict; return their results in order."""
    ctx = multiprocessing.get_context("fork")
    procs = []
    for params in params_per_child:
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child_main, args=(app, workload, params, child_conn))
        proc.start()
        child_conn.close()
        procs.append((proc, parent_conn))
    results: list[Any] = []
    errors: list[str] = []
    for proc, conn in procs:
        try:
            status, value = conn.recv()
        except EOFError:
            status, value = "error", f"child {proc.pid} died without a result"
        proc.join()
        if status == "ok":
            results.append(value)
        else:
            errors.append(str(value))
    if errors:
        raise RuntimeError("pool child failed:\n" + "\n".join(errors))
    return results


def worker_parent_app(spec: AppSpec) -> Celery:
    """Set the app up the way a prefork worker's parent has it when the pool forks."""
    app = build_app(spec)
    app.finalize()
    app.loader.import_default_modules()
    _ = app.backend  # the worker's banner prints app.backend.as_uri() before the pool starts
    return app


def seed_ready(spec: AppSpec, ids: list[str]) -> None:
    """Store SUCCESS results for ids from a forked pool child (untimed preparation)."""
    app = worker_parent_app(spec)
    run_in_pool_children(app, _seed_workload, [{"ids": ids}])


def _seed_workload(app: Celery, params: dict[str, Any]) -> int:
    backend = app.backend
    for index, task_id in enumerate(params["ids"]):
        backend.store_result(task_id, {"index": index, **PAYLOAD}, states.SUCCESS)
    return len(params["ids"])


# ---------------------------------------------------------------------------------------
# helpers


def _clear_caches(app: Celery) -> None:
    """Every timed read must reach the store, not a result cache from an earlier op."""
    cache = getattr(app.backend, "_cache", None)
    if cache is not None:
        cache.clear()


def _new_ids(prefix: str, n: int) -> list[str]:
    run = uuid.uuid4().hex[:8]
    return [f"{prefix}-{run}-{i}" for i in range(n)]


def _timed_series(ids: list[str], op: Callable[[str], object], budget_s: float,
                  min_ops: int) -> list[float]:
    """Latency of op(id) per id, in milliseconds; stops early past the time budget."""
    samples: list[float] = []
    started = time.perf_counter()
    for task_id in ids:
        t0 = time.perf_counter_ns()
        op(task_id)
        samples.append((time.perf_counter_ns() - t0) / 1e6)
        if len(samples) >= min_ops and time.perf_counter() - started > budget_s:
            break
    return samples


# ---------------------------------------------------------------------------------------
# workloads (run in the measuring process: a pool child or the client process itself)


def latency_workload(app: Celery, params: dict[str, Any]) -> dict[str, Any]:
    backend = app.backend
    budget = float(params["budget_s"])
    min_ops = int(params["min_ops"])
    get_kwargs = {"timeout": 60, "disable_sync_subtasks": False}

    for task_id in _new_ids("bench-warm", int(params["warmup"])):
        backend.store_result(task_id, PAYLOAD, states.SUCCESS)
    # Warm the read path too (first query compiles/prepares statements, opens pubsub, ...).
    warm_get = params["warm_ids"]
    for task_id in warm_get:
        app.AsyncResult(task_id).get(**get_kwargs)
        backend.get_task_meta(task_id)
    _clear_caches(app)

    def store(task_id: str) -> object:
        return backend.store_result(task_id, PAYLOAD, states.SUCCESS)

    store_ids = _new_ids("bench-store", int(params["n_store"]))
    floor_ms: list[float] = []
    if params.get("floor_dsn"):
        # SQL backends: blocks of the raw floor upsert alternate with blocks of stores in
        # this same process, so both see the same disk and CPU (the store target is a
        # ratio to the floor; a separate floor job would meet other moments of the day)
        store_ms, floor_ms = _paired_with_floor(params["floor_dsn"], store_ids, store,
                                                budget, min_ops, int(params["warmup"]))
    else:
        store_ms = _timed_series(store_ids, store, budget, min_ops)

    def _get(task_id: str) -> object:
        _clear_caches(app)
        value = app.AsyncResult(task_id).get(**get_kwargs)
        if not isinstance(value, dict) or value.get("value") != PAYLOAD["value"]:
            raise AssertionError(f"unexpected result for {task_id}: {value!r}")
        return value

    def _meta(task_id: str) -> object:
        _clear_caches(app)
        meta = backend.get_task_meta(task_id)
        if meta.get("status") != states.SUCCESS:
            raise AssertionError(f"unexpected meta for {task_id}: {meta!r}")
        return meta

    get_ms = _timed_series(params["get_ids"], _get, budget, min_ops)
    meta_ms = _timed_series(params["meta_ids"], _meta, budget, min_ops)

    group_ids: list[str] = params["group_ids"]
    _clear_caches(app)
    result = GroupResult(str(uuid.uuid4()), [app.AsyncResult(i) for i in group_ids], app=app)
    t0 = time.perf_counter()
    values = result.get(timeout=600, disable_sync_subtasks=False)
    join_s = time.perf_counter() - t0
    if [v["index"] for v in values] != list(range(len(group_ids))):
        raise AssertionError("join returned results out of order or wrong")
    return {
        "store_ms": store_ms, "get_ms": get_ms, "meta_ms": meta_ms, "join_s": join_s,
        "native_join": bool(result.supports_native_join), "floor_ms": floor_ms,
    }


FLOOR_TABLE = (
    "CREATE TABLE IF NOT EXISTS bench_floor (task_id varchar(155) PRIMARY KEY, "
    "status varchar(50), result bytea, date_done timestamptz)"
)
FLOOR_UPSERT = (
    "INSERT INTO bench_floor (task_id, status, result, date_done) "
    "VALUES (%s, 'SUCCESS', %s, now()) ON CONFLICT (task_id) DO UPDATE SET "
    "status = excluded.status, result = excluded.result, date_done = excluded.date_done"
)


def _paired_with_floor(dsn: str, ids: list[str], op: Callable[[str], object], budget_s: float,
                       min_ops: int, warmup: int, block: int = 25
                       ) -> tuple[list[float], list[float]]:
    """op(id) latencies and raw floor-upsert latencies, in alternating blocks (ms)."""
    import psycopg

    payload = json.dumps(PAYLOAD).encode()
    op_ms: list[float] = []
    floor_ms: list[float] = []
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
        conn.execute(FLOOR_TABLE)
        for task_id in _new_ids("floor-pwarm", warmup):
            conn.execute(FLOOR_UPSERT, (task_id, payload))
        floor_ids = iter(_new_ids("floor-paired", len(ids)))
        started = time.perf_counter()
        for start in range(0, len(ids), block):
            chunk = ids[start:start + block]
            for _ in chunk:
                floor_id = next(floor_ids)
                t0 = time.perf_counter_ns()
                conn.execute(FLOOR_UPSERT, (floor_id, payload))
                floor_ms.append((time.perf_counter_ns() - t0) / 1e6)
            for task_id in chunk:
                t0 = time.perf_counter_ns()
                op(task_id)
                op_ms.append((time.perf_counter_ns() - t0) / 1e6)
            if len(op_ms) >= min_ops and time.perf_counter() - started > budget_s:
                break
    return op_ms, floor_ms


def writer_workload(app: Celery, params: dict[str, Any]) -> dict[str, Any]:
    """One of N concurrent writers: store as fast as possible for a fixed time."""
    backend = app.backend
    for task_id in _new_ids("bench-wwarm", int(params["warmup"])):
        backend.store_result(task_id, PAYLOAD, states.SUCCESS)
    barrier_path = Path(params["barrier_dir"])
    (barrier_path / f"ready-{os.getpid()}").touch()
    go = barrier_path / "go"
    while not go.exists():
        time.sleep(0.001)
    duration = float(params["seconds"])
    prefix = f"bench-w{os.getpid()}-{uuid.uuid4().hex[:6]}"
    latencies: list[float] = []
    start = time.perf_counter()
    deadline = start + duration
    count = 0
    while time.perf_counter() < deadline:
        t0 = time.perf_counter_ns()
        backend.store_result(f"{prefix}-{count}", PAYLOAD, states.SUCCESS)
        latencies.append((time.perf_counter_ns() - t0) / 1e6)
        count += 1
    elapsed = time.perf_counter() - start
    if params.get("final_id") and int(params.get("child", 0)) == 0:
        # the result a waiting client (waiter_workload) waits for, stored last
        backend.store_result(params["final_id"], PAYLOAD, states.SUCCESS)
    return {"count": count, "elapsed": elapsed, "latencies_ms": latencies}


def paced_writer_workload(app: Celery, params: dict[str, Any]) -> dict[str, Any]:
    """A steady writer (a worker finishing tasks at a fixed rate) until the stop file appears.

    Each sample is (wall-clock start, latency ms) so the orchestrator can pick the samples
    that overlapped the cleanup run.
    """
    backend = app.backend
    for task_id in _new_ids("bench-pwarm", int(params["warmup"])):
        backend.store_result(task_id, PAYLOAD, states.SUCCESS)
    Path(params["ready_file"]).touch()
    stop = Path(params["stop_file"])
    period = 1.0 / float(params["rate"])
    prefix = f"bench-paced-{uuid.uuid4().hex[:6]}"
    samples: list[tuple[float, float]] = []
    next_at = time.perf_counter()
    count = 0
    while not stop.exists():
        next_at += period
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        wall = time.time()
        t0 = time.perf_counter_ns()
        backend.store_result(f"{prefix}-{count}", PAYLOAD, states.SUCCESS)
        samples.append((wall, (time.perf_counter_ns() - t0) / 1e6))
        count += 1
    return {"samples": samples}


def cleanup_workload(app: Celery, params: dict[str, Any]) -> dict[str, Any]:
    """What `celery.backend_cleanup` (celery beat) runs: backend.cleanup()."""
    started = time.time()
    app.backend.cleanup()
    return {"started": started, "finished": time.time()}


def prepare_workload(app: Celery, params: dict[str, Any]) -> dict[str, Any]:
    """First use of a backend: lets it create its tables/schema outside any timing."""
    task_id = f"bench-prepare-{uuid.uuid4().hex}"
    app.backend.store_result(task_id, PAYLOAD, states.SUCCESS)
    meta = app.backend.get_task_meta(task_id)
    if meta.get("status") != states.SUCCESS:
        raise AssertionError(f"prepare: backend did not read back its write: {meta!r}")
    app.backend.forget(task_id)
    return {"ok": True}


def _parse_date_done(value: object) -> float:
    if isinstance(value, datetime):
        moment = value
    else:
        moment = datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # stock stores naive UTC
    return moment.timestamp()


def _last_date_done(params: dict[str, Any], ids: list[str]) -> float:
    """When the last header result was stored, read from storage (untimed)."""
    sql_info = params.get("sql")
    if sql_info:
        import psycopg
        from psycopg import sql

        query = sql.SQL("SELECT max(date_done) FROM {}.{} WHERE task_id = ANY(%s)").format(
            sql.Identifier(sql_info["schema"]), sql.Identifier(sql_info["task_table"])
        )
        with psycopg.connect(sql_info["dsn"]) as conn:
            row = conn.execute(query, (ids,)).fetchone()
        if row is None or row[0] is None:
            raise AssertionError("header results not found in the task table")
        return _parse_date_done(row[0])
    import redis

    client = redis.Redis.from_url(params["redis_db_url"])
    raw = client.mget([f"celery-task-meta-{i}" for i in ids])
    stamps = [_parse_date_done(json.loads(r)["date_done"]) for r in raw if r is not None]
    if len(stamps) != len(ids):
        raise AssertionError("some header results are missing from Redis")
    return max(stamps)


def live_workload(app: Celery, params: dict[str, Any]) -> dict[str, Any]:
    """Client side of the live-worker rows; a real worker (params["pool"]) must be consuming.

    What a Celery user does: ``delay().get()`` of a no-op task, a group dispatched and
    joined, a chord dispatched and its callback's result waited for, all with the
    backend's default waiting (no interval tuning), so the number is what the store, the
    wake-up and the read cost on top of the same broker and worker.
    """
    noop = app.tasks[NOOP]
    callback = app.tasks[CALLBACK]
    timeout = float(params["timeout"])
    # Warm-up: worker ready, connections (and listeners) open, chord machinery used once.
    warm = group(noop.s(i) for i in range(10)).apply_async()
    warm.get(timeout=120)
    chord(noop.s(i) for i in range(5))(callback.s()).get(timeout=120)
    for i in range(3):
        noop.delay(i).get(timeout=120)

    def round_trip(i: int) -> object:
        value = noop.delay(i).get(timeout=timeout)
        if value != i:
            raise AssertionError(f"round trip {i} returned {value!r}")
        return value

    rt_ms: list[float] = []
    started = time.perf_counter()
    for i in range(int(params["rt_calls"])):
        ns0 = time.perf_counter_ns()
        round_trip(i)
        rt_ms.append((time.perf_counter_ns() - ns0) / 1e6)
        if len(rt_ms) >= int(params["rt_min"]) and \
                time.perf_counter() - started > float(params["rt_budget_s"]):
            break

    size = int(params["group_size"])
    live_s: list[float] = []
    for _ in range(int(params["live_repeats"])):
        t0 = time.perf_counter()
        result = group(noop.s(i) for i in range(size)).apply_async()
        values = result.get(timeout=timeout)  # join_native where the backend has it
        live_s.append(time.perf_counter() - t0)
        if values != list(range(size)):
            raise AssertionError("live group returned wrong values")

    parts = int(params["live_chord_parts"])
    live_chord_s: list[float] = []
    for _ in range(int(params["live_repeats"])):
        t0 = time.perf_counter()
        out = chord(noop.s(i) for i in range(parts))(callback.s()).get(timeout=timeout)
        live_chord_s.append(time.perf_counter() - t0)
        if int(out["n"]) != parts:
            raise AssertionError(f"chord callback saw {out['n']} results, expected {parts}")

    chord_ms: list[float] = []
    chord_total_s: list[float] = []
    big = int(params.get("chord_parts") or 0)
    for _ in range(int(params.get("chord_repeats") or 0) if big else 0):
        ids = [str(uuid.uuid4()) for _ in range(big)]
        header = [noop.s(i).set(task_id=task_id) for i, task_id in enumerate(ids)]
        t0 = time.time()
        res = chord(header)(callback.s())
        out = res.get(timeout=timeout, interval=0.05)
        chord_total_s.append(time.time() - t0)
        if int(out["n"]) != big:
            raise AssertionError(f"chord callback saw {out['n']} results, expected {big}")
        last = _last_date_done(params, ids)
        chord_ms.append((out["started"] - last) * 1000.0)
    return {"rt_ms": rt_ms, "live_join_s": live_s, "live_chord_s": live_chord_s,
            "chord_ms": chord_ms, "chord_total_s": chord_total_s}


def waiter_workload(app: Celery, params: dict[str, Any]) -> dict[str, Any]:
    """One client waiting for one task while writers fill the same store at full speed.

    Measures this process's own CPU time (all threads: user + system, getrusage) from the
    start of ``AsyncResult.get`` until it returns: a waiter that is woken by every other
    task's notification pays for them here.
    """
    import resource

    backend = app.backend
    warm_id = f"bench-waitwarm-{uuid.uuid4().hex}"
    backend.store_result(warm_id, PAYLOAD, states.SUCCESS)
    app.AsyncResult(warm_id).get(timeout=60)
    _clear_caches(app)
    Path(params["ready_file"]).touch()
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    value = app.AsyncResult(params["task_id"]).get(timeout=float(params["timeout"]))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    if not isinstance(value, dict) or value.get("value") != PAYLOAD["value"]:
        raise AssertionError(f"waiter got {value!r}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu_s": cpu, "wall_s": wall}


def floor_workload(app: Celery, params: dict[str, Any]) -> dict[str, Any]:
    """The PostgreSQL floor on this machine: what any backend's store/get can approach.

    One psycopg connection, autocommit, server-side prepared statements, no Celery: a
    single-row upsert (which has to wait for the WAL flush with synchronous_commit=on) and a
    primary-key select, the issue's pgbench reference points.
    """
    import psycopg

    budget = float(params["budget_s"])
    min_ops = int(params["min_ops"])
    payload = json.dumps(PAYLOAD).encode()
    with psycopg.connect(params["dsn"], autocommit=True, prepare_threshold=0) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_floor (task_id varchar(155) PRIMARY KEY, "
            "status varchar(50), result bytea, date_done timestamptz)"
        )
        upsert = (
            "INSERT INTO bench_floor (task_id, status, result, date_done) "
            "VALUES (%s, 'SUCCESS', %s, now()) ON CONFLICT (task_id) DO UPDATE SET "
            "status = excluded.status, result = excluded.result, date_done = excluded.date_done"
        )
        select = "SELECT status, result, date_done FROM bench_floor WHERE task_id = %s"
        for task_id in _new_ids("floor-warm", int(params["warmup"])):
            conn.execute(upsert, (task_id, payload))
            conn.execute(select, (task_id,)).fetchone()
        ids = _new_ids("floor", int(params["n_store"]))
        upsert_ms = _timed_series(ids, lambda i: conn.execute(upsert, (i, payload)),
                                  budget, min_ops)
        select_ms = _timed_series(ids[: len(upsert_ms)],
                                  lambda i: conn.execute(select, (i,)).fetchone(),
                                  budget, min_ops)
        # For reference only: the resultstore backend's own store statement, exactly as
        # it sends it, on this raw connection. store_result minus this is the backend's
        # client-side cost; this minus the floor upsert is the statement's server cost.
        statement = _backend_store_statement(app)
        backend_ms: list[float] = []
        if statement is not None:
            build = statement
            for task_id in _new_ids("floor-bwarm", int(params["warmup"])):
                conn.execute(*build(task_id))
            backend_ms = _timed_series(_new_ids("floor-backend", int(params["n_store"])),
                                       lambda i: conn.execute(*build(i)), budget, min_ops)
        # For reference only (never used by a backend row): the same upsert when the commit
        # does not wait for the WAL flush, i.e. what the fsync costs on this disk.
        conn.execute("SET synchronous_commit = off")
        nosync_ms = _timed_series(_new_ids("floor-nosync", int(params["n_store"])),
                                  lambda i: conn.execute(upsert, (i, payload)), budget, min_ops)
        conn.execute("RESET synchronous_commit")
        conn.execute("TRUNCATE bench_floor")
    return {"upsert_ms": upsert_ms, "select_ms": select_ms, "upsert_nosync_ms": nosync_ms,
            "backend_statement_ms": backend_ms}


def _backend_store_statement(app: Celery) -> Callable[[str], tuple[str, tuple[Any, ...]]] | None:
    """(sql, params) of the resultstore backend's store of one id; None for other backends.

    Captured from the backend itself: its ``_upsert_task`` runs once against a recording
    cursor, so the statement and parameters are exactly what it sends (notifications as
    configured), whatever their shape; only the task id is replaced per call. Private
    names: this is a measuring tool, and it skips itself when they are not there.
    """
    backend = app.backend
    task_params = getattr(backend, "_task_params", None)
    upsert = getattr(backend, "_upsert_task", None)
    holder = getattr(backend, "_holder", None)
    if task_params is None or upsert is None or holder is None or holder.config.is_sqlite:
        return None
    calls: list[tuple[str, tuple[Any, ...]]] = []

    class _Recorder:
        def execute(self, query: str, params: Any = None, **_: Any) -> _Recorder:
            calls.append((query, tuple(params or ())))
            return self

    @contextmanager
    def _lease() -> Iterator[_Recorder]:
        yield _Recorder()

    store_config = holder.config

    class _RecordingHolder:
        config = store_config
        cursor = connection = staticmethod(_lease)

    probe = "bench-statement-probe"
    backend._holder = _RecordingHolder()
    try:
        upsert(task_params(probe, PAYLOAD, states.SUCCESS, None, None))
    except Exception:  # noqa: BLE001 - a reference line only: skip it
        return None
    finally:
        backend._holder = holder
    if len(calls) != 1 or not calls[0][1] or calls[0][1][0] != probe:
        return None
    query, captured = calls[0]

    def build(task_id: str) -> tuple[str, tuple[Any, ...]]:
        return query, (task_id, *captured[1:])
    return build


WORKLOADS: dict[str, Workload] = {
    "floor": floor_workload,
    "latency": latency_workload,
    "writer": writer_workload,
    "paced_writer": paced_writer_workload,
    "cleanup": cleanup_workload,
    "prepare": prepare_workload,
    "live": live_workload,
    "waiter": waiter_workload,
}


# ---------------------------------------------------------------------------------------
# job entry


def _latency_params(spec: AppSpec, params: dict[str, Any]) -> dict[str, Any]:
    """Seed the ids the timed reads use, from a separate forked child."""
    params = dict(params)
    params["warm_ids"] = _new_ids("bench-wget", 5)
    params["get_ids"] = _new_ids("bench-get", int(params["n_get"]))
    params["meta_ids"] = _new_ids("bench-meta", int(params["n_get"]))
    params["group_ids"] = _new_ids("bench-group", int(params["group_size"]))
    seed_ready(spec, params["warm_ids"] + params["get_ids"] + params["meta_ids"])
    seed_ready(spec, params["group_ids"])
    return params


def run_job(job: dict[str, Any]) -> Any:
    spec = AppSpec.from_json(job["app"])
    kind: str = job["kind"]
    mode: str = job["mode"]
    workload = WORKLOADS[kind]
    params: dict[str, Any] = dict(job.get("params", {}))
    if kind == "latency":
        params = _latency_params(spec, params)
    if mode == "worker":
        app = worker_parent_app(spec)
        children = int(job.get("children", 1))
        per_child = [dict(params, child=i) for i in range(children)]
        results = run_in_pool_children(app, workload, per_child)
        return results if children > 1 else results[0]
    if mode == "client":
        return workload(build_app(spec), params)
    raise ValueError(f"unknown mode {mode!r}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job_path, out_path = Path(argv[0]), Path(argv[1])
    job = json.loads(job_path.read_text())
    try:
        result = {"ok": True, "result": run_job(job)}
    except BaseException:  # noqa: BLE001 - the orchestrator reports it
        result = {"ok": False, "error": traceback.format_exc()}
    out_path.write_text(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
