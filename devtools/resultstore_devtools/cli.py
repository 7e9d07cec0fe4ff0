"""`resultstore-dev`: start, stop and describe the local services for humans.

Tests use the same classes through pytest fixtures; this command exists so a developer can
keep a PostgreSQL, a Redis and a control plane running between commands and point
`kubectl`, `psql` or a worker at them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from .postgres import PostgresServer
from .procs import clear_stale_record, read_record, record_answers, stop_recorded
from .redis import RedisServer

STATE_ROOT = Path(
    os.environ.get("RESULTSTORE_STATE_DIR", "~/.cache/celery-resultstore/run")
).expanduser()


def _state_file(name: str) -> Path:
    return STATE_ROOT / f"{name}.json"


def _postgres(action: str) -> int:
    state = _state_file("postgres")
    if action == "start":
        if not clear_stale_record(state, STATE_ROOT / "postgres"):
            return 1
        STATE_ROOT.mkdir(parents=True, exist_ok=True)
        server = PostgresServer(base_dir=STATE_ROOT / "postgres", detached=True)
        server.start()
        state.write_text(json.dumps({"port": server.port, "password": server.password}))
        state.chmod(0o600)
        print(f"export RESULTSTORE_PG_URL='{server.url()}'")
        return 0
    data = read_record(state, "postgres")
    if data is None:
        return 1
    server = PostgresServer(base_dir=STATE_ROOT / "postgres", port=data["port"],
                            password=data["password"], detached=True)
    server._initialised = True
    if action == "stop":
        server.stop()
        state.unlink()
        shutil.rmtree(STATE_ROOT / "postgres", ignore_errors=True)
        return 0
    if not record_answers(state, "postgres", int(data["port"])):
        return 1
    print(f"export RESULTSTORE_PG_URL='{server.url()}'")
    return 0


def _redis(action: str) -> int:
    state = _state_file("redis")
    if action == "start":
        if not clear_stale_record(state):
            return 1
        STATE_ROOT.mkdir(parents=True, exist_ok=True)
        (STATE_ROOT / "redis").mkdir(exist_ok=True)
        server = RedisServer(base_dir=STATE_ROOT / "redis", detached=True)
        server.start()
        assert server._proc is not None
        state.write_text(json.dumps({"port": server.port, "pid": server._proc.pid}))
        print(f"export RESULTSTORE_REDIS_URL='{server.url}'")
        return 0
    data = read_record(state, "redis")
    if data is None:
        return 1
    if action == "stop":
        stop_recorded(int(data["port"]), int(data["pid"]), "redis-server")
        state.unlink()
        return 0
    if not record_answers(state, "redis", int(data["port"])):
        return 1
    print(f"export RESULTSTORE_REDIS_URL='redis://127.0.0.1:{data['port']}/0'")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "controlplane":
        from . import controlplane

        return int(controlplane.main(argv[1:]) or 0)
    if argv and argv[0] == "node":
        from . import realnode

        return int(realnode.main(argv[1:]) or 0)
    if argv and argv[0] == "pgbouncer":
        from . import pgbouncer

        sub = argparse.ArgumentParser(prog="resultstore-dev pgbouncer")
        sub.add_argument("action", choices=["start", "stop", "status", "env"])
        return pgbouncer.run_cli(sub.parse_args(argv[1:]).action, STATE_ROOT)
    parser = argparse.ArgumentParser(prog="resultstore-dev", description=__doc__)
    parser.add_argument("service", choices=["postgres", "redis", "controlplane"])
    parser.add_argument("action", choices=["start", "stop", "env"])
    args = parser.parse_args(argv)
    return _postgres(args.action) if args.service == "postgres" else _redis(args.action)


if __name__ == "__main__":
    sys.exit(main())
