"""The seam the controller depends on: `Database` (sessions and login checks) and `Session`.

Why Protocols: the controller's unit tests run it over an in-memory PostgreSQL
(tests/unit/fake_database.py) while the operator uses `Postgres`, the real connections; the
Protocols name exactly what the controller calls, so neither can drift from the other
unnoticed (mypy checks both against them).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Protocol

from resultstore_backend.schema import TableNames

from ..builders import marker as m
from ..builders.connections import ConnectionUsage
from .connection import AdminEngines, Credentials, Target, check_login
from .session import AdminSession, CleanupRun


class Session(Protocol):
    """The admin-session operations the controller uses (AdminSession is the one real
    implementation; the controller's unit tests use an in-memory one)."""

    @property
    def tls_in_use(self) -> bool: ...

    def check_capabilities(self, schema: str) -> None: ...

    def inventory(self, schema: str, roles: Iterable[str]) -> m.Inventory: ...

    def mark(self, marks: Iterable[tuple[str, str]], schema: str) -> None: ...

    def migrate(self, names: TableNames, assessment: m.Assessment) -> tuple[int, int]: ...

    def last_cleanup_run(self, names: TableNames) -> CleanupRun | None: ...

    def teardown(self, plan: m.Teardown, schema: str) -> None: ...

    def role_state(self, role: str) -> tuple[bool, bool]:
        """(exists, can log in); OwnershipError when it exists without our marker."""
        ...

    def ensure_role(self, role: str, verifier: str | None, schema: str,
                    limit: int = -1) -> bool: ...

    def sync_privileges(self, names: TableNames, granted: Iterable[str],
                        managed: Iterable[str], schema_ours: bool = True) -> list[str]: ...

    def connection_usage(self, roles: Iterable[str]) -> ConnectionUsage: ...

    def session_count(self, role: str) -> int: ...

    def terminate_sessions(self, role: str) -> int: ...

    def disable_login(self, role: str) -> bool: ...

    def remove_role(self, role: str, names: TableNames) -> bool: ...


class Database(Protocol):
    """How the controller reaches PostgreSQL: one admin session per reconcile, and a login
    check with a store role's password (both raise DatabaseError)."""

    def session(self, target: Target, admin: Credentials,
                owner: m.Owner) -> AbstractContextManager[Session]: ...

    def check_login(self, target: Target, creds: Credentials) -> bool: ...


class Postgres:
    """The Database of a running operator: real connections (AdminSession, check_login).

    Admin sessions come from `engines` (connection.AdminEngines: kept between reconciles);
    a login check always opens a connection of its own (it is what proves a password)."""

    def __init__(self, engines: AdminEngines | None = None) -> None:
        self.engines = engines or AdminEngines()

    def session(self, target: Target, admin: Credentials,
                owner: m.Owner) -> AbstractContextManager[Session]:
        return AdminSession(target, admin, owner, self.engines)

    def check_login(self, target: Target, creds: Credentials) -> bool:
        return check_login(target, creds)

