"""A private redis-server (the Celery broker, and the Redis backend the benchmark compares)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .procs import (
    LOOPBACK,
    disarm_watchdog,
    find_binary,
    free_port,
    kill_group,
    port_open,
    start_watchdog,
    wait_for,
)


def _die_with_parent() -> None:
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


@dataclass
class RedisServer:
    port: int = 0
    host: str = LOOPBACK
    base_dir: Path | None = None
    #: keep running after this process exits (``resultstore-dev redis start``)
    detached: bool = False

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port()
        self._owns_dir = self.base_dir is None
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="resultstore-redis-"))
        self._binary = find_binary("redis-server", ["/usr/bin", "/usr/sbin"])
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def db_url(self, db: int) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        assert self.base_dir is not None
        if not self.detached and self._owns_dir and (
                self._watchdog is None or self._watchdog.poll() is not None):
            # redis-server dies with us (parent-death signal); its directory (the log) is
            # removed by a watchdog if we are SIGKILLed and no finalizer runs
            self._watchdog = start_watchdog(["true"], self.base_dir)
        log = (self.base_dir / "redis.log").open("ab")
        self._proc = subprocess.Popen(
            [
                self._binary,
                "--port", str(self.port),
                "--bind", self.host,
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.base_dir),
                "--databases", "64",
                "--protected-mode", "yes",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Killed with us even if we are SIGKILLed (no finalizer runs then).
            preexec_fn=None if self.detached else _die_with_parent,  # noqa: PLW1509
        )
        wait_for(lambda: port_open(self.port, self.host), 20, f"redis-server on {self.port}")

    def stop(self) -> None:
        if self._proc is not None:
            kill_group(self._proc)
            self._proc = None

    def destroy(self) -> None:
        self.stop()
        disarm_watchdog(self._watchdog)
        self._watchdog = None
        if self._owns_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()
