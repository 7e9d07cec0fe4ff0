"""Fixtures of the backend's integration tests: store URLs and real Celery workers."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from celery import Celery

from resultstore_backend.engine import reset_registry
from resultstore_devtools.pgbouncer import PgBouncer
from tests.integration.apps.tasks import define_tasks

ROOT = Path(__file__).resolve().parents[2]
APP_MODULE = "tests.integration.apps.tasks"


@pytest.fixture(autouse=True)
def _fresh_engines() -> Iterator[None]:
    """Each test gets fresh process-local engines (its database is new)."""
    reset_registry()
    yield
    reset_registry()


@pytest.fixture
def pg_store_url(pg_database: Any) -> str:
    """A direct-DSN backend URL on a fresh database, schema ``rs``."""
    return "resultstore+" + pg_database.url() + "?schema=rs"


@pytest.fixture(scope="session")
def pgbouncer(postgres: Any) -> Iterator[PgBouncer]:
    """Debian's PgBouncer in transaction mode in front of the session's PostgreSQL.

    Fails (FileNotFoundError naming scripts/bootstrap) when pgbouncer is not installed:
    the pooler tests are acceptance tests of issue 17 and never skip.
    """
    bouncer = PgBouncer(postgres, pool_mode="transaction")
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.destroy()


@pytest.fixture
def pooled_database(pg_database: Any, pgbouncer: PgBouncer) -> Any:
    """``pg_database``, reachable through ``pgbouncer`` too (its auth_query function)."""
    pgbouncer.install_lookup(pg_database.name)
    return pg_database


@pytest.fixture
def pooled_store_url(pooled_database: Any, pgbouncer: PgBouncer) -> str:
    """``pg_store_url`` with stores and reads through PgBouncer (transaction mode); the
    LISTEN connection stays direct."""
    return ("resultstore+" + pooled_database.url()
            + f"?schema=rs&pooler={pgbouncer.host}:{pgbouncer.port}&pooler_mode=transaction")


def pytest_report_header(config: Any) -> str:
    """The PgBouncer the pooler tests run against (the version decides prepared
    statements: PgBouncer >= 1.21 keeps them in transaction mode)."""
    try:
        from resultstore_devtools.pgbouncer import pgbouncer_version, prepared_statements_in
        from resultstore_devtools.procs import find_binary

        version = pgbouncer_version(find_binary("pgbouncer", ["/usr/sbin", "/usr/bin"]))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return f"pgbouncer: not usable ({exc})"
    supported = "yes" if prepared_statements_in(version) else "no (before 1.21)"
    return (f"pgbouncer: {'.'.join(map(str, version))}; prepared statements in transaction "
            f"mode: {supported}")


@pytest.fixture
def sqlite_store_url(tmp_path: Path) -> str:
    return f"resultstore+sqlite:///{tmp_path}/results.db"


def make_app(backend: str, broker: str = "memory://", queue: str = "celery",
             **conf: Any) -> tuple[Celery, SimpleNamespace]:
    """A client app with the worker's task names, sending to ``queue``."""
    app = Celery("rs_tests_client", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(broker_connection_retry_on_startup=True, task_default_queue=queue,
                    **conf)
    return app, define_tasks(app)


def superuser_conn(pg_database: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(pg_database.dsn(), autocommit=True)


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path
    queue: str
    env: dict[str, str] = field(default_factory=dict)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@dataclass
class WorkerFactory:
    redis_url: str
    tmp_path: Path
    workers: list[Worker] = field(default_factory=list)

    def start(self, backend: str, pool: str = "prefork", concurrency: int = 2,
              queue: str | None = None, extra_env: dict[str, str] | None = None,
              timeout: float = 60.0) -> Worker:
        queue = queue or "q_" + secrets.token_hex(4)
        log = self.tmp_path / f"worker-{queue}-{len(self.workers)}.log"
        env = dict(os.environ)
        env.update({
            "RS_BROKER": self.redis_url, "RS_BACKEND": backend, "RS_QUEUE": queue,
            "RS_REDIS": self.redis_url, "PYTHONPATH": str(ROOT),
        })
        env.update(extra_env or {})
        args = [sys.executable, "-m", "celery", "-A", APP_MODULE, "worker", "--pool", pool,
                "--loglevel", "INFO", "-n", f"{queue}@%h", "-Q", queue,
                "--without-gossip", "--without-mingle", "--without-heartbeat"]
        if pool != "solo":
            args += ["-c", str(concurrency)]
        with log.open("wb") as out:
            proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        worker = Worker(proc, log, queue, env)
        self.workers.append(worker)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{worker.log_text()[-4000:]}")
            if " ready." in worker.log_text():
                return worker
            time.sleep(0.2)
        worker.stop()
        raise RuntimeError(f"worker not ready in {timeout}s:\n{worker.log_text()[-4000:]}")

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.stop()


@pytest.fixture
def workers(redis_server: Any, tmp_path: Path) -> Iterator[WorkerFactory]:
    factory = WorkerFactory(redis_server.url, tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()
