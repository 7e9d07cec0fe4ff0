"""`python -m bench.pooler --quick` runs end to end: every row of the PgBouncer table has a
number in both columns, and the connections row has its peak counts.

No timing assertions (numbers on a shared 2-core machine are noise for a test); this only
proves the harness works, so the recorded run is never its first run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROWS = ("store_result latency | worker", "store_result latency | client",
        "get: AsyncResult.get (ready) | worker", "get: backend.get_task_meta | client",
        "delay -> get round trip, no-op task | prefork",
        "delay -> get round trip, no-op task | threads")


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_quick_pooler_benchmark_completes(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.pooler", "--quick", "--tasks", "200",
         "--results-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=380)
    assert result.returncode == 0, f"bench.pooler failed:\n{result.stdout}\n" \
        f"{result.stderr[-5000:]}"
    out = result.stdout
    assert "pool_mode=transaction" in out, out
    lines = out.splitlines()
    for row in ROWS:
        line = next((text for text in lines if text.startswith(row)), None)
        assert line is not None, f"table lacks {row!r}:\n{out}"
        direct, pooled = line.split(" | ")[3:5]
        assert "p99" in direct and "p99" in pooled, f"{row}: a column has no value: {line}"
    files = list(tmp_path.glob("*-pooler-quick.json"))
    assert len(files) == 1, files
    record = json.loads(files[0].read_text())
    peaks = {key: value["peak"] for key, value in record["connections"].items()}
    assert peaks["resultstore"]["direct"] >= 1, peaks
    assert peaks["resultstore_pgbouncer"]["pgbouncer_clients"] >= 1, peaks
