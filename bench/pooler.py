"""`python -m bench.pooler [--quick]`: the resultstore through PgBouncer against direct (issue 17).

`python -m bench` runs this same section (`measure`) at the end of its run, on its own
services, so the figures of record come from one run; this command runs it alone.

The same private durable PostgreSQL and Redis as `python -m bench` (bench.services), plus
Debian's PgBouncer in transaction mode in front of it (resultstore_devtools.pgbouncer). Two
entries share one database and schema: `resultstore` (direct) and `resultstore_pgbouncer`
(`?pooler=127.0.0.1:PORT&pooler_mode=transaction`: stores and reads through PgBouncer, the
LISTEN connection direct). The rows are the main benchmark's own phases (bench.phases:
store_result, AsyncResult.get and get_task_meta in worker and client mode, the
delay -> get round trip against a real worker), plus one row of its own: the connections a
`celery worker -P prefork -c 8` holds while it works through a queue of no-op tasks, read
from pg_stat_activity (and PgBouncer's SHOW CLIENTS) every 0.1 s by this process over a
superuser connection; the tasks are published without waiting (publishing never touches
the result store), so every session of the bench role is the worker's. Target: at most
8 + 1 (one per prefork child, plus a listener).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from bench import phases
from bench.backends import (
    RESULTSTORE_DB,
    RESULTSTORE_SCHEMA,
    BackendEntry,
    build_entries,
)
from bench.celeryapp import NOOP, build_app
from bench.runner import CeleryWorker, Runner
from bench.services import BENCH_ROLE, BenchServices
from bench.settings import BENCH_DIR, BenchSettings
from bench.stats import median, percentile
from resultstore_devtools.pgbouncer import PgBouncer

POOLED_KEY = "resultstore_pgbouncer"
CONNECTION_WORKER_CONCURRENCY = 8
CONNECTION_TARGET = CONNECTION_WORKER_CONCURRENCY + 1


def _log(message: str) -> None:
    print(f"[bench.pooler {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pooled_entry(direct: BackendEntry, bouncer: PgBouncer) -> BackendEntry:
    """The direct resultstore entry with stores and reads through ``bouncer``."""
    url = (direct.app.result_backend + f"&pooler={bouncer.host}:{bouncer.port}"
           "&pooler_mode=transaction")
    return replace(direct, key=POOLED_KEY, label="resultstore via PgBouncer (transaction)",
                   app=replace(direct.app, result_backend=url, queue="bench-rs-pooled"))


# ----------------------------------------------------------------------------- connections


def _sample(admin_dsn: str, bouncer: PgBouncer) -> dict[str, int]:
    """One look at the bench role's sessions: direct, PgBouncer's, and PgBouncer's clients."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT client_port, query FROM pg_stat_activity WHERE usename = %s "
            "AND datname = %s", (BENCH_ROLE, RESULTSTORE_DB)).fetchall()
    ports = {int(s["local_port"]) for s in bouncer.show("servers")}
    clients = [c for c in bouncer.show("clients")
               if c["user"] == BENCH_ROLE and c["database"] == RESULTSTORE_DB]
    direct = [r for r in rows if r[0] not in ports]
    return {
        "direct": len(direct),
        "direct_listen": sum(1 for r in direct if "LISTEN" in (r[1] or "")),
        "server_via_pgbouncer": len(rows) - len(direct),
        "pgbouncer_clients": len(clients),
    }


def _done(admin_dsn: str, prefix: str) -> int:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM {RESULTSTORE_SCHEMA}.celery_taskmeta "  # noqa: S608 - constant
            "WHERE task_id LIKE %s AND status = 'SUCCESS'", (prefix + "%",)).fetchone()
    return int(row[0]) if row else 0


def connections(runner: Runner, services: BenchServices, bouncer: PgBouncer,
                entries: list[BackendEntry], tasks: int, raw: dict[str, dict[str, Any]]
                ) -> None:
    """Peak sessions held by a prefork -c 8 worker working through ``tasks`` queued tasks."""
    admin = services.admin_dsn(RESULTSTORE_DB)
    for entry in entries:
        worker = CeleryWorker(entry, CONNECTION_WORKER_CONCURRENCY,
                              runner.run_dir / f"worker-{entry.key}-connections.log")
        prefix = f"bench-conn-{entry.key}-{int(time.time())}-"
        app = build_app(entry.app)
        noop = app.tasks[NOOP]
        samples: list[dict[str, int]] = []
        with worker:
            t0 = time.perf_counter()
            for i in range(tasks):
                noop.apply_async((i,), task_id=f"{prefix}{i}")
            while _done(admin, prefix) < tasks:
                samples.append(_sample(admin, bouncer))
                if time.perf_counter() - t0 > 600:
                    raise RuntimeError(f"{entry.key}: {tasks} tasks not done in 600 s")
                time.sleep(0.1)
            elapsed = time.perf_counter() - t0
        app.close()
        peak = {key: max((s[key] for s in samples), default=0)
                for key in ("direct", "direct_listen", "server_via_pgbouncer",
                            "pgbouncer_clients")}
        raw[entry.key]["connections"] = {"peak": peak, "samples": len(samples),
                                         "tasks": tasks, "elapsed_s": elapsed}
        _log(f"connections {entry.key}: peak {peak} over {len(samples)} samples, "
             f"{tasks} tasks in {elapsed:.1f}s")


# ----------------------------------------------------------------------------- the table


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{median(values):.3g} (p99 {percentile(values, 99):.3g})"


def _ratio(a: list[float], b: list[float]) -> str:
    return f"{median(b) / median(a):.2f}x" if a and b and median(a) else "-"


def _held(key: str, entry_raw: dict[str, Any]) -> tuple[str, int]:
    """The connections cell and the figure the target is read on (the worker's own: its
    client connections to PgBouncer plus its direct ones; PgBouncer's server sessions of
    the role are shown beside, they include the idle ones left by earlier rows)."""
    peak = entry_raw["connections"]["peak"]
    if key == POOLED_KEY:
        held = peak["pgbouncer_clients"] + peak["direct"]
        text = (f"{peak['pgbouncer_clients']} to PgBouncer + {peak['direct']} direct "
                f"({peak['direct_listen']} LISTEN); PgBouncer held "
                f"{peak['server_via_pgbouncer']} server sessions")
    else:
        held = peak["direct"]
        text = f"{peak['direct']} direct ({peak['direct_listen']} LISTEN)"
    return text, held


def render(raw: dict[str, dict[str, Any]], pools: tuple[str, ...]) -> str:
    direct, pooled = raw["resultstore"], raw[POOLED_KEY]
    lines = ["metric | mode | unit | resultstore direct | via PgBouncer (transaction) | "
             "pooled/direct | target | result"]
    for metric, key in (("store_result latency", "store_ms"),
                        ("get: AsyncResult.get (ready)", "get_ms"),
                        ("get: backend.get_task_meta", "meta_ms")):
        for mode in ("worker", "client"):
            a = direct.get(mode, {}).get(key, [])
            b = pooled.get(mode, {}).get(key, [])
            lines.append(f"{metric} | {mode} | ms | {_cell(a)} | {_cell(b)} | {_ratio(a, b)} "
                         "| | ")
    for pool in pools:
        a = direct.get("live", {}).get(pool, {}).get("rt_ms", [])
        b = pooled.get("live", {}).get(pool, {}).get("rt_ms", [])
        lines.append(f"delay -> get round trip, no-op task | {pool} | ms | {_cell(a)} | "
                     f"{_cell(b)} | {_ratio(a, b)} | | ")
    cells, verdicts = [], []
    for key, entry_raw in (("resultstore", direct), (POOLED_KEY, pooled)):
        text, held = _held(key, entry_raw)
        cells.append(text)
        verdicts.append("PASS" if held <= CONNECTION_TARGET else "FAIL")
    lines.append(f"connections held by a prefork -c {CONNECTION_WORKER_CONCURRENCY} worker "
                 f"under load (peak) | prefork | sessions | {cells[0]} | {cells[1]} | | "
                 f"<= {CONNECTION_TARGET} | {'/'.join(verdicts)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the run


def settings_for(quick: bool) -> BenchSettings:
    """The main benchmark's counts (bench.settings), only the rows this command runs."""
    base = BenchSettings.quick_mode() if quick else BenchSettings.full(repeats=3)
    return base.replace(backends=("resultstore",), live_group_repeats=1, chord_repeats=0)


def measure(services: BenchServices, run_dir: Path, quick: bool, tasks: int) -> dict[str, Any]:
    """The PgBouncer section on running ``services`` (its own direct/pooled pairs,
    interleaved per repeat): what `python -m bench` appends to its run and this command
    runs alone. PgBouncer is started here and removed before returning."""
    settings = settings_for(quick)
    bouncer: PgBouncer | None = None
    started = time.time()
    load_start = [round(x, 2) for x in os.getloadavg()]
    try:
        bouncer = PgBouncer(services.pg, pool_mode="transaction")
        bouncer.start()
        bouncer.install_lookup(RESULTSTORE_DB)
        _log(f"postgres on {services.pg.port}, pgbouncer {bouncer.version_text} "
             f"(transaction mode) on {bouncer.port}, prepared statements kept: "
             f"{bouncer.supports_prepared_statements}")
        direct = build_entries(services, ("resultstore",))[0]
        entries = [direct, pooled_entry(direct, bouncer)]
        raw: dict[str, dict[str, Any]] = {e.key: {} for e in entries}
        runner = Runner(run_dir)
        phases.prepare(runner, entries, _log)
        phases.latency(runner, settings, entries, raw, _log)
        phases.live(runner, replace(settings, live_pools=("prefork", "threads")), services,
                    entries, raw, _log)
        connections(runner, services, bouncer, entries, tasks, raw)
        table = render(raw, ("prefork", "threads"))
        return {
            "started": datetime.fromtimestamp(started, UTC).isoformat(),
            "duration_s": round(time.time() - started, 1),
            "load_start": load_start,
            "load_end": [round(x, 2) for x in os.getloadavg()],
            "pgbouncer": {"version": bouncer.version_text, "pool_mode": bouncer.pool_mode,
                          "prepared_statements": bouncer.supports_prepared_statements},
            "settings": settings.to_json(),
            "connections": {e.key: raw[e.key]["connections"] for e in entries},
            "raw": {e.key: {mode: {k: v for k, v in raw[e.key].get(mode, {}).items()
                                   if k in ("store_ms", "get_ms", "meta_ms")}
                            for mode in ("worker", "client")} for e in entries},
            "table": table,
        }
    finally:
        if bouncer is not None:
            bouncer.destroy()


def header(record: dict[str, Any]) -> str:
    """The line above the PgBouncer table: version, mode, load and duration."""
    bouncer = record["pgbouncer"]
    kept = "yes" if bouncer["prepared_statements"] else "no"
    return (f"PgBouncer {bouncer['version']}, pool_mode={bouncer['pool_mode']}, prepared "
            f"statements kept in transaction mode: {kept}; load average "
            f"{record['load_start']} at start, {record['load_end']} at end; "
            f"section took {record['duration_s']}s")


def run(quick: bool, tasks: int) -> dict[str, Any]:
    services = BenchServices()
    run_dir = Path(tempfile.mkdtemp(prefix="resultstore-bench-pooler-"))
    try:
        services.start([RESULTSTORE_DB])
        return measure(services, run_dir, quick, tasks)
    finally:
        services.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pooler", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the main bench's quick counts")
    parser.add_argument("--tasks", type=int, default=None,
                        help="queued tasks of the connections row (default 4000, quick 800)")
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)
    tasks = args.tasks or (800 if args.quick else 4000)
    record = run(args.quick, tasks)
    results: Path = args.results_dir
    results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = results / f"{stamp}-pooler{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    print(header(record))
    print(record["table"])
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
