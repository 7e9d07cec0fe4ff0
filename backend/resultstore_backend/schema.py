"""Tables, DDL and versioned migrations of a result store.

This module is imported by the operator (to create schemas and grant exactly
the right objects) as well as by the backend, so it depends on SQLAlchemy Core
only and never imports Celery.

The task and group tables keep the layout of Celery's stock
``celery_taskmeta`` / ``celery_tasksetmeta`` tables, including the stock
sequence names, so that a stock ``db+`` client whose ``search_path`` points at
the schema can read (and even write) the same rows. Columns of our own are
only ever *added*.

Why one module: the operator imports this file alone (SQLAlchemy Core, no Celery) to
create and grant objects, and every migration is written against the tables defined
here, so a new column, its migration and :data:`SCHEMA_VERSION` change in one place.
Most of its length is the table definitions of :func:`tables_for`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache

import sqlalchemy as sa

from .identifiers import qualify, quote_ident, validate_identifier

__all__ = [
    "SCHEMA_VERSION",
    "ResultTables",
    "TableNames",
    "current_version",
    "migrate",
    "tables_for",
]

logger = logging.getLogger(__name__)

#: The schema version this code writes and expects.
SCHEMA_VERSION = 2

#: Stock Celery sequence names (kept so that a stock client can insert rows).
TASK_SEQUENCE = "task_id_sequence"
GROUP_SEQUENCE = "taskset_id_sequence"
CLEANUP_SEQUENCE = "resultstore_cleanup_runs_id_seq"

CHORD_TABLE = "resultstore_chords"
CHORD_PART_TABLE = "resultstore_chord_parts"
CLEANUP_TABLE = "resultstore_cleanup_runs"
VERSION_TABLE = "resultstore_schema_version"

# Key space of the advisory lock taken by migrate(); the second key is the
# hash of the schema name, so migrations of different schemas don't wait on
# each other.
_ADVISORY_LOCK_CLASS = 0x52535452  # "RSTR"

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


@dataclass(frozen=True)
class TableNames:
    """Where a result store's tables live.

    ``schema`` is ``None`` for SQLite (and for PostgreSQL's default search
    path). Names are validated on construction, so every derived name is safe
    to interpolate (quoted) into SQL.
    """

    schema: str | None = None
    task_table: str = "celery_taskmeta"
    group_table: str = "celery_tasksetmeta"

    def __post_init__(self) -> None:
        if self.schema is not None:
            validate_identifier(self.schema, "schema name")
        validate_identifier(self.task_table, "task table name")
        validate_identifier(self.group_table, "group table name")
        if self.task_table == self.group_table:
            raise ValueError("task and group tables must have different names")

    @property
    def chord_table(self) -> str:
        return CHORD_TABLE

    @property
    def chord_part_table(self) -> str:
        return CHORD_PART_TABLE

    @property
    def cleanup_table(self) -> str:
        return CLEANUP_TABLE

    @property
    def version_table(self) -> str:
        return VERSION_TABLE

    @property
    def task_sequence(self) -> str:
        return TASK_SEQUENCE

    @property
    def group_sequence(self) -> str:
        return GROUP_SEQUENCE

    @property
    def cleanup_sequence(self) -> str:
        return CLEANUP_SEQUENCE

    def all_tables(self) -> tuple[str, ...]:
        """Every table of the store (unqualified names), for GRANTs."""
        return (
            self.task_table,
            self.group_table,
            self.chord_table,
            self.chord_part_table,
            self.cleanup_table,
            self.version_table,
        )

    def all_sequences(self) -> tuple[str, ...]:
        """Every sequence of the store (unqualified names), for GRANTs (PostgreSQL)."""
        return (self.task_sequence, self.group_sequence, self.cleanup_sequence)

    def qualified(self, name: str) -> str:
        """``"schema"."name"`` quoted for SQL text (``"name"`` without a schema)."""
        return qualify(self.schema, name)


@dataclass(frozen=True)
class ResultTables:
    """SQLAlchemy Core table objects of one store (see :func:`tables_for`)."""

    names: TableNames
    metadata: sa.MetaData
    task: sa.Table
    group: sa.Table
    chord: sa.Table
    chord_part: sa.Table
    cleanup: sa.Table
    version: sa.Table
    task_sequence: sa.Sequence
    group_sequence: sa.Sequence
    cleanup_sequence: sa.Sequence


def _tz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


@lru_cache(maxsize=64)
def tables_for(names: TableNames) -> ResultTables:
    """Build (once per ``names``) the Core tables of a store."""
    schema = names.schema
    md = sa.MetaData(schema=schema)
    task_seq = sa.Sequence(TASK_SEQUENCE, schema=schema, metadata=md)
    group_seq = sa.Sequence(GROUP_SEQUENCE, schema=schema, metadata=md)
    cleanup_seq = sa.Sequence(CLEANUP_SEQUENCE, schema=schema, metadata=md)

    task = sa.Table(
        names.task_table,
        md,
        sa.Column("id", _BigId, task_seq, primary_key=True, autoincrement=True),
        sa.Column("task_id", sa.String(155), unique=True),
        sa.Column("status", sa.String(50)),
        sa.Column("result", sa.LargeBinary, nullable=True),
        sa.Column("date_done", _tz(), nullable=True),
        sa.Column("traceback", sa.Text, nullable=True),
        sa.Column("children", sa.LargeBinary, nullable=True),
        # extended result columns (filled when result_extended is on)
        sa.Column("name", sa.String(155), nullable=True),
        sa.Column("args", sa.LargeBinary, nullable=True),
        sa.Column("kwargs", sa.LargeBinary, nullable=True),
        sa.Column("worker", sa.String(155), nullable=True),
        sa.Column("retries", sa.Integer, nullable=True),
        sa.Column("queue", sa.String(155), nullable=True),
        sa.Column("stamps", sa.LargeBinary, nullable=True),
        # ids of the task's group and parent (version 2): Celery's ``_get_result_meta``
        # puts them in every meta whose request has them, so the Redis backend returns
        # them; NULL when the request had none (the meta then omits the key, as Redis)
        sa.Column("group_id", sa.String(155), nullable=True),
        sa.Column("parent_id", sa.String(155), nullable=True),
        # ours: last write, so that rows stuck in a non-ready state can be aged out
        sa.Column(
            "updated_at", _tz(), nullable=True, server_default=sa.func.current_timestamp()
        ),
        sqlite_autoincrement=True,
    )
    # Stock index name, kept so a stock client's create_all() finds it.
    sa.Index(f"ix_{names.task_table}_date_done", task.c.date_done)
    # Cheap age-out of rows that never became ready.
    sa.Index(
        f"ix_{names.task_table}_unready_updated",
        task.c.updated_at,
        postgresql_where=task.c.date_done.is_(None),
        sqlite_where=task.c.date_done.is_(None),
    )

    group = sa.Table(
        names.group_table,
        md,
        sa.Column("id", _BigId, group_seq, primary_key=True, autoincrement=True),
        sa.Column("taskset_id", sa.String(155), unique=True),
        sa.Column("result", sa.LargeBinary, nullable=True),
        sa.Column("date_done", _tz(), nullable=True),
        sqlite_autoincrement=True,
    )
    sa.Index(f"ix_{names.group_table}_date_done", group.c.date_done)

    chord = sa.Table(
        CHORD_TABLE,
        md,
        sa.Column("group_id", sa.String(155), primary_key=True),
        # number of header parts (None until Celery calls set_chord_size)
        sa.Column("size", sa.Integer, nullable=True),
        # parts added at run time by Task.add_to_chord
        sa.Column("extra", sa.Integer, nullable=False, server_default="0"),
        # distinct parts recorded so far
        sa.Column("done", sa.Integer, nullable=False, server_default="0"),
        # header contains groups: the callback joins the saved GroupResult
        sa.Column("complex", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("fired_at", _tz(), nullable=True),
        # token of the part return that claimed the callback (fires exactly once)
        sa.Column("claim", sa.String(64), nullable=True),
        sa.Column("created_at", _tz(), nullable=False),
    )
    sa.Index("ix_resultstore_chords_created_at", chord.c.created_at)

    chord_part = sa.Table(
        CHORD_PART_TABLE,
        md,
        sa.Column("group_id", sa.String(155), primary_key=True),
        # "<task id>:<group index>": a redelivered header task maps to the same key
        sa.Column("part", sa.String(200), primary_key=True),
        sa.Column("idx", sa.Integer, nullable=True),
        sa.Column("task_id", sa.String(155), nullable=False),
        sa.Column("status", sa.String(50), nullable=False),
        sa.Column("result", sa.LargeBinary, nullable=True),
        sa.Column("created_at", _tz(), nullable=False),
    )
    sa.Index("ix_resultstore_chord_parts_created_at", chord_part.c.created_at)

    cleanup = sa.Table(
        CLEANUP_TABLE,
        md,
        sa.Column("id", _BigId, cleanup_seq, primary_key=True, autoincrement=True),
        sa.Column("started_at", _tz(), nullable=False),
        sa.Column("duration_seconds", sa.Float, nullable=False),
        sa.Column("rows_deleted", sa.BigInteger, nullable=False),
        sa.Column("tasks_deleted", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("groups_deleted", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("chords_deleted", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("unready_deleted", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("success", sa.Boolean, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sqlite_autoincrement=True,
    )
    sa.Index("ix_resultstore_cleanup_runs_started_at", cleanup.c.started_at)

    version = sa.Table(
        VERSION_TABLE,
        md,
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("applied_at", _tz(), nullable=False),
    )

    return ResultTables(
        names=names,
        metadata=md,
        task=task,
        group=group,
        chord=chord,
        chord_part=chord_part,
        cleanup=cleanup,
        version=version,
        task_sequence=task_seq,
        group_sequence=group_seq,
        cleanup_sequence=cleanup_seq,
    )


# --------------------------------------------------------------------------- migrations


def _create_or_adopt(conn: sa.Connection, table: sa.Table) -> None:
    """Create ``table``, or add the columns it lacks when it already exists.

    Tables created earlier by a stock Celery client are adopted this way:
    columns are only ever added, never changed or dropped.
    """
    insp = sa.inspect(conn)
    if not insp.has_table(table.name, schema=table.schema):
        # checkfirst also skips sequences that already exist (created just before)
        table.create(conn, checkfirst=True)
        return
    existing = {c["name"] for c in insp.get_columns(table.name, schema=table.schema)}
    dialect = conn.dialect
    for col in table.columns:
        if col.name in existing:
            continue
        coltype = col.type.compile(dialect=dialect)
        ddl = (
            f"ALTER TABLE {qualify(table.schema, table.name)} "
            f"ADD COLUMN {quote_ident(col.name)} {coltype}"
        )
        if col.server_default is not None and dialect.name == "postgresql" and col.name != "id":
            default = col.server_default
            arg = getattr(default, "arg", None)
            if isinstance(arg, str):
                ddl += f" DEFAULT '{arg}'"
            elif arg is not None:
                ddl += " DEFAULT " + str(
                    arg.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
                )
        logger.info("adding column %s.%s", table.name, col.name)
        conn.execute(sa.text(ddl))
    existing_indexes = {ix["name"] for ix in insp.get_indexes(table.name, schema=table.schema)}
    for index in table.indexes:
        if index.name not in existing_indexes:
            index.create(conn)


def _migration_1(conn: sa.Connection, tables: ResultTables) -> None:
    if conn.dialect.name == "postgresql":
        for seq in (tables.task_sequence, tables.group_sequence, tables.cleanup_sequence):
            seq.create(conn, checkfirst=True)
    for table in (
        tables.task,
        tables.group,
        tables.chord,
        tables.chord_part,
        tables.cleanup,
    ):
        _create_or_adopt(conn, table)
    if conn.dialect.name == "postgresql":
        for statement in _id_defaults(tables):
            conn.execute(sa.text(statement))


def _id_defaults(tables: ResultTables) -> list[str]:
    """A server-side default as well as the client-side Sequence (PostgreSQL), so that plain
    SQL INSERTs (psql users, other tools) get an id too; this also fixes tables that a
    stock client created without one."""
    statements = []
    for table, seq in (
        (tables.task, tables.task_sequence),
        (tables.group, tables.group_sequence),
        (tables.cleanup, tables.cleanup_sequence),
    ):
        seq_name = qualify(table.schema, seq.name).replace("'", "''")
        statements.append(
            f"ALTER TABLE {qualify(table.schema, table.name)} ALTER COLUMN id "
            f"SET DEFAULT nextval('{seq_name}'::regclass)"
        )
    return statements


def _migration_2(conn: sa.Connection, tables: ResultTables) -> None:
    """Add ``group_id`` and ``parent_id`` to the task table (nullable: a plain ADD COLUMN,
    no table rewrite on PostgreSQL; rows stored before keep NULL, i.e. no such key).

    A store created at version 2 already has them (migration 1 builds the current
    table); adding only what is missing keeps this idempotent either way.
    """
    _create_or_adopt(conn, tables.task)


Migration = tuple[int, str, Callable[[sa.Connection, ResultTables], None]]

#: Ordered, append-only list of migrations. Never edit a released entry.
MIGRATIONS: tuple[Migration, ...] = (
    (1, "task, group, chord and cleanup-run tables", _migration_1),
    (2, "task group_id and parent_id columns", _migration_2),
)
assert MIGRATIONS[-1][0] == SCHEMA_VERSION


#: Stands for the quoted schema in `_fresh_script` (a valid lowercase identifier, so the
#: compiler renders it bare; nothing else of a store's DDL contains it).
_SCHEMA_TOKEN = "resultstore_schema_token"


def _templatable(names: TableNames) -> bool:
    """The token stands only for the schema in the script of these names."""
    return _SCHEMA_TOKEN not in names.task_table and _SCHEMA_TOKEN not in names.group_table


def _fresh(conn: sa.Connection, names: TableNames) -> bool:
    """None of the store's tables or sequences exists in its schema (PostgreSQL)."""
    row = conn.execute(
        sa.text(
            "SELECT count(*) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = :s AND c.relname = ANY(:names)"
        ),
        {"s": names.schema, "names": [*names.all_tables(), *names.all_sequences()]},
    ).scalar()
    return row == 0


@lru_cache(maxsize=8)
def _fresh_script(task_table: str, group_table: str) -> str:
    """Every statement that creates a store at :data:`SCHEMA_VERSION` on an empty
    PostgreSQL schema, as one script with `_SCHEMA_TOKEN` for the schema.

    Compiled once per table names instead of per store: building the six tables and
    compiling their DDL was a third of the operator's CPU when 1000 stores were created
    at once. Strings only: nothing of a store's own is kept.
    """
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateIndex, CreateSequence, CreateTable

    tables = tables_for(TableNames(_SCHEMA_TOKEN, task_table, group_table))
    dialect = postgresql.dialect()
    elements: list[sa.ExecutableDDLElement] = [
        CreateSequence(seq)
        for seq in (tables.task_sequence, tables.group_sequence, tables.cleanup_sequence)
    ]
    for table in (tables.task, tables.group, tables.chord, tables.chord_part, tables.cleanup,
                  tables.version):
        elements.append(CreateTable(table))
        elements.extend(CreateIndex(index) for index in sorted(table.indexes,
                                                               key=lambda i: str(i.name)))
    statements = [str(e.compile(dialect=dialect)).strip() for e in elements]
    # migration 1's own statements; they quote the token, the compiler leaves it bare
    statements += [statement.replace(quote_ident(_SCHEMA_TOKEN), _SCHEMA_TOKEN)
                   for statement in _id_defaults(tables)]
    rows = ", ".join(
        f"({number}, '{description.replace(chr(39), chr(39) * 2)}', CURRENT_TIMESTAMP)"
        for number, description, _apply in MIGRATIONS)
    statements.append(
        f"INSERT INTO {_SCHEMA_TOKEN}.{quote_ident(VERSION_TABLE)} "
        f"(version, description, applied_at) VALUES {rows}")
    unqualified = [statement for statement in statements if _SCHEMA_TOKEN not in statement]
    if unqualified:
        raise AssertionError(f"statements of the fresh-store script name no schema: "
                             f"{unqualified}")
    return ";\n".join(statements)


def _schema_exists(conn: sa.Connection, schema: str) -> bool:
    row = conn.execute(
        sa.text("SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = :s"), {"s": schema}
    ).first()
    return row is not None


def current_version(conn: sa.Connection, names: TableNames) -> int:
    """The schema version recorded in the store (0 when nothing was ever migrated)."""
    if conn.dialect.name == "postgresql" and names.schema and not _schema_exists(
        conn, names.schema
    ):
        return 0
    if not sa.inspect(conn).has_table(names.version_table, schema=names.schema):
        return 0
    # One schema-less statement for every store, pointed at the schema at execution time:
    # a statement built from ``tables_for(names)`` would put one compiled entry per schema
    # in the engine's statement cache, and each entry keeps that schema's whole table set
    # alive (about 100 KiB). The operator checks every store for drift, so with 1000
    # stores that was 50-60 MiB held for nothing (bench/RESULTS.md, "Operator at 1000
    # stores").
    value = conn.execute(
        _version_query(),
        execution_options={"schema_translate_map": {None: names.schema}},
    ).scalar()
    return int(value or 0)


@lru_cache(maxsize=1)
def _version_query() -> sa.Select[int]:
    version = tables_for(TableNames()).version
    return sa.select(sa.func.max(version.c.version))


def migrate(conn: sa.Connection, names: TableNames) -> int:
    """Bring the store up to :data:`SCHEMA_VERSION`; return the resulting version.

    Idempotent and safe to run concurrently: on PostgreSQL it takes a
    transaction-scoped advisory lock keyed by the schema, so concurrent callers
    (several worker processes, the operator) serialise and all but the first
    find nothing to do. Everything runs in one transaction (PostgreSQL DDL is
    transactional): if the caller already has a transaction open on ``conn``
    it must commit it; otherwise this function commits its own.
    """
    own_txn = not conn.in_transaction()
    txn = conn.begin() if own_txn else None
    try:
        version = _migrate_in_txn(conn, names)
        if txn is not None:
            txn.commit()
        return version
    except BaseException:
        if txn is not None and txn.is_active:
            txn.rollback()
        raise


def _migrate_in_txn(conn: sa.Connection, names: TableNames) -> int:
    is_pg = conn.dialect.name == "postgresql"
    if is_pg:
        conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(:c, hashtext(:s))"),
            {"c": _ADVISORY_LOCK_CLASS, "s": names.schema or "public"},
        )
        if names.schema and not _schema_exists(conn, names.schema):
            conn.execute(sa.text(f"CREATE SCHEMA {quote_ident(names.schema)}"))
    version = current_version(conn, names)
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"schema {names.schema or '(default)'} is at version {version}, newer than "
            f"this code ({SCHEMA_VERSION}); upgrade celery-resultstore"
        )
    if version == SCHEMA_VERSION:
        return version
    if is_pg and version == 0 and names.schema and _templatable(names) and _fresh(conn, names):
        # A schema with none of the store's objects: the current layout in one round
        # trip, from statements compiled once (what migrations 1..N build on an empty
        # schema; test_schema_migration_pg compares the two catalogs).
        conn.exec_driver_sql(_fresh_script(names.task_table, names.group_table).replace(
            _SCHEMA_TOKEN, quote_ident(names.schema)))
        return SCHEMA_VERSION
    tables = tables_for(names)
    tables.version.create(conn, checkfirst=True)
    for number, description, apply in MIGRATIONS:
        if number <= version:
            continue
        logger.info("applying result-store migration %d: %s", number, description)
        apply(conn, tables)
        conn.execute(
            tables.version.insert().values(
                version=number, description=description, applied_at=datetime.now(UTC)
            )
        )
        version = number
    return version
