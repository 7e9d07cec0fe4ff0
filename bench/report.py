"""Turn raw samples into the one table (medians, p99, ratios, targets) and the JSON record.

Targets are the issue's, as ratios from this one run; they are evaluated on the resultstore
column only and never asserted anywhere (the quick-mode test checks completeness, not speed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.stats import median, percentile, summary

Raw = dict[str, dict[str, Any]]
ORDER = ("stock", "redis", "resultstore")
LABELS = {"stock": "stock db+", "redis": "redis", "resultstore": "resultstore"}


@dataclass(frozen=True)
class Cell:
    median: float
    p99: float | None = None
    n: int = 0

    def text(self, digits: int = 3) -> str:
        main = _fmt(self.median, digits)
        if self.p99 is None:
            return main
        return f"{main} (p99 {_fmt(self.p99, digits)})"


def _fmt(value: float, digits: int = 3) -> str:
    if value != value:  # NaN
        return "nan"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


@dataclass(frozen=True)
class Target:
    text: str
    check: Callable[[dict[str, Cell | None]], bool | None]
    #: the measured figure the target is read against, when it is not a column ratio
    detail: Callable[[dict[str, Cell | None]], str | None] | None = None

    def describe(self, cells: dict[str, Cell | None]) -> str:
        extra = self.detail(cells) if self.detail is not None else None
        return f"{self.text} ({extra})" if extra else self.text


@dataclass(frozen=True)
class Row:
    metric: str
    mode: str
    unit: str
    cells: dict[str, Cell | None]
    target: Target | None
    lower_is_better: bool = True

    def ratio(self, num: str, den: str) -> float | None:
        a, b = self.cells.get(num), self.cells.get(den)
        if a is None or b is None or b.median == 0:
            return None
        return a.median / b.median

    def verdict(self) -> str:
        if self.target is None:
            return ""
        if self.cells.get("resultstore") is None:
            return "n/a"
        outcome = self.target.check(self.cells)
        if outcome is None:
            return "n/a"
        return "PASS" if outcome else "FAIL"


def _get(raw: Raw, key: str, *path: str) -> Any:
    node: Any = raw.get(key)
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _latency_cell(values: list[float] | None, scale: float = 1.0) -> Cell | None:
    if not values:
        return None
    return Cell(median(values) * scale, percentile(values, 99) * scale, len(values))


def _median_cell(values: list[float] | None, scale: float = 1.0) -> Cell | None:
    if not values:
        return None
    return Cell(median(values) * scale, None, len(values))


def _vs(ref: str, factor: float) -> Callable[[dict[str, Cell | None]], bool | None]:
    def check(cells: dict[str, Cell | None]) -> bool | None:
        mine, other = cells.get("resultstore"), cells.get(ref)
        if mine is None or other is None:
            return None
        return mine.median <= factor * other.median
    return check


def _at_least_vs(ref: str, factor: float) -> Callable[[dict[str, Cell | None]], bool | None]:
    def check(cells: dict[str, Cell | None]) -> bool | None:
        mine, other = cells.get("resultstore"), cells.get(ref)
        if mine is None or other is None:
            return None
        return mine.median >= factor * other.median
    return check


def _absolute(limit: float, field: str = "median") -> Callable[
        [dict[str, Cell | None]], bool | None]:
    def check(cells: dict[str, Cell | None]) -> bool | None:
        mine = cells.get("resultstore")
        if mine is None:
            return None
        value = mine.p99 if field == "p99" else mine.median
        return value is not None and value <= limit
    return check


def _all(*checks: Callable[[dict[str, Cell | None]], bool | None]
         ) -> Callable[[dict[str, Cell | None]], bool | None]:
    def check(cells: dict[str, Cell | None]) -> bool | None:
        outcomes = [c(cells) for c in checks]
        if any(o is None for o in outcomes):
            return None
        return all(outcomes)
    return check


def _vs_value(value: float | None, factor: float, at_least: bool = False
              ) -> Callable[[dict[str, Cell | None]], bool | None]:
    """resultstore against a figure outside the columns (the floor, the notify-off run)."""
    def check(cells: dict[str, Cell | None]) -> bool | None:
        mine = cells.get("resultstore")
        if mine is None or value is None:
            return None
        return mine.median >= factor * value if at_least else mine.median <= factor * value
    return check


def _ratio_text(value: float | None, name: str) -> Callable[[dict[str, Cell | None]],
                                                            str | None]:
    def detail(cells: dict[str, Cell | None]) -> str | None:
        mine = cells.get("resultstore")
        if mine is None or not value:
            return None
        return f"{mine.median / value:.2f}x {name}"
    return detail


NOTIFY_OFF = "resultstore_off"


def build_rows(raw: Raw, settings: dict[str, Any]) -> list[Row]:
    keys = [k for k in ORDER if k in raw]
    group = settings["group_size"]
    rows: list[Row] = []

    def per(fn: Callable[[str], Cell | None]) -> dict[str, Cell | None]:
        return {k: fn(k) for k in keys}

    def latency_of(mode: str, name: str) -> dict[str, Cell | None]:
        return {k: _latency_cell(_get(raw, k, mode, name)) for k in keys}

    for mode in ("worker", "client"):
        # the floor upserts timed in alternating blocks with these very stores (same
        # process, same moments); the separate floor job's figure when there are none
        paired = _get(raw, "resultstore", mode, "floor_ms") or _get(
            raw, "_floor", "client", "upsert_ms")
        floor = median(paired) if paired else None
        rows.append(Row(
            "store_result latency", mode, "ms",
            latency_of(mode, "store_ms"),
            Target("<= 1.25x PG floor", _vs_value(floor, 1.25),
                   _ratio_text(floor, f"the {_fmt(floor)} ms floor" if floor else "floor")),
        ))
    for mode in ("worker", "client"):
        rows.append(Row(
            "get: AsyncResult.get (ready)", mode, "ms",
            latency_of(mode, "get_ms"),
            Target("<= 1.5x redis", _vs("redis", 1.5)),
        ))
    for mode in ("worker", "client"):
        rows.append(Row(
            "get: backend.get_task_meta", mode, "ms",
            latency_of(mode, "meta_ms"),
            Target("<= 1.2x redis", _vs("redis", 1.2)),
        ))

    def client_over_worker(k: str) -> Cell | None:
        c, w = _get(raw, k, "client", "get_ms"), _get(raw, k, "worker", "get_ms")
        if not c or not w:
            return None
        return Cell(median(c) / median(w), None, 0)

    rows.append(Row("get: client / worker (AsyncResult.get)", "both", "x",
                    per(client_over_worker), Target("<= 1.5", _absolute(1.5))))
    for mode in ("worker", "client"):
        rows.append(Row(
            f"join {group} ready (GroupResult.get)", mode, "ms",
            {k: _median_cell(_get(raw, k, mode, "join_s"), 1000.0) for k in keys},
            Target("<= 0.5x redis", _vs("redis", 0.5)),
        ))
    pools = settings.get("live_pools") or ["prefork"]
    for pool in pools:
        rows.append(Row(
            "delay -> get round trip, no-op task", pool, "ms",
            {k: _latency_cell(_get(raw, k, "live", pool, "rt_ms")) for k in keys},
            Target("<= 1.2x redis", _vs("redis", 1.2)),
        ))
    for pool in pools:
        rows.append(Row(
            f"group {settings['live_group_size']}: dispatch -> join done", pool, "ms",
            {k: _median_cell(_get(raw, k, "live", pool, "live_join_s"), 1000.0) for k in keys},
            Target("<= 1.0x redis", _vs("redis", 1.0)),
        ))
    for pool in pools:
        rows.append(Row(
            f"chord {settings['live_chord_parts']}: dispatch -> callback result in caller",
            pool, "ms",
            {k: _median_cell(_get(raw, k, "live", pool, "live_chord_s"), 1000.0)
             for k in keys},
            Target("<= 1.2x redis", _vs("redis", 1.2)),
        ))
    rows.append(Row(
        f"chord {settings['chord_parts']}: last header stored -> callback start", "prefork",
        "ms", per(lambda k: _median_cell(_get(raw, k, "chord", "chord_ms"))),
        Target("<= 50 ms", _absolute(50.0)),
    ))
    writers = settings["writers"]
    off_values = _get(raw, NOTIFY_OFF, "writers", "throughput")
    off = median(off_values) if off_values else None
    writer_checks = [_at_least_vs("stock", 4.0), _at_least_vs("redis", 1.0)]
    writer_text = ">= 4x stock, >= redis"
    if off is not None:
        writer_checks.append(_vs_value(off, 0.9, at_least=True))
        writer_text += ", >= 0.9x notify=false"
    rows.append(Row(
        f"{writers} concurrent writers", "worker", "stores/s",
        per(lambda k: _median_cell(_get(raw, k, "writers", "throughput"))),
        Target(writer_text, _all(*writer_checks), _ratio_text(off, "notify=false")),
        lower_is_better=False,
    ))
    if off is not None:
        rows.append(Row(
            f"{writers} concurrent writers, resultstore notify=false", "worker", "stores/s",
            {"resultstore": _median_cell(off_values)}, None, lower_is_better=False,
        ))
    rows.append(Row(
        f"{writers} writers: store latency", "worker", "ms",
        per(lambda k: _latency_cell(_get(raw, k, "writers", "latencies_ms"))), None,
    ))
    waiter_metric = f"1 client waiting for 1 task during {writers} writers: CPU"
    rows.append(Row(
        waiter_metric, "client", "CPU s",
        per(lambda k: _median_cell(_get(raw, k, "waiter", "cpu_s"))), None,
    ))
    off_waiter = _get(raw, NOTIFY_OFF, "waiter", "cpu_s")
    if off_waiter:
        rows.append(Row(
            waiter_metric + ", resultstore notify=false", "client", "CPU s",
            {"resultstore": _median_cell(off_waiter)}, None,
        ))
    rows.append(Row(
        f"cleanup {settings['cleanup_rows']:,} expired rows: duration", "client", "s",
        per(lambda k: _median_cell(_get(raw, k, "cleanup", "cleanup_s"))), None,
    ))
    rows.append(Row(
        "writer latency before cleanup", "worker", "ms",
        per(lambda k: _latency_cell(_get(raw, k, "cleanup", "writer_baseline_ms"))), None,
    ))
    rows.append(Row(
        "writer latency during cleanup (target on p99)", "worker", "ms",
        per(lambda k: _latency_cell(_get(raw, k, "cleanup", "writer_during_ms"))),
        Target("p99 <= 10 ms", _absolute(10.0, "p99")),
    ))
    return rows


HEADERS = ("metric", "mode", "unit", *[LABELS[k] for k in ORDER],
           "rs/stock", "rs/redis", "target", "result")


def _na_text(key: str, raw: Raw, unavailable: dict[str, str]) -> str:
    if key in unavailable:
        return "not landed"
    if key not in raw:
        return "skipped"
    return "-"


def render_table(rows: list[Row], raw: Raw, unavailable: dict[str, str]) -> str:
    lines: list[list[str]] = []
    for row in rows:
        cells = []
        for key in ORDER:
            cell = row.cells.get(key)
            cells.append(cell.text() if cell else _na_text(key, raw, unavailable))
        ratios = []
        for ref in ("stock", "redis"):
            value = row.ratio("resultstore", ref)
            ratios.append(f"{value:.2f}x" if value is not None else "-")
        lines.append([row.metric, row.mode, row.unit, *cells, *ratios,
                      row.target.describe(row.cells) if row.target else "", row.verdict()])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(HEADERS)]
    out = [" | ".join(h.ljust(w) for h, w in zip(HEADERS, widths, strict=True))]
    out.append("-+-".join("-" * w for w in widths))
    for line in lines:
        out.append(" | ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)))
    return "\n".join(out)


def rows_json(rows: list[Row]) -> list[dict[str, Any]]:
    data = []
    for row in rows:
        data.append({
            "metric": row.metric, "mode": row.mode, "unit": row.unit,
            "cells": {k: (None if c is None else {"median": c.median, "p99": c.p99, "n": c.n})
                      for k, c in row.cells.items()},
            "ratio_to_stock": row.ratio("resultstore", "stock"),
            "ratio_to_redis": row.ratio("resultstore", "redis"),
            "target": row.target.describe(row.cells) if row.target else None,
            "result": row.verdict() or None,
        })
    return data


def floor_line(raw: Raw) -> str | None:
    """The raw-psycopg reference, printed under the table (no backend can beat it)."""
    data = _get(raw, "_floor", "client")
    if not data or not data.get("upsert_ms"):
        return None
    up = _latency_cell(data["upsert_ms"])
    sel = _latency_cell(data["select_ms"])
    nosync = _latency_cell(data.get("upsert_nosync_ms"))
    assert up is not None and sel is not None
    line = (f"PostgreSQL floor (one psycopg connection, prepared, autocommit, no Celery): "
            f"single-row upsert+commit {up.text()} ms, primary-key select {sel.text()} ms")
    if nosync is not None:
        line += (f"; for reference only, the same upsert with synchronous_commit=off "
                 f"{nosync.text()} ms (what the WAL flush costs; no row above uses it)")
    stmt = _latency_cell(data.get("backend_statement_ms"))
    if stmt is not None:
        line += (f"\nresultstore's own store statement on that raw connection (same parameters "
                 f"builder, notifications as configured): {stmt.text()} ms = "
                 f"{stmt.median / up.median:.2f}x the floor upsert (server-side statement "
                 f"cost; store_result minus this is the backend's client-side cost)")
    return line


def raw_summary(raw: Raw) -> dict[str, Any]:
    """Per-repeat values and latency summaries (not every sample: keeps the file small)."""
    out: dict[str, Any] = {}
    for key, data in raw.items():
        node: dict[str, Any] = {}
        for section, values in data.items():
            if not isinstance(values, dict):
                node[section] = values
                continue
            sec: dict[str, Any] = {}
            for name, value in values.items():
                if isinstance(value, list) and value and name.endswith("_ms") and len(value) > 20:
                    sec[name] = summary(value)
                else:
                    sec[name] = value
            node[section] = sec
        out[key] = node
    return out
