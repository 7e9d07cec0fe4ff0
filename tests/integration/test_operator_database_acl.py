"""Stores granting on the same database at once: they wait their turn, none fails.

GRANT/REVOKE ON DATABASE rewrite the database's one pg_database row; without a common lock
the later of two sessions fails with "tuple concurrently updated" (seen with 50 stores
provisioned together after a failover). Real PostgreSQL, the operator's own sessions: one
transaction is held open half-way (it took the lock and granted, as another replica or
another store's reconcile does), the other store's `ensure_role` must wait for it, then
succeed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from resultstore_operator import database as dbio
from resultstore_operator.builders import marker as m
from resultstore_operator.builders import sql as q
from resultstore_operator.builders.scram import scram_verifier
from tests.conftest import PgDatabase

A = m.Owner("team-a", "orders", "aaaaaaaa-0000-0000-0000-00000000000a")
B = m.Owner("team-b", "billing", "bbbbbbbb-0000-0000-0000-00000000000b")
ROLE_A, ROLE_B = "rs_acl_test_a", "rs_acl_test_b"


@pytest.fixture
def target(pg_database: PgDatabase) -> Iterator[dbio.Target]:
    server = pg_database.server
    yield dbio.Target(server.host, server.port, pg_database.name, "disable", connect_timeout=5)
    # Roles are the cluster's, not the database's: drop them (their grant first).
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        for role in (ROLE_A, ROLE_B):
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(q.revoke_connect(role, pg_database.name))
                conn.execute(q.drop_role(role))


def _waiting_on_advisory_lock(pg_database: PgDatabase, pid: int) -> bool:
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT wait_event_type, wait_event FROM pg_stat_activity "
                           "WHERE pid = %s", (pid,)).fetchone()
    return row is not None and tuple(row) == ("Lock", "advisory")


def test_a_store_granting_waits_for_the_other_and_both_can_connect(
        pg_database: PgDatabase, target: dbio.Target) -> None:
    server = pg_database.server
    admin = dbio.Credentials(server.superuser, server.password)
    holder = psycopg.connect(pg_database.dsn())
    try:
        # Another session half-way through its role transaction: lock taken, row rewritten.
        holder.execute(q.lock_database_acl(pg_database.name))
        holder.execute(q.create_role(ROLE_A, scram_verifier("a-secret-a"), -1))
        holder.execute(q.grant_connect(ROLE_A, pg_database.name))
        outcome: list[BaseException | bool] = []
        pid: list[int] = []
        with dbio.AdminSession(target, admin, B) as db:
            pid.append(int(db.raw.info.backend_pid))

            def provision() -> None:
                try:
                    outcome.append(db.ensure_role(ROLE_B, scram_verifier("b-secret-b"),
                                                  "billing"))
                except BaseException as exc:  # reported by the assertion below
                    outcome.append(exc)

            worker = threading.Thread(target=provision)
            worker.start()
            pause = threading.Event()
            waited = False
            for _ in range(200):
                waited = _waiting_on_advisory_lock(pg_database, pid[0])
                if waited or not worker.is_alive():
                    break
                pause.wait(0.05)
            holder.commit()  # in every case, so the other session never hangs
            worker.join(30)
            assert not worker.is_alive(), "ensure_role still blocked after the lock was freed"
        assert waited, f"ensure_role did not wait for the database ACL lock: {outcome}"
        assert outcome == [True], f"the waiting store failed instead of creating its role: " \
                                  f"{outcome}"
    finally:
        holder.rollback()
        holder.close()
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        for role in (ROLE_A, ROLE_B):
            row = conn.execute("SELECT has_database_privilege(%s, current_database(), "
                               "'CONNECT')", (role,)).fetchone()
            assert row == (True,), f"{role} lost its CONNECT grant"
