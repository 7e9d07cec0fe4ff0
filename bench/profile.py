"""`python -m bench.profile`: where one backend operation spends its time.

Starts the same services as the benchmark (durable PostgreSQL, Redis), runs one operation
many times in worker mode (a forked prefork-like child) or client mode, under pyinstrument,
and prints the call tree plus wall-clock latency. Meant for backend developers chasing a
target the benchmark table reports as missed; pyinstrument is a development-only tool
(`.venv/bin/pip install pyinstrument`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery, states
from celery.result import GroupResult

from bench.backends import DATABASES, build_entries
from bench.celeryapp import NOOP, build_app
from bench.jobs import PAYLOAD, run_in_pool_children, seed_ready, worker_parent_app
from bench.runner import CeleryWorker
from bench.services import BenchServices
from bench.settings import ALL_BACKENDS
from bench.stats import median, percentile


def _profiled_ops(app: Celery, params: dict[str, Any]) -> dict[str, Any]:
    from pyinstrument import Profiler

    backend = app.backend
    op: str = params["op"]
    ids: list[str] = params["ids"]
    kwargs = {"timeout": 60, "disable_sync_subtasks": False}

    def clear() -> None:
        cache = getattr(backend, "_cache", None)
        if cache is not None:
            cache.clear()

    def one(task_id: str) -> None:
        if op == "roundtrip":
            app.tasks[NOOP].delay(1).get(timeout=60)
        elif op == "store":
            backend.store_result(task_id, PAYLOAD, states.SUCCESS)
        elif op == "get":
            clear()
            app.AsyncResult(task_id).get(**kwargs)
        elif op == "meta":
            clear()
            backend.get_task_meta(task_id)
        else:
            raise ValueError(op)

    for task_id in params["warm"]:
        backend.store_result(task_id, PAYLOAD, states.SUCCESS)
        backend.get_task_meta(task_id)
        app.AsyncResult(task_id).get(**kwargs)
        if op == "roundtrip":
            app.tasks[NOOP].delay(1).get(timeout=60)
    clear()
    profiler = Profiler(interval=0.0001)
    samples: list[float] = []
    profiler.start()
    if op == "join":
        for _ in range(int(params["joins"])):
            clear()
            result = GroupResult(str(uuid.uuid4()), [app.AsyncResult(i) for i in ids], app=app)
            t0 = time.perf_counter_ns()
            result.get(timeout=600, disable_sync_subtasks=False)
            samples.append((time.perf_counter_ns() - t0) / 1e6)
    else:
        for task_id in ids:
            t0 = time.perf_counter_ns()
            one(task_id)
            samples.append((time.perf_counter_ns() - t0) / 1e6)
    profiler.stop()
    return {"samples": samples, "text": profiler.output_text(
        unicode=True, color=False, show_all=bool(params.get("show_all")))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--backend", choices=ALL_BACKENDS, default="resultstore")
    parser.add_argument("--mode", choices=("worker", "client"), default="worker")
    parser.add_argument("--op", choices=("store", "get", "meta", "join", "roundtrip"),
                        default="store",
                        help="roundtrip: noop.delay().get() against a live worker (--pool)")
    parser.add_argument("--pool", choices=("prefork", "threads"), default="threads",
                        help="the live worker's pool for --op roundtrip")
    parser.add_argument("-n", type=int, default=2000, help="operations (join: group size)")
    parser.add_argument("--joins", type=int, default=5)
    parser.add_argument("--all", action="store_true", help="show library frames too")
    args = parser.parse_args(argv)

    services = BenchServices()
    try:
        services.start(DATABASES)
        entry = next(e for e in build_entries(services, (args.backend,)))
        if not entry.available:
            print(f"{args.backend}: {entry.unavailable_reason}", file=sys.stderr)
            return 2
        run = uuid.uuid4().hex[:6]
        ids = [f"prof-{run}-{i}" for i in range(args.n)]
        warm = [f"prof-warm-{run}-{i}" for i in range(20)]
        if args.op not in ("store", "roundtrip"):
            seed_ready(entry.app, ids)
        params = {"op": args.op, "ids": ids, "warm": warm, "joins": args.joins,
                  "show_all": args.all}
        worker: CeleryWorker | None = None
        run_dir = Path(tempfile.mkdtemp(prefix="resultstore-profile-"))
        try:
            if args.op == "roundtrip":
                worker = CeleryWorker(entry, 2, run_dir / "worker.log", pool=args.pool)
                worker.start()
            if args.mode == "worker":
                app = worker_parent_app(entry.app)
                out = run_in_pool_children(app, _profiled_ops, [params])[0]
            else:
                out = _profiled_ops(build_app(entry.app), params)
        finally:
            if worker is not None:
                worker.stop()
            shutil.rmtree(run_dir, ignore_errors=True)
        print(out["text"])
        samples = out["samples"]
        print(f"{args.backend} {args.mode} {args.op}: n={len(samples)} "
              f"median {median(samples):.3f} ms, p99 {percentile(samples, 99):.3f} ms")
        return 0
    finally:
        services.stop()


if __name__ == "__main__":
    sys.exit(main())
