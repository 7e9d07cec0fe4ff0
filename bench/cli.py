"""`python -m bench [--quick]`: start the services, run every phase, print one table.

The whole run shares one private durable PostgreSQL and one Redis, so every ratio in the
table compares backends under the same conditions. Progress goes to stderr; the table and
the PostgreSQL settings go to stdout; the JSON record goes to bench/results/.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import phases
from bench.backends import DATABASES, BackendEntry, build_entries, notify_off_entry
from bench.report import build_rows, floor_line, raw_summary, render_table, rows_json
from bench.runner import Runner
from bench.services import BenchServices
from bench.settings import BenchSettings, parse_args

TABLE_BEGIN = "=== celery-resultstore benchmark ==="
TABLE_END = "=== end of benchmark ==="


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("celery", "kombu", "SQLAlchemy", "psycopg", "redis", "celery-resultstore"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "-"
    return out


def run(settings: BenchSettings) -> dict[str, Any]:
    started = time.time()
    load_start = _load()
    _log(f"mode={'quick' if settings.quick else 'full'} load={load_start} "
         f"cpus={os.cpu_count()}")
    services = BenchServices()
    run_dir = Path(tempfile.mkdtemp(prefix="resultstore-bench-"))
    keep_run_dir = False
    try:
        services.start(DATABASES)
        pg_settings = services.pg_settings()
        _log(f"postgres {pg_settings['server_version']} on 127.0.0.1:{services.pg.port}, "
             f"redis {services.redis_version()} on 127.0.0.1:{services.redis.port}")
        entries = build_entries(services, settings.backends)
        unavailable = {e.key: e.unavailable_reason for e in entries if not e.available}
        for key, why in unavailable.items():
            _log(f"skipping {key}: {why}")
        active: list[BackendEntry] = [e for e in entries if e.available]
        raw: dict[str, dict[str, Any]] = {e.key: {} for e in active}
        runner = Runner(run_dir)

        phase_times: dict[str, float] = {}

        def timed(name: str, fn: Any, *args: Any) -> None:
            t0 = time.perf_counter()
            fn(*args)
            phase_times[name] = round(time.perf_counter() - t0, 1)

        try:
            timed("prepare", phases.prepare, runner, active, _log)
            timed("latency", phases.latency, runner, settings, active, raw, _log)
            # the resultstore with notifications off, beside the default (on)
            twins = [t for t in (notify_off_entry(e) for e in active) if t is not None]
            timed("writers", phases.writers, runner, settings, active + twins, raw, _log)
            timed("waiter", phases.waiter, runner, settings, active + twins, raw, _log)
            timed("live", phases.live, runner, settings, services, active, raw, _log)
            timed("cleanup", phases.cleanup, runner, settings, active, raw, _log)
            pooled = _pooler_section(settings, services, active, run_dir)
        except Exception:
            keep_run_dir = True
            _log(f"failed; job logs kept in {run_dir}")
            raise
        rows = build_rows(raw, settings.to_json())
        table = render_table(rows, raw, unavailable)
        record: dict[str, Any] = {
            "started": datetime.fromtimestamp(started, UTC).isoformat(),
            "duration_s": round(time.time() - started, 1),
            "settings": settings.to_json(),
            "load_start": load_start,
            "load_end": _load(),
            "cpus": os.cpu_count(),
            "postgres": pg_settings,
            "redis_version": services.redis_version(),
            "versions": _versions(),
            "backends": [e.to_json() for e in entries],
            "phase_seconds": phase_times,
            "rows": rows_json(rows),
            "raw": raw_summary(raw),
            "table": table,
            "floor": floor_line(raw),
            "pooler": pooled,
        }
        return record
    finally:
        services.stop()
        if not keep_run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)


def _pooler_section(settings: BenchSettings, services: BenchServices,
                    active: list[BackendEntry], run_dir: Path) -> dict[str, Any] | str:
    """The resultstore direct against through PgBouncer (bench.pooler.measure), or why not."""
    if not settings.pooler_tasks:
        return "not run (--no-pooler)"
    if "resultstore" not in {e.key for e in active}:
        return "not run (the resultstore backend is not in this run)"
    if shutil.which("pgbouncer") is None and not Path("/usr/sbin/pgbouncer").exists():
        return "not run: pgbouncer is not installed (apt-get install pgbouncer)"
    from bench import pooler

    _log("PgBouncer section (resultstore direct vs through PgBouncer, transaction mode)")
    section_dir = run_dir / "pooler"
    section_dir.mkdir()
    return pooler.measure(services, section_dir, settings.quick, settings.pooler_tasks)


def print_record(record: dict[str, Any], json_path: Path) -> None:
    pg = record["postgres"]
    settings = record["settings"]
    print(TABLE_BEGIN)
    print(f"mode: {'quick' if settings['quick'] else 'full'}; repeats: {settings['repeats']} "
          f"(latency), {settings['writer_repeats']} (writers), {settings['chord_repeats']} "
          f"(chords); cells are median (p99) over all samples or median over repeats")
    print(f"PostgreSQL {pg['server_version']}: synchronous_commit={pg['synchronous_commit']} "
          f"fsync={pg['fsync']} full_page_writes={pg['full_page_writes']} "
          f"wal_sync_method={pg['wal_sync_method']}; Redis {record['redis_version']}")
    versions = record["versions"]
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"load average at start {record['load_start']}, at end {record['load_end']}; "
          f"{record['cpus']} CPUs; run took {record['duration_s']}s")
    print("modes: worker = forked prefork pool child of a worker-like parent; "
          "client = plain non-forked process")
    print()
    print(record["table"])
    if record.get("floor"):
        print(record["floor"])
    pooled = record.get("pooler")
    print()
    if isinstance(pooled, dict):
        from bench import pooler

        print(pooler.header(pooled))
        print(pooled["table"])
    elif pooled:
        print(f"PgBouncer section: {pooled}")
    print()
    print(f"JSON: {json_path}")
    print(TABLE_END)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    record = run(settings)
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    suffix = "-quick" if settings.quick else ""
    json_path = settings.results_dir / f"{stamp}{suffix}.json"
    json_path.write_text(json.dumps(record, indent=2, default=str))
    print_record(record, json_path)
    return 0
