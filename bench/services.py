"""The two services of one benchmark run: a durable PostgreSQL and a Redis.

PostgreSQL runs with its durable defaults (fsync on, synchronous_commit on): the issue's
targets only count if results survive a crash, and the report prints what actually ran.
Clients log in as a dedicated non-superuser role with a password over 127.0.0.1, the same
path production uses.
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from resultstore_devtools.postgres import PostgresServer
from resultstore_devtools.redis import RedisServer

BENCH_ROLE = "bench"
REPORTED_SETTINGS = (
    "server_version", "synchronous_commit", "fsync", "full_page_writes", "wal_sync_method",
    "shared_buffers", "max_connections",
)


@dataclass
class BenchServices:
    pg: PostgresServer = field(default_factory=lambda: PostgresServer(durable=True))
    redis: RedisServer = field(default_factory=RedisServer)
    role_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    databases: list[str] = field(default_factory=list)

    def start(self, databases: list[str]) -> None:
        self.pg.start()
        self.redis.start()
        with psycopg.connect(self.pg.dsn(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(BENCH_ROLE), sql.Literal(self.role_password)
                )
            )
            for name in databases:
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(name), sql.Identifier(BENCH_ROLE)
                    )
                )
        self.databases = list(databases)

    def stop(self) -> None:
        self.redis.destroy()
        self.pg.destroy()

    def sa_url(self, database: str, driver: str = "postgresql+psycopg") -> str:
        """SQLAlchemy-style URL for the bench role (password auth over 127.0.0.1)."""
        return self.pg.url(database, BENCH_ROLE, self.role_password, driver)

    def dsn(self, database: str) -> str:
        return self.pg.dsn(database, BENCH_ROLE, self.role_password)

    def admin_dsn(self, database: str = "postgres") -> str:
        return self.pg.dsn(database)

    def pg_settings(self) -> dict[str, str]:
        """The settings that ran, straight from the server (not from our config file)."""
        with psycopg.connect(self.dsn(self.databases[0])) as conn:
            out: dict[str, str] = {}
            for name in REPORTED_SETTINGS:
                row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
                out[name] = str(row[0]) if row else "?"
            return out

    def redis_version(self) -> str:
        try:
            text = subprocess.run(
                [self.redis._binary, "--version"], capture_output=True, text=True, check=False
            ).stdout
        except OSError:
            return "?"
        for part in text.split():
            if part.startswith("v="):
                return part[2:]
        return text.strip()
