"""A private PostgreSQL cluster for one test session, benchmark or demo.

A private cluster (initdb + pg_ctl in a temporary directory, a free port on 127.0.0.1,
SCRAM password authentication) keeps tests independent of whatever server the machine may
run, and exercises the same password-authenticated TCP path that production uses.
"""

from __future__ import annotations

import glob
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from .procs import (
    LOOPBACK,
    chown_tree,
    demote,
    disarm_watchdog,
    find_binary,
    free_port,
    service_user,
    start_watchdog,
)

PG_BIN_DIRS = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)


@dataclass
class PostgresServer:
    """One private cluster; start() is idempotent and stop() leaves nothing running."""

    base_dir: Path | None = None
    port: int = 0
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    superuser: str = "postgres"
    host: str = LOOPBACK
    durable: bool = True
    max_connections: int = 300
    extra_settings: dict[str, str] = field(default_factory=dict)
    #: keep running after this process exits (``resultstore-dev postgres start``); tests and
    #: the demo leave it off so a killed session never leaves a server behind
    detached: bool = False
    _owns_dir: bool = False
    _initialised: bool = False
    _watchdog: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="resultstore-pg-"))
            self._owns_dir = True
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        self._ids = service_user()
        self._initdb = find_binary("initdb", PG_BIN_DIRS)
        self._pg_ctl = find_binary("pg_ctl", PG_BIN_DIRS)

    @property
    def data_dir(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "data"

    @property
    def log_file(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "postgres.log"

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            list(args),
            preexec_fn=demote(self._ids),  # noqa: PLW1509 - needed to leave root
            capture_output=True,
            text=True,
            cwd="/",
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{Path(args[0]).name} failed ({result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}"
                f"{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        if self.log_file.exists():
            return "\n--- postgres log ---\n" + "\n".join(
                self.log_file.read_text(errors="replace").splitlines()[-20:]
            )
        return ""

    def initdb(self) -> None:
        assert self.base_dir is not None
        if (self.data_dir / "PG_VERSION").exists():
            self._initialised = True
            return
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        chown_tree(self.base_dir, self._ids)
        self._run(
            self._initdb,
            "-D", str(self.data_dir),
            "-U", self.superuser,
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--no-locale",
        )
        pwfile.unlink()
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.data_dir}'",
            "max_connections": str(self.max_connections),
            "shared_buffers": "'256MB'",
            "log_min_messages": "warning",
            "timezone": "'UTC'",
        }
        if not self.durable:
            # Tests only: skip fsync so DDL-heavy suites run fast. synchronous_commit
            # stays on, so commit semantics are unchanged.
            settings["fsync"] = "off"
            settings["full_page_writes"] = "off"
        settings.update(self.extra_settings)
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# celery-resultstore private cluster\n")
            for key, value in settings.items():
                conf.write(f"{key} = {value}\n")
        self._initialised = True

    def start(self) -> None:
        if not self._initialised:
            self.initdb()
        if self.running():
            return
        if not self.detached and (self._watchdog is None or self._watchdog.poll() is not None):
            # pg_ctl daemonises the server: nothing would stop it if this process were killed.
            self._watchdog = start_watchdog(
                [self._pg_ctl, "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"],
                self.base_dir if self._owns_dir else None, self._ids)
        self._run(
            self._pg_ctl, "-D", str(self.data_dir), "-l", str(self.log_file), "-w", "-t", "60",
            "start",
        )

    def stop(self) -> None:
        if self.data_dir.exists() and self.running():
            self._run(self._pg_ctl, "-D", str(self.data_dir), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def running(self) -> bool:
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        result = subprocess.run(
            [self._pg_ctl, "-D", str(self.data_dir), "status"],
            preexec_fn=demote(self._ids),  # noqa: PLW1509
            capture_output=True,
            cwd="/",
        )
        return result.returncode == 0

    def destroy(self) -> None:
        self.stop()
        disarm_watchdog(self._watchdog)
        self._watchdog = None
        if self._owns_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def url(
        self,
        database: str = "postgres",
        user: str | None = None,
        password: str | None = None,
        driver: str = "postgresql+psycopg",
    ) -> str:
        """SQLAlchemy URL; defaults to the superuser."""
        user = user or self.superuser
        password = self.password if password is None else password
        return (
            f"{driver}://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{self.host}:{self.port}/{database}"
        )

    def dsn(self, database: str = "postgres", user: str | None = None,
            password: str | None = None) -> str:
        """libpq connection string (for psycopg.connect)."""
        return self.url(database, user, password, driver="postgresql")

    def create_database(self, name: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop_database(self, name: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()
