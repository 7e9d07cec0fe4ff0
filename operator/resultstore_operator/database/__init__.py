"""PostgreSQL I/O through the admin connection: migrate, roles, grants, drain, teardown.

By noun: `connection` (target, SCRAM-only security, error classification, the login check),
`session` (AdminSession: everything done on one admin connection, each role-touching method
checking our ownership marker first), `seam` (the `Database`/`Session` Protocols the
controller depends on, and `Postgres`, the real one). Messages are redacted: no password can
reach a log line, an Event or the status through an exception.
"""

from __future__ import annotations

from .connection import (
    REQUIRE_AUTH,
    AdminEngines,
    Credentials,
    DatabaseError,
    Target,
    check_login,
    classify,
    connection_security,
)
from .seam import Database, Postgres, Session
from .session import AdminSession, CleanupRun, OwnershipError

__all__ = ["REQUIRE_AUTH", "AdminEngines", "AdminSession", "CleanupRun", "Credentials", "Database",
           "DatabaseError", "OwnershipError", "Postgres", "Session", "Target", "check_login",
           "classify", "connection_security"]
