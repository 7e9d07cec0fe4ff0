"""`resultstore-dev postgres|redis start` leaves a server running after the command returns
(what the README's Development table promises), `env` tells where, a second `start` refuses
while it runs and recovers from a stale record, and `stop` leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from resultstore_devtools.procs import port_open

pytestmark = pytest.mark.integration


def _dev(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RESULTSTORE_STATE_DIR": str(state_dir)}
    return subprocess.run([sys.executable, "-m", "resultstore_devtools.cli", *args],
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: PostgreSQL runs as an unprivileged user, which must be
    # able to reach its data directory (pytest's base directory is private to root).
    root = Path(tempfile.mkdtemp(prefix="resultstore-dev-cli-"))
    root.chmod(0o755)
    try:
        yield root / "state"
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("service,variable", [("postgres", "RESULTSTORE_PG_URL"),
                                              ("redis", "RESULTSTORE_REDIS_URL")])
def test_started_service_outlives_the_command(service: str, variable: str,
                                              state_dir: Path) -> None:
    started = _dev(state_dir, service, "start")
    try:
        assert started.returncode == 0, started.stderr
        assert f"export {variable}=" in started.stdout
        port = json.loads((state_dir / f"{service}.json").read_text())["port"]
        assert port_open(port), f"{service} died when `start` returned:\n{started.stderr}"
        env = _dev(state_dir, service, "env")
        assert env.returncode == 0 and f"export {variable}=" in env.stdout, env.stderr
        again = _dev(state_dir, service, "start")
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        stopped = _dev(state_dir, service, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not port_open(port), f"{service} still listens on {port} after stop"
    assert not (state_dir / f"{service}.json").exists()
    # a stale record (server gone) is reported by env and replaced by the next start
    (state_dir / f"{service}.json").write_text(json.dumps({"port": port, "pid": 4194311,
                                                             "password": "x"}))
    stale = _dev(state_dir, service, "env")
    assert stale.returncode == 1 and "not running" in stale.stderr
    restarted = _dev(state_dir, service, "start")
    try:
        assert restarted.returncode == 0, restarted.stderr
    finally:
        assert _dev(state_dir, service, "stop").returncode == 0


def test_pgbouncer_in_front_of_the_dev_postgres(state_dir: Path) -> None:
    """`resultstore-dev pgbouncer start` needs the dev postgres, outlives the command, lets
    the superuser log in with SCRAM in transaction mode, and `stop` leaves nothing behind."""
    refused = _dev(state_dir, "pgbouncer", "start")
    assert refused.returncode == 1 and "postgres start" in refused.stderr
    assert _dev(state_dir, "postgres", "start").returncode == 0
    try:
        started = _dev(state_dir, "pgbouncer", "start")
        assert started.returncode == 0, started.stderr
        record = json.loads((state_dir / "pgbouncer.json").read_text())
        port = int(record["port"])
        assert port_open(port), f"pgbouncer died when `start` returned:\n{started.stderr}"
        status = _dev(state_dir, "pgbouncer", "status")
        assert status.returncode == 0 and "pool_mode=transaction" in status.stdout
        assert record["admin_password"] not in status.stdout
        env = _dev(state_dir, "pgbouncer", "env")
        url = env.stdout.split("RESULTSTORE_PGBOUNCER_URL='", 1)[1].split("'", 1)[0]
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"),
                             autocommit=True) as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            # PgBouncer hands the client a made-up process id (BackendKeyData)
            assert row is not None and row[0] != conn.info.backend_pid
        again = _dev(state_dir, "pgbouncer", "start")
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        stopped = _dev(state_dir, "pgbouncer", "stop")
        _dev(state_dir, "postgres", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not port_open(port), f"pgbouncer still listens on {port} after stop"
    assert not (state_dir / "pgbouncer.json").exists()
