"""The benchmark's quick mode runs end to end and prints a complete table.

No timing assertions: numbers on a shared 2-core machine are noise for a test. This only
proves the harness works (services start, every phase runs for every installed backend, the
table and the JSON record are complete, the PgBouncer section included), so the full run is
never the first run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

EXPECTED_METRICS = (
    "store_result latency",
    "get: AsyncResult.get (ready)",
    "get: backend.get_task_meta",
    "get: client / worker (AsyncResult.get)",
    "join 100 ready (GroupResult.get)",
    "delay -> get round trip, no-op task",
    "group 100: dispatch -> join done",
    "chord 100: dispatch -> callback result in caller",
    "chord 50: last header stored -> callback start",
    "8 concurrent writers",
    "8 writers: store latency",
    "1 client waiting for 1 task during 8 writers: CPU",
    "cleanup 20,000 expired rows: duration",
    "writer latency during cleanup (target on p99)",
)

NOTIFY_OFF_METRICS = (
    "8 concurrent writers, resultstore notify=false",
    "1 client waiting for 1 task during 8 writers: CPU, resultstore notify=false",
)


POOLER_ROWS = ("store_result latency | worker", "store_result latency | client",
               "get: AsyncResult.get (ready) | worker", "get: backend.get_task_meta | client",
               "delay -> get round trip, no-op task | prefork",
               "delay -> get round trip, no-op task | threads")


@pytest.mark.integration
@pytest.mark.timeout(700)
def test_quick_benchmark_completes_with_full_table(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--pooler-tasks", "200",
         "--results-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=680,
    )
    assert result.returncode == 0, f"bench failed:\n{result.stdout}\n{result.stderr[-5000:]}"
    out = result.stdout
    assert "=== celery-resultstore benchmark ===" in out
    assert "=== end of benchmark ===" in out
    assert "synchronous_commit=on" in out and "fsync=on" in out
    for metric in EXPECTED_METRICS:
        assert metric in out, f"table lacks {metric!r}:\n{out}"

    files = list(tmp_path.glob("*-quick.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["postgres"]["synchronous_commit"] == "on"
    rows = {(r["metric"], r["mode"]): r for r in record["rows"]}
    # Every row has a number for every backend that ran (Redis has no cleanup to run).
    ran = [b["key"] for b in record["backends"] if b["available"]]
    assert {"stock", "redis"} <= set(ran)
    for (metric, mode), row in rows.items():
        for key in ran:
            if key == "redis" and ("cleanup" in metric):
                continue
            if "resultstore notify=false" in metric and key != "resultstore":
                continue  # the notifications-off twin only exists for the resultstore
            cell = row["cells"].get(key)
            assert cell is not None and cell["median"] == cell["median"], (
                f"{metric}/{mode} has no value for {key}")
        if "resultstore" in ran and row["target"]:
            assert row["result"] in ("PASS", "FAIL"), f"{metric}/{mode}: {row['result']}"
    if "resultstore" in ran:
        for metric in NOTIFY_OFF_METRICS:
            assert metric in out, f"table lacks the notifications-off row {metric!r}:\n{out}"
        assert "resultstore's own store statement" in out, f"no store-statement line:\n{out}"

    # The PgBouncer section of the same run: both columns filled, the connections counted.
    assert "pool_mode=transaction" in out, out
    lines = out.splitlines()
    for row in POOLER_ROWS:
        line = next((text for text in lines if text.startswith(row)), None)
        assert line is not None, f"the PgBouncer table lacks {row!r}:\n{out}"
        direct, pooled = line.split(" | ")[3:5]
        assert "p99" in direct and "p99" in pooled, f"{row}: a column has no value: {line}"
    peaks = {key: value["peak"] for key, value in record["pooler"]["connections"].items()}
    assert peaks["resultstore"]["direct"] >= 1, peaks
    assert peaks["resultstore_pgbouncer"]["pgbouncer_clients"] >= 1, peaks
