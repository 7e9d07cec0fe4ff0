"""Private services never outlive a killed session.

A SIGKILLed pytest (or demo) runs no finalizer. PostgreSQL is daemonised by pg_ctl, so a
watchdog stops it and removes its directory; Redis and PgBouncer carry a parent-death signal
(and a watchdog removes their directories: PgBouncer's holds its auth_file, Redis's its log).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from resultstore_devtools.procs import eventually, port_open

CHILD = """
import json, sys, time
from resultstore_devtools.postgres import PostgresServer
from resultstore_devtools.redis import RedisServer
from resultstore_devtools.pgbouncer import PgBouncer
pg = PostgresServer(durable=False); pg.start()
redis = RedisServer(); redis.start()
bouncer = PgBouncer(pg); bouncer.start()
print(json.dumps({"pg_port": pg.port, "pg_dir": str(pg.base_dir), "redis_port": redis.port,
                  "redis_dir": str(redis.base_dir), "bouncer_port": bouncer.port,
                  "bouncer_dir": str(bouncer.base_dir)}),
      flush=True)
time.sleep(600)
"""


def test_services_stop_when_their_owner_is_killed() -> None:
    owner = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        info = json.loads(owner.stdout.readline())
        assert port_open(info["pg_port"]) and port_open(info["redis_port"]), info
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=10)
        started = time.monotonic()
        eventually(lambda: not port_open(info["pg_port"]), 60,
                   "PostgreSQL to stop after its owner was SIGKILLed")
        eventually(lambda: not port_open(info["redis_port"]), 30,
                   "Redis to stop after its owner was SIGKILLed")
        eventually(lambda: not Path(info["pg_dir"]).exists(), 30,
                   "the private cluster's directory to be removed")
        eventually(lambda: not Path(info["redis_dir"]).exists(), 30,
                   "Redis's directory (its log) to be removed")
        eventually(lambda: not port_open(info["bouncer_port"]), 30,
                   "PgBouncer to stop after its owner was SIGKILLed")
        eventually(lambda: not Path(info["bouncer_dir"]).exists(), 30,
                   "PgBouncer's directory (its auth_file) to be removed")
        assert time.monotonic() - started < 60
    finally:
        if owner.poll() is None:
            owner.kill()
        if "info" in locals():  # whatever a failed watchdog left
            for key in ("pg_dir", "redis_dir", "bouncer_dir"):
                shutil.rmtree(info[key], ignore_errors=True)
