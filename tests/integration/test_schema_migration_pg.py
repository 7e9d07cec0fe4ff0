"""Schema migration 2 (task ``group_id`` / ``parent_id``) on PostgreSQL.

A store created by version-1 code (the same tables, without the two columns) is upgraded
in place by ``migrate``: the columns are added nullable, existing rows keep their values,
the version table records 2, a second run changes nothing, and a least-privilege worker
role (DML grants on the tables, none on columns) then stores and reads the ids.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from celery import Celery, states
from celery.app.task import Context
from celery.result import AsyncResult

from resultstore_backend.schema import SCHEMA_VERSION, TableNames, current_version, migrate
from tests.integration.stores import create_role, create_store

pytestmark = pytest.mark.integration


def _columns(dsn: str) -> dict[str, tuple[str, int | None, str]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT column_name, data_type, character_maximum_length, is_nullable "
            "FROM information_schema.columns WHERE table_schema = 'rs' "
            "AND table_name = 'celery_taskmeta'").fetchall()
    return {name: (kind, length, nullable) for name, kind, length, nullable in rows}


def test_version_1_store_upgraded_in_place(pg_database: Any) -> None:
    names = create_store(pg_database)
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        # exactly what version-1 code left behind, with a row in it
        conn.execute("ALTER TABLE rs.celery_taskmeta DROP COLUMN group_id, "
                     "DROP COLUMN parent_id")
        conn.execute("DELETE FROM rs.resultstore_schema_version WHERE version > 1")
        conn.execute("INSERT INTO rs.celery_taskmeta (task_id, status) VALUES ('old', 'X')")
    assert "group_id" not in _columns(pg_database.dsn())
    engine = sa.create_engine(pg_database.url())
    try:
        with engine.connect() as conn:
            assert current_version(conn, names) == 1
            conn.commit()  # migrate() commits only a transaction of its own
            assert migrate(conn, names) == SCHEMA_VERSION == 2
            assert migrate(conn, names) == 2
            versions = conn.execute(sa.text(
                "SELECT version FROM rs.resultstore_schema_version ORDER BY version")).all()
        assert [v for (v,) in versions] == [1, 2]
    finally:
        engine.dispose()
    cols = _columns(pg_database.dsn())
    for column in ("group_id", "parent_id"):
        assert cols[column] == ("character varying", 155, "YES"), (column, cols[column])
    with psycopg.connect(pg_database.dsn()) as conn:
        assert conn.execute("SELECT status, group_id, parent_id FROM rs.celery_taskmeta "
                            "WHERE task_id = 'old'").fetchone() == ("X", None, None)

    # a worker role with table grants only stores and reads the new columns
    role, password = create_role(pg_database, names)
    url = "resultstore+" + pg_database.url(user=role, password=password) + "?schema=rs"
    app = Celery("w", backend=url, set_as_current=False)
    app.conf.resultstore_create_tables = False
    try:
        b = app.backend
        request = Context(id="new", group="g-1", parent_id="p-1", task="rs.x")
        b.store_result("new", 7, states.SUCCESS, request=request)
        meta = b.get_task_meta("new", cache=False)
        assert (meta["group_id"], meta["parent_id"]) == ("g-1", "p-1"), meta
        old = b.get_task_meta("old", cache=False)
        assert "group_id" not in old and "parent_id" not in old, old
    finally:
        app.close()


def test_operator_upgrades_its_version_1_store(pg_database: Any) -> None:
    """The operator's provisioning transaction on a store it provisioned at version 1:
    migrated to 2 with its markers unchanged (ADD COLUMN rewrites the table's catalog row;
    an object that existed before and is marked ours is no conflict)."""
    from resultstore_operator import database as dbio
    from resultstore_operator.builders import marker as m

    owner = m.Owner("team-a", "orders", "aaaaaaaa-0000-0000-0000-000000000001")
    names = TableNames("rs")
    server = pg_database.server
    target = dbio.Target(server.host, server.port, pg_database.name, "disable",
                         connect_timeout=5)
    admin = dbio.Credentials(server.superuser, server.password)

    def provision(db: dbio.AdminSession) -> tuple[int, int]:
        plan = m.assess(owner, db.inventory("rs", ()), names.all_tables(),
                        names.all_sequences())
        assert plan.conflict is None, plan.conflict
        return db.migrate(names, plan)

    def markers() -> list[tuple[str, str | None]]:
        with psycopg.connect(pg_database.dsn()) as conn:
            return conn.execute(
                "SELECT c.relname, obj_description(c.oid, 'pg_class') FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'rs' "
                "AND c.relkind IN ('r', 'S') ORDER BY 1").fetchall()

    with dbio.AdminSession(target, admin, owner) as db:
        assert provision(db) == (0, SCHEMA_VERSION)
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        conn.execute("ALTER TABLE rs.celery_taskmeta DROP COLUMN group_id, "
                     "DROP COLUMN parent_id")
        conn.execute("DELETE FROM rs.resultstore_schema_version WHERE version > 1")
    before = markers()
    assert before and all(comment and "team-a/orders" in comment for _, comment in before)
    with dbio.AdminSession(target, admin, owner) as db:
        assert provision(db) == (1, 2)
        assert provision(db) == (2, 2)
    assert markers() == before
    assert {"group_id", "parent_id"} <= set(_columns(pg_database.dsn()))


@pytest.mark.parametrize("notify", [True, False], ids=["notify", "no-notify"])
def test_new_worker_on_a_version_1_store_keeps_working(pg_database: Any, notify: bool,
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    """Workers upgraded before their store was migrated (no DDL rights): every store and
    read works as with the previous release (no id keys), with one warning naming the
    table; nothing fails."""
    names = create_store(pg_database)
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        conn.execute("ALTER TABLE rs.celery_taskmeta DROP COLUMN group_id, "
                     "DROP COLUMN parent_id")
        conn.execute("DELETE FROM rs.resultstore_schema_version WHERE version > 1")
    role, password = create_role(pg_database, names)
    url = "resultstore+" + pg_database.url(user=role, password=password) + "?schema=rs"
    app = Celery("w", backend=url, set_as_current=False)
    app.conf.update(resultstore_create_tables=False, resultstore_notify=notify)
    caplog.set_level("WARNING", logger="resultstore_backend.backend")
    try:
        b = app.backend
        request = Context(id="m1", group="g-1", parent_id="p-1", task="rs.x")
        b.store_result("m1", 7, states.SUCCESS, request=request)
        b.store_result("m2", None, states.STARTED, request=request)
        b.store_result("m2", 8, states.SUCCESS, request=request)
        meta = b.get_task_meta("m1", cache=False)
        assert meta["result"] == 7 and not {"group_id", "parent_id"} & set(meta), meta
        assert AsyncResult("m2", app=app).get(timeout=10) == 8
        assert dict(b.get_many(["m1", "m2"], timeout=10))["m2"]["result"] == 8
        assert b.decode(b.mget([b.get_key_for_task("m1")])[0])["result"] == 7
        warnings = [r.getMessage() for r in caplog.records
                    if "schema version 1" in r.getMessage()]
        assert len(warnings) == 1 and "rs.celery_taskmeta" in warnings[0], warnings
        assert password not in warnings[0]
    finally:
        app.close()
    with psycopg.connect(pg_database.dsn()) as conn:
        assert conn.execute("SELECT task_id, status FROM rs.celery_taskmeta ORDER BY 1"
                            ).fetchall() == [("m1", "SUCCESS"), ("m2", "SUCCESS")]


def _catalog(dsn: str, schema: str) -> dict[str, Any]:
    """Everything a store's DDL decides, with the schema's name taken out."""
    queries = {
        "columns": "SELECT table_name, column_name, ordinal_position, data_type, "
                   "character_maximum_length, is_nullable, column_default "
                   "FROM information_schema.columns WHERE table_schema = %(s)s",
        "constraints": "SELECT t.relname, c.conname, c.contype, pg_get_constraintdef(c.oid) "
                       "FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
                       "WHERE t.relnamespace = %(s)s::regnamespace",
        "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes "
                   "WHERE schemaname = %(s)s",
        "sequences": "SELECT sequence_name, data_type, start_value, increment "
                     "FROM information_schema.sequences WHERE sequence_schema = %(s)s",
        "owned_sequences": "SELECT s.relname, t.relname FROM pg_depend d "
                           "JOIN pg_class s ON s.oid = d.objid "
                           "JOIN pg_class t ON t.oid = d.refobjid "
                           "WHERE s.relkind = 'S' AND s.relnamespace = %(s)s::regnamespace",
        "versions": f"SELECT version, description FROM {schema}.resultstore_schema_version",
    }
    with psycopg.connect(dsn) as conn:
        return {key: sorted(tuple(str(v).replace(schema, "<schema>") for v in row)
                            for row in conn.execute(query, {"s": schema}).fetchall())
                for key, query in queries.items()}


def test_fresh_store_script_builds_what_the_migrations_build(pg_database: Any) -> None:
    """A new store's tables come from one compiled script (schema._fresh_script); a schema
    that already holds one of the store's objects runs the migrations step by step. The two
    must leave the same catalog, or stores would differ by how they were created."""
    dsn = pg_database.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA scripted")
        conn.execute("CREATE SCHEMA stepwise")
        # one object of the store already there: not fresh, so the migrations run one by one
        conn.execute("CREATE SEQUENCE stepwise.task_id_sequence")
    engine = sa.create_engine(pg_database.url())
    try:
        with engine.connect() as conn:
            assert migrate(conn, TableNames("scripted")) == SCHEMA_VERSION
            assert migrate(conn, TableNames("stepwise")) == SCHEMA_VERSION
            assert migrate(conn, TableNames("scripted")) == SCHEMA_VERSION  # idempotent
    finally:
        engine.dispose()
    scripted, stepwise = _catalog(dsn, "scripted"), _catalog(dsn, "stepwise")
    assert scripted["columns"], "the script created no tables"
    for key in scripted:
        assert scripted[key] == stepwise[key], (
            f"{key} of a store created by the script differ from the migrations': "
            f"only scripted {sorted(set(scripted[key]) - set(stepwise[key]))}, "
            f"only stepwise {sorted(set(stepwise[key]) - set(scripted[key]))}")
