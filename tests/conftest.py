"""Session-wide services: one private PostgreSQL and one Redis per test session.

Tests that need a service request its fixture; if the service cannot be started the fixture
raises, so the test fails loudly instead of skipping (CI must never go green by skipping).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from resultstore_devtools.postgres import PostgresServer
from resultstore_devtools.redis import RedisServer


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(durable=False)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@dataclass(frozen=True)
class PgDatabase:
    server: PostgresServer
    name: str

    def url(self, user: str | None = None, password: str | None = None,
            driver: str = "postgresql+psycopg") -> str:
        return self.server.url(self.name, user, password, driver)

    def dsn(self, user: str | None = None, password: str | None = None) -> str:
        return self.server.dsn(self.name, user, password)


@pytest.fixture
def pg_database(postgres: PostgresServer) -> Iterator[PgDatabase]:
    """A fresh empty database per test, dropped afterwards (even if sessions linger)."""
    name = "t_" + secrets.token_hex(6)
    postgres.start()  # a previous test may have stopped the server on purpose
    postgres.create_database(name)
    try:
        yield PgDatabase(postgres, name)
    finally:
        if postgres.running():
            postgres.drop_database(name)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()
