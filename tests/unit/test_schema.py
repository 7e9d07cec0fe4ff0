from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from resultstore_backend.schema import (
    SCHEMA_VERSION,
    TableNames,
    current_version,
    migrate,
    tables_for,
)


def test_schema_module_does_not_import_celery() -> None:
    code = (
        "import sys, resultstore_backend.schema, resultstore_backend.config, "
        "resultstore_backend.identifiers, resultstore_backend;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('celery','kombu','kopf','kubernetes')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_table_names_validated() -> None:
    with pytest.raises(ValueError):
        TableNames("bad-schema")
    with pytest.raises(ValueError):
        TableNames("s", "same", "same")
    names = TableNames("s")
    assert names.qualified(names.task_table) == '"s"."celery_taskmeta"'
    assert "resultstore_cleanup_runs" in names.all_tables()
    assert "resultstore_schema_version" in names.all_tables()
    assert set(names.all_sequences()) >= {"task_id_sequence", "taskset_id_sequence"}


def test_stock_compatible_layout() -> None:
    t = tables_for(TableNames("s"))
    cols = set(t.task.c.keys())
    assert {"id", "task_id", "status", "result", "date_done", "traceback", "name", "args",
            "kwargs", "worker", "retries", "queue", "children", "stamps"} <= cols
    assert isinstance(t.task.c.result.type, sa.LargeBinary)
    assert t.task.c.date_done.type.timezone  # type: ignore[attr-defined]
    assert set(t.group.c.keys()) >= {"id", "taskset_id", "result", "date_done"}
    assert t.task.c.id.default.name == "task_id_sequence"  # type: ignore[union-attr]
    assert any(ix.name == "ix_celery_taskmeta_date_done" for ix in t.task.indexes)


def test_migrate_sqlite_idempotent(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/r.db")
    names = TableNames()
    with engine.connect() as conn:
        assert current_version(conn, names) == 0
        assert migrate(conn, names) == SCHEMA_VERSION
        assert migrate(conn, names) == SCHEMA_VERSION
        assert current_version(conn, names) == SCHEMA_VERSION
        rows = conn.execute(sa.text("select count(*) from resultstore_schema_version")).scalar()
        assert rows == SCHEMA_VERSION
        insp = sa.inspect(conn)
        for table in names.all_tables():
            assert insp.has_table(table), table


def test_migrate_adopts_stock_table(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/r.db")
    with engine.begin() as conn:
        conn.execute(sa.text(
            "CREATE TABLE celery_taskmeta (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "task_id VARCHAR(155) UNIQUE, status VARCHAR(50), result BLOB, date_done DATETIME, "
            "traceback TEXT)"))
        conn.execute(sa.text("INSERT INTO celery_taskmeta (task_id, status) VALUES ('a', 'X')"))
    with engine.connect() as conn:
        migrate(conn, TableNames())
        cols = {c["name"] for c in sa.inspect(conn).get_columns("celery_taskmeta")}
        assert {"children", "stamps", "updated_at", "name"} <= cols
        assert conn.execute(sa.text("select status from celery_taskmeta")).scalar() == "X"


def _downgrade_to_v1_sqlite(conn: sa.Connection) -> None:
    """Turn a fresh store into exactly what version-1 code created (no id columns)."""
    for column in ("group_id", "parent_id"):
        conn.execute(sa.text(f"ALTER TABLE celery_taskmeta DROP COLUMN {column}"))
    conn.execute(sa.text("DELETE FROM resultstore_schema_version WHERE version > 1"))
    conn.commit()


def test_migration_2_adds_group_and_parent_ids(tmp_path: Path) -> None:
    """A version-1 store gains nullable group_id/parent_id, keeps its rows, records 2."""
    engine = sa.create_engine(f"sqlite:///{tmp_path}/r.db")
    names = TableNames()
    with engine.connect() as conn:
        migrate(conn, names)
        _downgrade_to_v1_sqlite(conn)
        assert current_version(conn, names) == 1
        conn.execute(sa.text("INSERT INTO celery_taskmeta (task_id, status) VALUES ('a', 'X')"))
        conn.commit()
        assert migrate(conn, names) == SCHEMA_VERSION == 2
        assert migrate(conn, names) == 2
        cols = {c["name"]: c for c in sa.inspect(conn).get_columns("celery_taskmeta")}
        for column in ("group_id", "parent_id"):
            assert cols[column]["nullable"], column
            assert getattr(cols[column]["type"], "length", None) == 155, cols[column]
        row = conn.execute(sa.text(
            "select status, group_id, parent_id from celery_taskmeta")).one()
        assert tuple(row) == ("X", None, None)
        described = conn.execute(sa.text(
            "select version, description from resultstore_schema_version order by version"
        )).all()
        assert [v for v, _ in described] == [1, 2] and "group_id" in described[1][1]


def test_version_check_of_many_schemas_keeps_nothing_per_schema(tmp_path: Path) -> None:
    """The operator asks every store's version on each drift check: with 1000 stores a
    statement per schema kept 1000 table sets alive through the engine's statement cache.
    SQLite's attached databases stand in for PostgreSQL schemas here."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'main.db'}")
    schemas = [f"store_{i}" for i in range(9)]  # SQLite attaches at most 10
    try:
        with engine.connect() as conn:
            for schema in schemas:
                conn.exec_driver_sql(f"ATTACH DATABASE '{tmp_path / schema}.db' AS {schema}")
                migrate(conn, TableNames(schema))
            tables_for.cache_clear()
            cache = engine._compiled_cache
            assert cache is not None
            versions = [current_version(conn, TableNames(schema)) for schema in schemas[:2]]
            entries_after_two = len(cache)
            versions += [current_version(conn, TableNames(schema)) for schema in schemas[2:]]
            # a migrate of a current store is the same check plus the advisory lock
            versions += [migrate(conn, TableNames(schema)) for schema in schemas]
            conn.commit()
            assert versions == [SCHEMA_VERSION] * (2 * len(schemas)), (
                "each attached schema must read back as migrated")
            assert len(cache) == entries_after_two, (
                f"checking {len(schemas)} schemas left {len(cache)} compiled statements, "
                f"{entries_after_two} after two: the version query is compiled per schema")
            built = tables_for.cache_info().currsize
            assert built <= 1, (
                f"checking versions built {built} per-schema table sets (expected only "
                "the schema-less one the version query is made from)")
            # the schema-less statement reads each schema's own table, not the first one's
            conn.exec_driver_sql(f"DELETE FROM {schemas[5]}.resultstore_schema_version")
            assert current_version(conn, TableNames(schemas[5])) == 0
            assert current_version(conn, TableNames(schemas[6])) == SCHEMA_VERSION
    finally:
        engine.dispose()
