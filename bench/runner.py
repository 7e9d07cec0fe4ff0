"""Launching job processes and real Celery workers from the orchestrator.

Every measurement runs in a fresh interpreter (`python -m bench.jobs`), so no measuring
process ever inherits the orchestrator's connections, caches or fork state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.backends import BackendEntry
from bench.celeryapp import APP_SPEC_ENV
from bench.settings import REPO_ROOT
from resultstore_devtools.procs import kill_group


class JobFailed(RuntimeError):
    pass


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


@dataclass
class JobHandle:
    """A running job; `wait()` returns its result or raises JobFailed with its traceback."""

    proc: subprocess.Popen[bytes]
    out_path: Path
    log_path: Path
    label: str

    def wait(self, timeout: float) -> Any:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            raise JobFailed(f"{self.label}: timed out after {timeout:.0f}s "
                            f"(log: {self.log_path})") from None
        if not self.out_path.exists():
            raise JobFailed(f"{self.label}: exited {self.proc.returncode} without a result\n"
                            f"{_tail(self.log_path)}")
        data = json.loads(self.out_path.read_text())
        if not data["ok"]:
            raise JobFailed(f"{self.label} failed:\n{data['error']}\n{_tail(self.log_path)}")
        return data["result"]


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Runner:
    run_dir: Path
    verbose: bool = True
    _counter: int = field(default=0)

    def start_job(self, entry: BackendEntry, kind: str, mode: str,
                  params: dict[str, Any], children: int = 1) -> JobHandle:
        self._counter += 1
        stem = f"{self._counter:03d}-{entry.key}-{kind}-{mode}"
        job_path = self.run_dir / f"{stem}.job.json"
        out_path = self.run_dir / f"{stem}.out.json"
        log_path = self.run_dir / f"{stem}.log"
        job_path.write_text(json.dumps({
            "app": entry.app.to_json(), "kind": kind, "mode": mode, "params": params,
            "children": children,
        }))
        job_path.chmod(0o600)  # it holds the DSN
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.jobs", str(job_path), str(out_path)],
                cwd=REPO_ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return JobHandle(proc, out_path, log_path, stem)

    def job(self, entry: BackendEntry, kind: str, mode: str, params: dict[str, Any],
            children: int = 1, timeout: float = 1800) -> Any:
        return self.start_job(entry, kind, mode, params, children).wait(timeout)

    def new_dir(self, prefix: str) -> Path:
        path = self.run_dir / f"{prefix}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return path


@dataclass
class CeleryWorker:
    """A real `celery worker -P <pool>` consuming the bench queue for one backend."""

    entry: BackendEntry
    concurrency: int
    log_path: Path
    pool: str = "prefork"
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        extra = {APP_SPEC_ENV: self.entry.app.to_json()}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "bench.celeryapp", "worker",
                 "-P", self.pool, "-c", str(self.concurrency), "-Q", self.entry.app.queue,
                 "-n", f"bench-{self.entry.key}@localhost", "--without-gossip",
                 "--without-mingle", "--without-heartbeat", "-l", "WARNING"],
                cwd=REPO_ROOT, env=_env(extra), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        time.sleep(0.5)
        if self.proc.poll() is not None:
            raise JobFailed(f"celery worker for {self.entry.key} exited at start:\n"
                            f"{_tail(self.log_path)}")

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc, timeout=30)
            self.proc = None

    def __enter__(self) -> CeleryWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
