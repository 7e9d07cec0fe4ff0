"""Benchmark settings: read once from the command line into a frozen dataclass."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
ALL_BACKENDS = ("stock", "redis", "resultstore")


@dataclass(frozen=True)
class BenchSettings:
    """Counts and durations of one run.

    `full()` is the run whose table goes into the issue; `quick()` exercises every code path
    with small counts in well under two minutes (used by tests/integration/test_bench_quick.py).
    """

    quick: bool
    repeats: int  # repeats of the latency suite (store, get, get_task_meta, join) per backend/mode
    n_store: int  # store_result calls per repeat (upper bound; see op_budget_s)
    n_get: int  # AsyncResult.get calls per repeat, and as many get_task_meta calls
    op_budget_s: float  # stop an op series after this long (slow backends); >= min_ops always run
    min_ops: int
    warmup: int  # untimed store_result calls before timing (connections, prepared statements)
    group_size: int  # tasks in the joined group
    writers: int  # concurrent writer processes for the throughput test
    writer_seconds: float
    writer_repeats: int
    chord_parts: int
    chord_repeats: int
    live_group_repeats: int  # repeats of the live group and live chord rows, per worker pool
    live_group_size: int  # tasks in the live group (dispatch -> join done)
    live_chord_parts: int  # header tasks of the live chord (dispatch -> callback result)
    rt_calls: int  # delay -> get round trips per worker pool (upper bound; see rt_budget_s)
    rt_budget_s: float  # stop the round trips after this long (polling backends)
    rt_min: int  # round trips that always run
    live_pools: tuple[str, ...]  # worker pools the live rows run with
    cleanup_rows: int  # expired rows generated before the cleanup run
    cleanup_writer_rate: float  # stores/s of the paced writer running during cleanup
    cleanup_repeats: int
    worker_concurrency: int  # prefork children of the real worker used for chords
    backends: tuple[str, ...]
    results_dir: Path
    #: queued tasks of the PgBouncer section's connections row; 0: no PgBouncer section
    pooler_tasks: int = 4000

    @classmethod
    def full(cls, **overrides: object) -> BenchSettings:
        base = cls(
            quick=False, repeats=5, n_store=1000, n_get=500, op_budget_s=4.0, min_ops=50,
            warmup=50, group_size=1000, writers=8, writer_seconds=5.0, writer_repeats=3,
            chord_parts=1000, chord_repeats=3, live_group_repeats=3, live_group_size=100,
            live_chord_parts=100, rt_calls=100, rt_budget_s=30.0, rt_min=20,
            live_pools=("prefork", "threads"), cleanup_rows=1_000_000,
            cleanup_writer_rate=200.0, cleanup_repeats=1, worker_concurrency=2,
            backends=ALL_BACKENDS, results_dir=BENCH_DIR / "results",
        )
        return base.replace(**overrides)

    @classmethod
    def quick_mode(cls, **overrides: object) -> BenchSettings:
        base = cls.full().replace(
            quick=True, repeats=1, n_store=100, n_get=50, op_budget_s=1.0, min_ops=20,
            warmup=10, group_size=100, writer_seconds=1.0, writer_repeats=1, chord_parts=50,
            chord_repeats=1, live_group_repeats=1, rt_calls=10, rt_budget_s=5.0, rt_min=5,
            cleanup_rows=20_000, pooler_tasks=800,
        )
        return base.replace(**overrides)

    def replace(self, **overrides: object) -> BenchSettings:
        data = asdict(self)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return BenchSettings(**data)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["results_dir"] = str(self.results_dir)
        data["backends"] = list(self.backends)
        data["live_pools"] = list(self.live_pools)
        return data


def parse_args(argv: list[str] | None) -> BenchSettings:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark stock Celery db+, Redis and the resultstore backend on one "
        "private durable PostgreSQL and one Redis; prints one table and writes JSON.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="small counts, every code path, < 2 minutes")
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated subset of {','.join(ALL_BACKENDS)}")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--chord-parts", type=int, default=None)
    parser.add_argument("--chord-repeats", type=int, default=None)
    parser.add_argument("--writers", type=int, default=None)
    parser.add_argument("--writer-seconds", type=float, default=None)
    parser.add_argument("--cleanup-rows", type=int, default=None,
                        help="expired rows to generate for the cleanup test "
                        "(default 1000000, --quick 20000)")
    parser.add_argument("--cleanup-repeats", type=int, default=None)
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--pooler-tasks", type=int, default=None,
                        help="queued tasks of the PgBouncer section's connections row "
                        "(default 4000, --quick 800)")
    parser.add_argument("--no-pooler", action="store_true",
                        help="skip the PgBouncer section (resultstore direct vs through "
                        "PgBouncer; also `python -m bench.pooler` alone)")
    args = parser.parse_args(argv)
    backends: tuple[str, ...] | None = None
    if args.backends:
        backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
        unknown = sorted(set(backends) - set(ALL_BACKENDS))
        if unknown:
            parser.error(f"unknown backends: {', '.join(unknown)}")
    overrides: dict[str, object] = {
        "backends": backends, "repeats": args.repeats, "group_size": args.group_size,
        "chord_parts": args.chord_parts, "chord_repeats": args.chord_repeats,
        "writers": args.writers, "writer_seconds": args.writer_seconds,
        "cleanup_rows": args.cleanup_rows, "cleanup_repeats": args.cleanup_repeats,
        "results_dir": args.results_dir,
        "pooler_tasks": 0 if args.no_pooler else args.pooler_tasks,
    }
    if args.quick:
        return BenchSettings.quick_mode(**overrides)
    return BenchSettings.full(**overrides)
