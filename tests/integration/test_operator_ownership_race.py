"""Two stores provisioning the same names at the same moment: the loser changes nothing.

Both assess the server before either commits (so both decisions say "go ahead"); the
provisioning transaction itself must then catch the other store's work: a strict CREATE
SCHEMA fails on a schema created meanwhile, and markers committed meanwhile are re-read
under migrate's advisory lock and never overwritten. Real PostgreSQL, the operator's own
database.py, no Kubernetes.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from resultstore_backend.schema import TableNames
from resultstore_operator import database as dbio
from resultstore_operator.builders import marker as m
from resultstore_operator.builders import reasons as r
from tests.conftest import PgDatabase

A = m.Owner("team-a", "orders", "aaaaaaaa-0000-0000-0000-000000000001")
B = m.Owner("team-b", "orders", "bbbbbbbb-0000-0000-0000-000000000002")
NAMES = TableNames("celery")


@pytest.fixture
def sessions(pg_database: PgDatabase) -> Iterator[tuple[dbio.AdminSession, dbio.AdminSession]]:
    server = pg_database.server
    target = dbio.Target(server.host, server.port, pg_database.name, "disable",
                         connect_timeout=5)
    admin = dbio.Credentials(server.superuser, server.password)
    with dbio.AdminSession(target, admin, A) as a, dbio.AdminSession(target, admin, B) as b:
        yield a, b


def owners(pg_database: PgDatabase) -> set[str | None]:
    with psycopg.connect(pg_database.dsn()) as conn:
        rows = conn.execute(
            "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = "
            "'celery' UNION ALL SELECT obj_description(c.oid, 'pg_class') FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'celery' AND "
            "c.relkind IN ('r', 'S')").fetchall()
    return {(o.label() if (o := m.parse_marker(c)) else None) for (c,) in rows}


def assess(db: dbio.AdminSession, owner: m.Owner) -> m.Assessment:
    inv = db.inventory("celery", ())
    result = m.assess(owner, inv, NAMES.all_tables(), NAMES.all_sequences())
    assert result.conflict is None, result.conflict
    return result


def test_both_create_the_schema_the_second_fails_and_marks_nothing(
        sessions: tuple[dbio.AdminSession, dbio.AdminSession], pg_database: PgDatabase) -> None:
    a, b = sessions
    plan_a, plan_b = assess(a, A), assess(b, B)
    assert plan_a.create_schema and plan_b.create_schema
    a.migrate(NAMES, plan_a)
    with pytest.raises(dbio.DatabaseError) as info:
        b.migrate(NAMES, plan_b)
    assert "already exists" in info.value.message, info.value.message
    assert owners(pg_database) == {"team-a/orders"}, "the second store overwrote markers"
    # and its next reconcile sees the conflict
    again = m.assess(B, b.inventory("celery", ()), NAMES.all_tables(), NAMES.all_sequences())
    assert again.conflict is not None and again.conflict.other == A


def test_both_use_an_existing_empty_schema_the_second_is_refused_in_its_transaction(
        sessions: tuple[dbio.AdminSession, dbio.AdminSession], pg_database: PgDatabase) -> None:
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA celery")  # a DBA's, empty: both may use it
    a, b = sessions
    plan_a, plan_b = assess(a, A), assess(b, B)
    assert not plan_a.create_schema and not plan_b.create_schema
    a.migrate(NAMES, plan_a)
    with pytest.raises(dbio.OwnershipError) as info:
        b.migrate(NAMES, plan_b)
    assert info.value.reason == r.OWNERSHIP_CONFLICT and info.value.other == A
    assert owners(pg_database) == {None, "team-a/orders"}  # the DBA's schema stays unmarked


def test_an_unmarked_table_appearing_after_the_assessment_is_not_taken(
        sessions: tuple[dbio.AdminSession, dbio.AdminSession], pg_database: PgDatabase) -> None:
    a, _ = sessions
    a.migrate(NAMES, assess(a, A))  # provisioned, current version
    plan = assess(a, A)
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        # someone swaps in an unmarked table of the store's name between check and act
        conn.execute("DROP TABLE celery.resultstore_cleanup_runs")
        conn.execute("CREATE TABLE celery.resultstore_cleanup_runs (x int)")
    with pytest.raises(dbio.OwnershipError) as info:
        a.migrate(NAMES, plan)
    assert "resultstore_cleanup_runs" in info.value.message
    assert owners(pg_database) == {"team-a/orders", None}


@pytest.mark.parametrize("foreign", [
    # a stock Celery client starting at the same moment: its sequence is skipped by
    # migrate's checkfirst, its table adopted by migrate's add-missing-columns path
    "CREATE SEQUENCE celery.task_id_sequence",
    "CREATE TABLE celery.celery_tasksetmeta (id serial PRIMARY KEY, "
    "taskset_id varchar(155) UNIQUE, result bytea, date_done timestamp)",
])
def test_an_unmarked_object_appearing_while_the_first_migration_runs_is_not_taken(
        sessions: tuple[dbio.AdminSession, dbio.AdminSession], pg_database: PgDatabase,
        foreign: str) -> None:
    """First provisioning into a DBA's empty schema (no strict CREATE SCHEMA to fail): an
    object of the store's names created by someone else after the assessment is refused in
    the provisioning transaction, not marked as created by it (which would grant it to the
    store's role and drop it on deletion)."""
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA celery")
    a, _ = sessions
    plan = assess(a, A)
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        conn.execute(foreign)
    with pytest.raises(dbio.OwnershipError) as info:
        a.migrate(NAMES, plan)
    assert info.value.reason == r.OWNERSHIP_CONFLICT
    assert "not created by this ResultStore" in info.value.message, info.value.message
    assert owners(pg_database) == {None}, "an object of someone else's was marked ours"
    with psycopg.connect(pg_database.dsn()) as conn:
        left = conn.execute("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON "
                            "n.oid = c.relnamespace WHERE n.nspname = 'celery' AND "
                            "c.relname = 'celery_taskmeta'").fetchone()
    assert left == (0,), "the refused transaction left tables behind"
