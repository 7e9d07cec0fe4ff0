"""The benchmark phases; each fills `raw[backend][...]` with samples for the report.

Backends are interleaved inside each repeat (and the order rotates per repeat) so that load
from other work on the machine spreads over all backends instead of hitting one.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql

from bench.backends import BROKER_DB, BackendEntry
from bench.runner import CeleryWorker, JobFailed, Runner
from bench.services import BenchServices
from bench.settings import BenchSettings
from bench.stats import median
from resultstore_devtools.procs import kill_group

Raw = dict[str, dict[str, Any]]
Log = Callable[[str], None]
MODES = ("worker", "client")
EXPIRED_PREFIX = "bench-expired-"


def _rotated(entries: list[BackendEntry], by: int) -> list[BackendEntry]:
    if not entries:
        return entries
    by %= len(entries)
    return entries[by:] + entries[:by]


def prepare(runner: Runner, entries: list[BackendEntry], log: Log) -> None:
    for entry in entries:
        log(f"prepare {entry.key}")
        runner.job(entry, "prepare", "client", {}, timeout=300)


def latency(runner: Runner, settings: BenchSettings, entries: list[BackendEntry],
            raw: Raw, log: Log) -> None:
    params = {
        "n_store": settings.n_store, "n_get": settings.n_get, "budget_s": settings.op_budget_s,
        "min_ops": settings.min_ops, "warmup": settings.warmup,
        "group_size": settings.group_size,
    }
    for rep in range(settings.repeats):
        for entry in _rotated(entries, rep):
            for mode in MODES:
                t0 = time.perf_counter()
                job_params = dict(params, floor_dsn=entry.sql.dsn if entry.sql else None)
                out = runner.job(entry, "latency", mode, job_params)
                bucket = raw[entry.key].setdefault(mode, {
                    "store_ms": [], "get_ms": [], "meta_ms": [], "join_s": [],
                    "floor_ms": []})
                bucket["store_ms"].extend(out["store_ms"])
                bucket["floor_ms"].extend(out.get("floor_ms") or [])
                bucket["get_ms"].extend(out["get_ms"])
                bucket["meta_ms"].extend(out["meta_ms"])
                bucket["join_s"].append(out["join_s"])
                bucket["native_join"] = out["native_join"]
                log(f"latency {entry.key}/{mode} rep {rep + 1}/{settings.repeats}: "
                    f"store n={len(out['store_ms'])} get n={len(out['get_ms'])} "
                    f"join {out['join_s']:.3f}s ({time.perf_counter() - t0:.1f}s)")
        sql_entries = [e for e in entries if e.sql is not None]
        if sql_entries:
            # The raw-psycopg floor, once per repeat, interleaved with the backends.
            entry = sql_entries[-1]
            assert entry.sql is not None
            out = runner.job(entry, "floor", "client", dict(params, dsn=entry.sql.dsn))
            bucket = raw.setdefault("_floor", {}).setdefault("client", {
                "upsert_ms": [], "select_ms": [], "upsert_nosync_ms": [],
                "backend_statement_ms": []})
            for name in ("upsert_ms", "select_ms", "upsert_nosync_ms", "backend_statement_ms"):
                bucket[name].extend(out.get(name) or [])
            log(f"floor rep {rep + 1}/{settings.repeats}: upsert+commit "
                f"{median(out['upsert_ms']):.3f} ms, pk select {median(out['select_ms']):.3f} ms")


def _wait_files(directory: Path, pattern: str, count: int, timeout: float,
                handle_poll: Callable[[], int | None]) -> None:
    deadline = time.monotonic() + timeout
    while len(list(directory.glob(pattern))) < count:
        if handle_poll() is not None:
            return  # the job exited early; wait() will report why
        if time.monotonic() > deadline:
            raise JobFailed(f"timed out waiting for {count} x {pattern} in {directory}")
        time.sleep(0.02)


def _run_writers(runner: Runner, settings: BenchSettings, entry: BackendEntry,
                 final_id: str | None = None) -> dict[str, Any]:
    """8 (settings.writers) forked pool children storing as fast as they can, in step."""
    barrier = runner.new_dir(f"barrier-{entry.key}")
    params: dict[str, Any] = {"seconds": settings.writer_seconds, "warmup": settings.warmup,
                              "barrier_dir": str(barrier), "final_id": final_id}
    handle = runner.start_job(entry, "writer", "worker", params, children=settings.writers)
    _wait_files(barrier, "ready-*", settings.writers, 300, handle.proc.poll)
    (barrier / "go").touch()
    results = handle.wait(timeout=settings.writer_seconds + 300)
    total = sum(r["count"] for r in results)
    elapsed = max(r["elapsed"] for r in results)
    return {"total": total, "throughput": total / elapsed,
            "latencies_ms": [x for r in results for x in r["latencies_ms"]]}


def writers(runner: Runner, settings: BenchSettings, entries: list[BackendEntry],
            raw: Raw, log: Log) -> None:
    """Throughput of concurrent writers; the resultstore also with notifications off."""
    for rep in range(settings.writer_repeats):
        for entry in _rotated(entries, rep):
            out = _run_writers(runner, settings, entry)
            bucket = raw.setdefault(entry.key, {}).setdefault(
                "writers", {"throughput": [], "latencies_ms": []})
            bucket["throughput"].append(out["throughput"])
            bucket["latencies_ms"].extend(out["latencies_ms"])
            log(f"writers {entry.key} rep {rep + 1}/{settings.writer_repeats}: "
                f"{out['throughput']:.0f} stores/s")


def waiter(runner: Runner, settings: BenchSettings, entries: list[BackendEntry],
           raw: Raw, log: Log) -> None:
    """CPU time of one client waiting for one task while the writers run at full speed."""
    for rep in range(settings.writer_repeats):
        for entry in _rotated(entries, rep):
            flags = runner.new_dir(f"waiter-{entry.key}")
            task_id = f"bench-waited-{uuid.uuid4().hex}"
            client = runner.start_job(entry, "waiter", "client", {
                "task_id": task_id, "ready_file": str(flags / "ready"),
                "timeout": settings.writer_seconds + 600})
            try:
                _wait_files(flags, "ready", 1, 300, client.proc.poll)
                out = _run_writers(runner, settings, entry, final_id=task_id)
            except BaseException:
                kill_group(client.proc)
                raise
            result = client.wait(timeout=600)
            bucket = raw.setdefault(entry.key, {}).setdefault(
                "waiter", {"cpu_s": [], "wall_s": [], "stores": []})
            bucket["cpu_s"].append(result["cpu_s"])
            bucket["wall_s"].append(result["wall_s"])
            bucket["stores"].append(out["total"])
            log(f"waiter {entry.key} rep {rep + 1}/{settings.writer_repeats}: "
                f"{result['cpu_s']:.3f} CPU s over {result['wall_s']:.1f} s while "
                f"{out['total']} results were stored")


def live(runner: Runner, settings: BenchSettings, services: BenchServices,
         entries: list[BackendEntry], raw: Raw, log: Log) -> None:
    """The rows with a real worker: round trips, groups and chords, per worker pool."""
    broker = redis.Redis.from_url(services.redis.db_url(BROKER_DB))
    for pool in settings.live_pools:
        for entry in entries:
            broker.flushdb()
            big_chord = pool == "prefork"  # the header -> callback row runs once
            params: dict[str, Any] = {
                "pool": pool, "rt_calls": settings.rt_calls, "rt_min": settings.rt_min,
                "rt_budget_s": settings.rt_budget_s, "live_repeats": settings.live_group_repeats,
                "group_size": settings.live_group_size,
                "live_chord_parts": settings.live_chord_parts,
                "chord_parts": settings.chord_parts if big_chord else 0,
                "chord_repeats": settings.chord_repeats if big_chord else 0,
                "timeout": 900, "sql": entry.sql.to_json() if entry.sql else None,
                "redis_db_url": entry.redis_db_url,
            }
            worker = CeleryWorker(entry, settings.worker_concurrency,
                                  runner.run_dir / f"worker-{entry.key}-{pool}.log", pool=pool)
            t0 = time.perf_counter()
            with worker:
                out = runner.job(entry, "live", "client", params, timeout=3600)
            raw.setdefault(entry.key, {}).setdefault("live", {})[pool] = out
            if big_chord:
                raw[entry.key]["chord"] = {"chord_ms": out["chord_ms"],
                                           "chord_total_s": out["chord_total_s"]}
            log(f"live {entry.key}/{pool}: round trip p50 {median(out['rt_ms']):.1f} ms "
                f"(n={len(out['rt_ms'])}), group {settings.live_group_size} "
                f"{median(out['live_join_s']) * 1000:.0f} ms, chord "
                f"{settings.live_chord_parts} {median(out['live_chord_s']) * 1000:.0f} ms"
                + (f", callback after last header "
                   f"{', '.join(f'{v:.1f}' for v in out['chord_ms'])} ms" if big_chord else "")
                + f" ({time.perf_counter() - t0:.0f}s)")
    broker.flushdb()


def _seed_expired(entry: BackendEntry, rows: int) -> float:
    """Generate `rows` expired results with one INSERT ... SELECT generate_series."""
    assert entry.sql is not None
    info = entry.sql
    table = sql.Identifier(info.schema, info.task_table)
    seq = sql.Literal(f"{info.schema}.{info.task_sequence}")
    t0 = time.perf_counter()
    with psycopg.connect(info.dsn) as conn:
        columns = {
            str(r[0]) for r in conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = %s",
                (info.schema, info.task_table),
            )
        }
        # Backends may add bookkeeping timestamps (resultstore: updated_at); age those too
        # so the rows look like results written 30 days ago, not like fresh ones.
        extra = [c for c in ("updated_at",) if c in columns]
        when = "now() - interval '30 days' - g * interval '1 millisecond'"
        conn.execute(
            sql.SQL(
                "INSERT INTO {table} (id, task_id, status, result, date_done{extra_cols}) "
                "SELECT nextval({seq}), {prefix} || g, 'SUCCESS', {payload}, {when}"
                "{extra_vals} FROM generate_series(1, {rows}) AS g"
            ).format(
                table=table, seq=seq, prefix=sql.Literal(EXPIRED_PREFIX),
                payload=sql.Literal(b'{"value": 42, "label": "expired"}'),
                rows=sql.Literal(rows), when=sql.SQL(when),
                extra_cols=sql.SQL("").join(sql.SQL(", ") + sql.Identifier(c) for c in extra),
                extra_vals=sql.SQL("").join(sql.SQL(", " + when) for _ in extra),
            )
        )
    with psycopg.connect(info.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(table))
    with psycopg.connect(info.admin_dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")  # so a checkpoint does not land inside the measurement
    return time.perf_counter() - t0


def _count_expired(entry: BackendEntry) -> int:
    assert entry.sql is not None
    query = sql.SQL("SELECT count(*) FROM {} WHERE task_id LIKE {}").format(
        sql.Identifier(entry.sql.schema, entry.sql.task_table),
        sql.Literal(EXPIRED_PREFIX + "%"),
    )
    with psycopg.connect(entry.sql.dsn) as conn:
        row = conn.execute(query).fetchone()
    return int(row[0]) if row else -1


def cleanup(runner: Runner, settings: BenchSettings, entries: list[BackendEntry],
            raw: Raw, log: Log) -> None:
    # The writer runs alone this long first: its own p99 (machine noise, WAL flush jitter) is
    # the baseline that the during-cleanup p99 is read against.
    baseline_s = 5.0 if not settings.quick else 1.0
    for rep in range(settings.cleanup_repeats):
        for entry in _rotated([e for e in entries if e.has_cleanup], rep):
            seed_s = _seed_expired(entry, settings.cleanup_rows)
            log(f"cleanup {entry.key}: seeded {settings.cleanup_rows} expired rows "
                f"in {seed_s:.1f}s")
            flags = runner.new_dir(f"cleanup-{entry.key}")
            params = {"rate": settings.cleanup_writer_rate, "warmup": settings.warmup,
                      "ready_file": str(flags / "ready"), "stop_file": str(flags / "stop")}
            writer = runner.start_job(entry, "paced_writer", "worker", params)
            try:
                _wait_files(flags, "ready", 1, 300, writer.proc.poll)
                time.sleep(baseline_s)
                window = runner.job(entry, "cleanup", "client", {}, timeout=3600)
                time.sleep(baseline_s / 2)
            finally:
                (flags / "stop").touch()
            samples = writer.wait(timeout=300)["samples"]
            start, end = window["started"], window["finished"]
            during = [lat for wall, lat in samples if start <= wall <= end]
            before = [lat for wall, lat in samples if wall < start]
            remaining = _count_expired(entry)
            bucket = raw[entry.key].setdefault("cleanup", {
                "writer_during_ms": [], "writer_baseline_ms": [], "cleanup_s": [],
                "rows": settings.cleanup_rows, "remaining": []})
            bucket["writer_during_ms"].extend(during)
            bucket["writer_baseline_ms"].extend(before)
            bucket["cleanup_s"].append(end - start)
            bucket["remaining"].append(remaining)
            log(f"cleanup {entry.key} rep {rep + 1}: {end - start:.1f}s, "
                f"{len(during)} writer samples during, {remaining} expired rows left")
