"""Helpers for integration tests: result-store schemas, least-privilege roles, bindings."""

from __future__ import annotations

import secrets
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql

from resultstore_backend.config import Binding, CelerySettings, EngineSettings, PoolerSettings
from resultstore_backend.schema import TableNames, migrate


def create_store(pg_database: Any, schema: str = "rs") -> TableNames:
    """Create the schema and tables as an admin (what the operator does)."""
    names = TableNames(schema)
    engine = sa.create_engine(pg_database.url())
    try:
        with engine.connect() as conn:
            migrate(conn, names)
    finally:
        engine.dispose()
    return names


def create_role(pg_database: Any, names: TableNames, role: str | None = None,
                password: str | None = None) -> tuple[str, str]:
    """A login role with DML rights on the store only (no DDL)."""
    role = role or "rs_" + secrets.token_hex(3)
    password = password or secrets.token_urlsafe(16) + "/:@%"
    schema = names.schema or "public"
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(password)))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
            sql.Identifier(pg_database.name), sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
            sql.Identifier(schema), sql.Identifier(role)))
        for table in names.all_tables():
            conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {}.{} TO {}").format(
                sql.Identifier(schema), sql.Identifier(table), sql.Identifier(role)))
        for seq in names.all_sequences():
            conn.execute(sql.SQL("GRANT USAGE, SELECT ON SEQUENCE {}.{} TO {}").format(
                sql.Identifier(schema), sql.Identifier(seq), sql.Identifier(role)))
    return role, password


def binding_for(pg_database: Any, role: str, password: str, *, schema: str = "rs",
                application_name: str = "celery-resultstore", port: int | None = None,
                extended: bool = False, pooler: PoolerSettings | None = None) -> Binding:
    server = pg_database.server
    return Binding(
        host=server.host, port=port or server.port, database=pg_database.name, username=role,
        password=password, sslmode="disable",
        engine=EngineSettings(pool_size=4, application_name=application_name,
                              connect_timeout=3),
        celery=CelerySettings(schema=schema, extended=extended, expires=3600),
        pooler=pooler,
    )
