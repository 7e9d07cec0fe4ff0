"""Small statistics helpers (median, percentiles) used by jobs and the report.

The benchmark quotes medians and p99, computed with the nearest-rank method so that the
numbers are real observed samples rather than interpolations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; raises on an empty sequence (a missing sample is a bug)."""
    if not values:
        raise ValueError("percentile of no samples")
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no samples")
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2.0


def summary(values: Sequence[float]) -> dict[str, float]:
    """The fields every latency metric carries into the JSON output."""
    return {
        "n": float(len(values)),
        "median": median(values),
        "p99": percentile(values, 99),
        "min": min(values),
        "max": max(values),
    }
