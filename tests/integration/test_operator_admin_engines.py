"""The operator's kept admin connections (database.AdminEngines) against a real PostgreSQL.

A reconcile's admin session comes from a small pool per server and admin credentials
instead of a new connection: these tests pin down what that must not change. A session
starts clean (nothing of the previous reconcile's transaction), a connection the server
ended is replaced without a failed reconcile, other credentials never get a kept
connection of someone else's, an unused engine closes its sessions, and a connection
older than `max_age` is authenticated again. Also the retry of a transaction that lost a
concurrent catalog update (two new stores granting CONNECT on one database at once).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from resultstore_operator import database as dbio
from resultstore_operator.builders import marker as m
from resultstore_operator.builders import reasons as r
from resultstore_operator.builders.scram import scram_verifier
from tests.conftest import PgDatabase

OWNER = m.Owner("team", "orders", "7f0c8a3e-aaaa-4bbb-8ccc-0123456789ab")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def target(pg_database: PgDatabase) -> dbio.Target:
    server = pg_database.server
    return dbio.Target(server.host, server.port, pg_database.name, "disable",
                       connect_timeout=5)


@pytest.fixture
def admin(pg_database: PgDatabase) -> dbio.Credentials:
    return dbio.Credentials(pg_database.server.superuser, pg_database.server.password)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engines(clock: Clock) -> Iterator[dbio.AdminEngines]:
    kept = dbio.AdminEngines(size=2, overflow=2, idle=30.0, max_age=3600.0, clock=clock)
    try:
        yield kept
    finally:
        kept.close()


def backend_pid(db: dbio.AdminSession) -> int:
    return int(db.raw.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]


def sessions_of(pg_database: PgDatabase, pid: int) -> int:
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                           (pid,)).fetchone()
    return int(row[0]) if row else 0


def test_the_next_session_reuses_the_connection_and_starts_clean(
        engines: dbio.AdminEngines, target: dbio.Target, admin: dbio.Credentials) -> None:
    with dbio.AdminSession(target, admin, OWNER, engines) as db:
        first = backend_pid(db)
        db.raw.execute("CREATE TABLE left_open (x int)")  # never committed
    with dbio.AdminSession(target, admin, OWNER, engines) as db:
        assert backend_pid(db) == first, "a second reconcile opened a new admin connection"
        rows = db.raw.execute("SELECT to_regclass('left_open')").fetchone()
        assert rows == (None,), "the previous session's uncommitted work reached this one"
    assert len(engines) == 1


def test_a_connection_the_server_ended_is_replaced(
        engines: dbio.AdminEngines, target: dbio.Target, admin: dbio.Credentials,
        pg_database: PgDatabase) -> None:
    with dbio.AdminSession(target, admin, OWNER, engines) as db:
        first = backend_pid(db)
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (first,))
    with dbio.AdminSession(target, admin, OWNER, engines) as db:
        assert backend_pid(db) != first
        db.check_capabilities("celery")  # the session works: no failed reconcile


def test_other_credentials_get_their_own_connection(
        engines: dbio.AdminEngines, target: dbio.Target, admin: dbio.Credentials,
        pg_database: PgDatabase) -> None:
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        conn.execute("CREATE ROLE engines_other LOGIN CREATEROLE PASSWORD 'other-secret'")
    try:
        with dbio.AdminSession(target, admin, OWNER, engines) as db:
            first = backend_pid(db)
        other = dbio.Credentials("engines_other", "other-secret")
        with dbio.AdminSession(target, other, OWNER, engines) as db:
            assert backend_pid(db) != first
            user = db.raw.execute("SELECT current_user").fetchone()
            assert user == ("engines_other",)
        wrong = dbio.Credentials(admin.username, "not-the-password")
        with pytest.raises(dbio.DatabaseError) as info:
            with dbio.AdminSession(target, wrong, OWNER, engines):
                pass
        assert info.value.reason == r.ADMIN_AUTH_FAILED
        assert "not-the-password" not in info.value.message
    finally:
        engines.close()
        with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
            conn.execute("DROP ROLE engines_other")


def test_an_unused_engine_closes_its_sessions(
        engines: dbio.AdminEngines, target: dbio.Target, admin: dbio.Credentials,
        pg_database: PgDatabase, clock: Clock) -> None:
    with dbio.AdminSession(target, admin, OWNER, engines) as db:
        pid = backend_pid(db)
    clock.now += 10
    engines.reap()
    assert len(engines) == 1 and sessions_of(pg_database, pid) == 1
    clock.now += 30
    engines.reap()
    assert len(engines) == 0
    deadline = time.monotonic() + 10
    while sessions_of(pg_database, pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sessions_of(pg_database, pid) == 0, "a reaped engine left its session open"


def test_an_old_connection_is_authenticated_again(
        target: dbio.Target, admin: dbio.Credentials) -> None:
    kept = dbio.AdminEngines(size=2, overflow=2, max_age=1.0)
    try:
        with dbio.AdminSession(target, admin, OWNER, kept) as db:
            first = backend_pid(db)
        time.sleep(1.5)
        with dbio.AdminSession(target, admin, OWNER, kept) as db:
            assert backend_pid(db) != first, "a connection older than max_age was reused"
    finally:
        kept.close()


def test_a_grant_that_lost_a_concurrent_catalog_update_is_run_again(
        engines: dbio.AdminEngines, target: dbio.Target, admin: dbio.Credentials,
        pg_database: PgDatabase) -> None:
    """Two new stores' `GRANT CONNECT ON DATABASE` at once: both rewrite pg_database's row
    of this database; the one that waited gets "tuple concurrently updated" once the other
    commits. The operator runs that transaction again instead of failing the reconcile."""
    role = "rs_team_orders_7f0c8a3e_a"
    with psycopg.connect(pg_database.dsn(), autocommit=True) as setup:
        setup.execute("CREATE ROLE engines_first")
    holder = psycopg.connect(pg_database.dsn())
    errors: list[BaseException] = []
    try:
        holder.execute(f'GRANT CONNECT ON DATABASE "{pg_database.name}" TO engines_first')

        def provision() -> None:
            try:
                with dbio.AdminSession(target, admin, OWNER, engines) as db:
                    db.ensure_role(role, scram_verifier("pw-" + "x" * 20), "orders")
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        worker = threading.Thread(target=provision)
        worker.start()
        deadline = time.monotonic() + 10
        with psycopg.connect(pg_database.dsn(), autocommit=True) as watch:
            while time.monotonic() < deadline:
                waiting = watch.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'GRANT CONNECT%%'").fetchone()
                if waiting and waiting[0]:
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the provisioning GRANT never waited for the concurrent one")
        holder.commit()
        worker.join(30)
        assert not worker.is_alive()
        assert errors == [], f"the reconcile failed instead of running again: {errors}"
        with psycopg.connect(pg_database.dsn(), autocommit=True) as check:
            row = check.execute(
                "SELECT has_database_privilege(%s, current_database(), 'CONNECT'), "
                "has_database_privilege('engines_first', current_database(), 'CONNECT')",
                (role,)).fetchone()
        assert row == (True, True)
    finally:
        holder.close()
        engines.close()
        with psycopg.connect(pg_database.dsn(), autocommit=True) as cleanup:
            for name in (role, "engines_first"):
                cleanup.execute(f'REVOKE ALL ON DATABASE "{pg_database.name}" FROM {name}')
                cleanup.execute(f"DROP ROLE IF EXISTS {name}")
