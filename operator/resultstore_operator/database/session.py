"""The admin session: schema migration, roles, grants, drain and teardown of one store.

Each reconcile works in one admin session. A running operator takes it from its kept
connections (connection.AdminEngines: one small pool per server and admin credentials,
never one per store, closed when unused); a session made without them has a connection of
its own, closed with it. Statements come from builders.sql; this module only
executes them. Nothing is altered, granted, revoked, terminated or dropped unless the object
carries this store's ownership marker (builders.marker); every such method checks the marker
itself, right before acting.

Why one module: AdminSession is one class whose methods share one connection and one
error mapping, and the ownership checks (`_owned_role_state`, the marker re-read in
`migrate`) must sit next to the statements they guard; split across modules they would
be easy to bypass.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from resultstore_backend.schema import SCHEMA_VERSION, TableNames, current_version, migrate

from ..builders import marker as m
from ..builders import reasons as r
from ..builders import sql as q
from ..builders.connections import ConnectionUsage
from .connection import (
    AdminEngines,
    CaFile,
    Credentials,
    DatabaseError,
    Target,
    classify,
    connect_args,
)

log = logging.getLogger(__name__)

#: How often `_execute` runs a transaction again after a concurrent catalog update.
CATALOG_RETRIES = 5


def concurrent_catalog_update(exc: BaseException) -> bool:
    """PostgreSQL's "tuple concurrently updated": two sessions rewrote one catalog row.

    Every new store's role gets `GRANT CONNECT ON DATABASE`, which rewrites the one
    pg_database row of that database (its ACL); two reconciles doing it at the same moment
    make one of them fail (62 of 1000 stores created at once, each then waiting out a
    backoff). The failed transaction is rolled back whole, so it is simply run again.
    """
    return isinstance(exc, psycopg.errors.InternalError_) and \
        "tuple concurrently updated" in str(exc)


@dataclass(frozen=True)
class CleanupRun:
    """The cleanup job's own record of its last run (the store's status shows it)."""

    started_at: datetime
    duration_seconds: float
    rows_deleted: int
    success: bool
    error: str | None


class OwnershipError(DatabaseError):
    """An object the operator was about to touch does not carry this store's marker."""

    def __init__(self, reason: str, message: str, other: m.Owner | None = None) -> None:
        super().__init__(reason, message)
        self.other = other


class AdminSession:
    """One admin connection; use as a context manager (`with AdminSession(...) as db`).

    `owner` is the store's identity: objects created here are marked with it, and roles are
    only altered, granted, terminated or dropped when they carry it.
    """

    def __init__(self, target: Target, admin: Credentials,
                 owner: m.Owner | None = None, engines: AdminEngines | None = None) -> None:
        self.target = target
        self.admin = admin
        self.owner = owner
        #: the running operator's kept connections (connection.AdminEngines); None: a
        #: connection of this session's own, closed with it (tests, one-off tools)
        self._engines = engines
        self._ca: CaFile | None = None
        self._engine: sa.Engine | None = None
        self._conn: sa.Connection | None = None

    # --- connection ----------------------------------------------------------------------

    def __enter__(self) -> AdminSession:
        try:
            if self._engines is not None:
                self._conn = self._engines.connect(self.target, self.admin)
                return self
            self._ca = CaFile(self.target.ca_cert)
            url = URL.create("postgresql+psycopg", username=self.admin.username,
                             password=self.admin.password, host=self.target.host,
                             port=self.target.port, database=self.target.database)
            self._engine = sa.create_engine(url, poolclass=NullPool,
                                            connect_args=connect_args(self.target, self._ca))
            self._conn = self._engine.connect()
        except Exception as exc:
            self.close()
            raise classify(exc, self.admin.password) from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                driver = conn.connection.driver_connection
                if isinstance(driver, psycopg.Connection) and driver.broken:
                    conn.invalidate()  # never back into the pool
                conn.close()  # a kept connection goes back to its pool, rolled back
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self._ca is not None:
            self._ca.close()
            self._ca = None

    @property
    def conn(self) -> sa.Connection:
        if self._conn is None:
            raise RuntimeError("AdminSession used outside of its context")
        return self._conn

    @property
    def tls_in_use(self) -> bool:
        return bool(self.raw.pgconn.ssl_in_use)

    @property
    def raw(self) -> psycopg.Connection[Any]:
        driver = self.conn.connection.driver_connection
        assert isinstance(driver, psycopg.Connection)
        return driver

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except DatabaseError:
            self._rollback()
            raise
        except (psycopg.Error, sa.exc.SQLAlchemyError) as exc:
            self._rollback()
            raise classify(exc, self.admin.password) from None

    def _rollback(self) -> None:
        try:
            self.raw.rollback()
        except Exception:  # noqa: BLE001 - the connection may be gone
            pass

    def _execute(self, statements: Iterable[sql.SQL | sql.Composed]) -> None:
        """Run `statements` in one transaction; run it again when PostgreSQL reports two
        sessions updating one catalog row at once (`concurrent_catalog_update`)."""
        statements = list(statements)
        for attempt in range(CATALOG_RETRIES + 1):
            with self._errors():
                try:
                    with self.raw.cursor() as cur:
                        for statement in statements:
                            cur.execute(statement)
                    self.raw.commit()
                    return
                except psycopg.errors.InternalError_ as exc:
                    if attempt == CATALOG_RETRIES or not concurrent_catalog_update(exc):
                        raise
                    self._rollback()
            time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))

    def _fetch(self, statement: sql.SQL | sql.Composed,
               params: Any = None) -> list[tuple[Any, ...]]:
        """Rows of a query inside the current transaction (no commit)."""
        with self.raw.cursor() as cur:
            cur.execute(statement, params)
            return list(cur.fetchall())

    def _query(self, statement: sql.SQL | sql.Composed,
               params: Any = None) -> list[tuple[Any, ...]]:
        with self._errors():
            rows = self._fetch(statement, params)
            self.raw.commit()
            return rows

    # --- checks ----------------------------------------------------------------------------

    def check_capabilities(self, schema: str) -> None:
        """Distinct reasons for an admin that cannot do its job, before touching anything."""
        rows = self._query(q.ADMIN_CAPABILITIES)
        if not rows:
            raise DatabaseError(r.INSUFFICIENT_PRIVILEGE, "cannot read the admin role")
        superuser, createrole, can_create = rows[0]
        if not (superuser or createrole):
            raise DatabaseError(
                r.ADMIN_CANNOT_CREATE_ROLE,
                f"admin role {self.admin.username!r} lacks CREATEROLE; grant it with "
                f"ALTER ROLE {self.admin.username} CREATEROLE")
        if not (superuser or can_create) and not self.schema_exists(schema):
            raise DatabaseError(
                r.INSUFFICIENT_PRIVILEGE,
                f"admin role {self.admin.username!r} may not create schemas in database "
                f"{self.target.database!r}; GRANT CREATE ON DATABASE to it")

    def schema_exists(self, schema: str) -> bool:
        return bool(self._query(q.SCHEMA_EXISTS, (schema,)))

    # --- ownership ---------------------------------------------------------------------------

    def _me(self) -> m.Owner:
        if self.owner is None:
            raise RuntimeError("this AdminSession has no owner identity")
        return self.owner

    def inventory(self, schema: str, roles: Iterable[str]) -> m.Inventory:
        """Everything under the store's names, with the markers (comments) it carries."""
        marker_rows = self._query(q.SCHEMA_MARKER, (schema,))
        objects: tuple[m.CatalogObject, ...] = ()
        if marker_rows:
            objects = tuple(m.CatalogObject(kind, name, comment) for kind, name, comment in
                            self._query(q.SCHEMA_INVENTORY, {"schema": schema}))
        role_rows = self._query(q.ROLE_MARKERS, (sorted(set(roles)),))
        return m.Inventory(schema=schema, schema_exists=bool(marker_rows),
                           schema_comment=marker_rows[0][0] if marker_rows else None,
                           objects=objects,
                           roles={name: comment for name, comment in role_rows},
                           schema_owned=bool(marker_rows[0][1]) if marker_rows else True)

    def _marks(self, marks: Iterable[tuple[str, str]], schema: str) -> list[sql.Composed]:
        text = m.marker_text(self._me())
        return [q.comment_on(kind, schema, name, text) for kind, name in marks]

    def mark(self, marks: Iterable[tuple[str, str]], schema: str) -> None:
        """Write our marker on objects `assess` cleared for it (legacy stores, adoption)."""
        statements = self._marks(marks, schema)
        if statements:
            self._execute(statements)

    # --- schema ----------------------------------------------------------------------------

    def migrate(self, names: TableNames, assessment: m.Assessment) -> tuple[int, int]:
        """(version before, version after); idempotent (the backend's versioned migrations).

        One transaction creates the schema if needed, runs the migrations and writes our
        marker on the schema (when we create it) and on every table and sequence of ours
        that lacks it: new ones, or those `assessment` (marker.assess) cleared for marking
        (a legacy store's, adopted ones). So no object of ours exists unmarked after a
        commit, and a crash in between leaves nothing half-owned.
        """
        schema = names.schema or "public"
        with self._errors():
            before = current_version(self.conn, names)
            self.conn.commit()
            if before > SCHEMA_VERSION:
                raise DatabaseError(
                    r.SCHEMA_TOO_NEW,
                    f"schema {names.schema} is at version {before}, newer than this operator "
                    f"({SCHEMA_VERSION}); upgrade the operator")
        # No shortcut when already current: the re-check below is what catches a store that
        # provisioned the same names between `assessment` and now (one catalog query).
        me = self._me()
        ours = {"schema": schema,
                "objects": sorted(set(names.all_tables()) | set(names.all_sequences()))}
        try:
            with self.conn.begin():
                marks = list(assessment.to_mark)
                if assessment.create_schema:
                    self.raw.execute(q.create_schema(schema, if_not_exists=False))
                    self.raw.execute(q.revoke_schema_from_public(schema))
                    marks.append((m.SCHEMA, schema))
                # What of our names exists before the migration: the migration adopts an
                # existing table of our name (adds columns) and skips an existing sequence,
                # so "unmarked after it ran" alone does not mean "created by it".
                existed = {(kind, name) for kind, name, _c, _x in
                           self._fetch(q.OWN_OBJECT_MARKERS, ours)}
                after = migrate(self.conn, names) if before < SCHEMA_VERSION else before
                # Re-read inside the transaction (after migrate's advisory lock): a store
                # that provisioned the same names concurrently has committed its markers by
                # now, and they are never overwritten.
                for kind, name, comment, written_here in self._fetch(q.OWN_OBJECT_MARKERS,
                                                                     ours):
                    if (kind, name) in marks:
                        continue
                    state, other = m.verdict(me, comment)
                    if state == m.FOREIGN or state == m.PREVIOUS:
                        raise OwnershipError(
                            r.OWNERSHIP_CONFLICT,
                            f"{kind.lower()} {name} belongs to ResultStore "
                            f"{other.label() if other else '?'}; nothing was changed",
                            other if state == m.FOREIGN else None)
                    if state == m.MISSING and ((kind, name) in existed or not written_here):
                        # not created by this transaction: an unmarked object of our name
                        # appeared since the assessment (someone else's, e.g. a stock
                        # Celery client's)
                        raise OwnershipError(
                            r.OWNERSHIP_CONFLICT,
                            f"{kind.lower()} {name} exists and was not created by this "
                            f"ResultStore; nothing was changed")
                    if state == m.MISSING:
                        marks.append((kind, name))
                for statement in self._marks(marks, schema):
                    self.raw.execute(statement)
        except DatabaseError:
            self._rollback()
            raise
        except (psycopg.Error, sa.exc.SQLAlchemyError) as exc:
            self._rollback()
            err = classify(exc, self.admin.password)
            if err.reason == r.DATABASE_ERROR:
                err = DatabaseError(r.MIGRATION_FAILED, err.message)
            raise err from None
        return before, after

    def last_cleanup_run(self, names: TableNames) -> CleanupRun | None:
        statement = sql.SQL(
            "SELECT started_at, duration_seconds, rows_deleted, success, error FROM {} "
            "ORDER BY started_at DESC, id DESC LIMIT 1"
        ).format(sql.Identifier(names.schema or "public", names.cleanup_table))
        rows = self._query(statement)
        if not rows:
            return None
        started, duration, deleted, success, error = rows[0]
        return CleanupRun(started, float(duration), int(deleted), bool(success), error)

    def teardown(self, plan: m.Teardown, schema: str) -> None:
        """Drop exactly what `plan` (marker.plan_teardown) lists: never CASCADE."""
        statements = [stmt for stmt in (
            q.drop_objects(q.KIND_TABLE, schema, plan.tables),
            q.drop_objects(q.KIND_SEQUENCE, schema, plan.sequences),
        ) if stmt is not None]
        if plan.drop_schema:
            statements.append(q.drop_schema(schema))
        if statements:
            self._execute(statements)

    # --- roles -----------------------------------------------------------------------------

    def role_state(self, role: str) -> tuple[bool, bool]:
        """(exists, can log in) of a role of ours; OwnershipError for an existing role
        without our marker, before anything (a login attempt included) is tried on it."""
        return self._owned_role_state(role)

    def _owned_role_state(self, role: str) -> tuple[bool, bool]:
        """role_state, refusing (OwnershipError) an existing role without our marker."""
        info = self._owned_role(role)
        return (False, False) if info is None else (True, info[0])

    def _owned_role(self, role: str) -> tuple[bool, int] | None:
        """(can log in, CONNECTION LIMIT) of an existing role carrying our marker; None when
        it does not exist; OwnershipError for one without our marker."""
        rows = self._query(q.ROLE_INFO, (role,))
        if not rows:
            return None
        state, other = m.verdict(self._me(), rows[0][1])
        if state != m.OURS:
            who = f"belongs to ResultStore {other.label()}" if state == m.FOREIGN and other \
                else "was not created by this ResultStore"
            raise OwnershipError(r.OWNERSHIP_CONFLICT, f"role {role} {who}; left untouched",
                                 other if state == m.FOREIGN else None)
        return bool(rows[0][0]), int(rows[0][2])

    def ensure_role(self, role: str, verifier: str | None, schema: str,
                    limit: int = -1) -> bool:
        """Create the login role, or (re)set its password/LOGIN and CONNECTION LIMIT
        (`limit`, -1: none; only altered when it differs); True if it was created.

        `verifier` None keeps the current password (it is known to be what the Secret
        holds) and only makes sure the role can log in.
        """
        info = self._owned_role(role)
        statements: list[sql.SQL | sql.Composed] = []
        if info is None:
            if verifier is None:
                raise ValueError("a new role needs a password")
            statements.append(q.create_role(role, verifier, limit))
            statements.append(q.comment_on("ROLE", None, role, m.marker_text(self._me())))
        elif verifier is not None:
            statements.append(q.set_password(role, verifier))
        elif not info[0]:
            statements.append(q.set_login(role, True))
        if info is not None and info[1] != limit:
            statements.append(q.set_connection_limit(role, limit))
        exists = info is not None
        if statements or not exists:
            statements.insert(0, q.lock_database_acl(self.target.database))
            statements.append(q.set_search_path(role, self.target.database, schema))
            statements.append(q.grant_connect(role, self.target.database))
        if statements:
            self._execute(statements)
        return not exists

    def our_objects(self, names: TableNames) -> list[q.DbObject]:
        """The store's own tables and sequences that exist (never the rest of the schema)."""
        schema = names.schema or "public"
        wanted = sorted(set(names.all_tables()) | set(names.all_sequences()))
        return [q.DbObject(kind, schema, name) for kind, name in
                self._query(q.SCHEMA_OBJECTS, {"schema": schema, "objects": wanted})]

    def sync_privileges(self, names: TableNames, granted: Iterable[str],
                        managed: Iterable[str], schema_ours: bool = True) -> list[str]:
        """Make the ACLs of our schema and our objects exactly least-privilege.

        `granted` roles get USAGE/DML/sequence usage on the store's own tables and sequences
        only; every other `managed` role and PUBLIC get nothing on them. PUBLIC's rights on
        the schema itself are only managed when the schema is ours (`schema_ours`): an
        adopted schema's ACL is someone else's. Returns human-readable descriptions of what
        changed (empty when nothing drifted).
        """
        schema = names.schema or "public"
        granted_set = set(granted)
        managed_list = sorted(set(managed) | granted_set)
        ours = self.our_objects(names)
        objects = [q.DbObject(q.KIND_SCHEMA, schema), *ours]
        actual: dict[tuple[q.DbObject, str], set[str]] = {}
        for kind, name, grantee, privilege in self._query(
                q.OBJECT_ACLS, {"schema": schema, "roles": managed_list,
                                "objects": [o.name for o in ours],
                                "schema_public": schema_ours}):
            obj = q.DbObject(kind, schema, name)
            actual.setdefault((obj, grantee or "PUBLIC"), set()).add(privilege)
        expected = {
            (obj, role): q.expected_privileges(obj, names.version_table)
            for obj in objects for role in granted_set
        }
        changes = q.privilege_changes(
            {k: frozenset(v) for k, v in actual.items()}, expected)
        if changes:
            self._execute(q.change_statement(ch) for ch in changes)
        return [f"{verb} {','.join(sorted(privs))} on {obj.kind.lower()} {obj.label()} "
                f"{'to' if verb == 'GRANT' else 'from'} {grantee}"
                for verb, obj, grantee, privs in changes]

    def connection_usage(self, roles: Iterable[str]) -> ConnectionUsage:
        """The store's sessions and the server's room (builders.connections decides)."""
        rows = self._query(q.CONNECTION_USAGE, {"roles": sorted(set(roles))})
        in_use, active, idle, server_max, reserved, server_in_use = rows[0]
        return ConnectionUsage(int(in_use), int(active), int(idle), int(server_max),
                               int(reserved), int(server_in_use))

    def session_count(self, role: str) -> int:
        rows = self._query(q.COUNT_SESSIONS, (role,))
        return int(rows[0][0]) if rows else 0

    def terminate_sessions(self, role: str) -> int:
        """End the role's sessions; best effort for a non-superuser admin.

        pg_terminate_backend needs the privileges of the target role (or pg_signal_backend).
        A CREATEROLE admin may grant itself membership in a role it manages, so it does that
        once and retries; if even that is refused the sessions are left to end on their own
        (the role is NOLOGIN or dropped anyway) rather than blocking rotation or deletion.
        Only a role carrying our marker is touched.
        """
        if not self._owned_role_state(role)[0]:
            return 0
        try:
            return self._terminate(role)
        except DatabaseError as exc:
            if exc.reason != r.INSUFFICIENT_PRIVILEGE:
                raise
        try:
            self._execute([q.grant_membership_to_self(role)])
            return self._terminate(role)
        except DatabaseError as exc:
            if exc.reason != r.INSUFFICIENT_PRIVILEGE:
                raise
            log.warning("cannot terminate sessions of %s: %s", role, exc.message)
            return 0

    def _terminate(self, role: str) -> int:
        rows = self._query(q.TERMINATE_SESSIONS, (role,))
        return int(rows[0][0]) if rows else 0

    def disable_login(self, role: str) -> bool:
        exists, can_login = self._owned_role_state(role)
        if exists and can_login:
            self._execute([q.set_login(role, False)])
            return True
        return False

    def remove_role(self, role: str, names: TableNames) -> bool:
        """Revoke what we granted and drop the role; fall back to NOLOGIN if it still owns
        something elsewhere (a DBA's grant in another database). True when dropped."""
        exists, _ = self._owned_role_state(role)
        if not exists:
            return True
        schema = names.schema or "public"
        statements: list[sql.SQL | sql.Composed] = []
        if self.schema_exists(schema):
            statements.extend(q.revoke_everything(role, schema, self.our_objects(names),
                                                  self.target.database))
        else:
            statements.extend(q.revoke_everything(role, None, (), self.target.database))
        statements.append(q.drop_role(role))
        try:
            self._execute(statements)
            return True
        except DatabaseError as exc:
            log.warning("could not drop role %s (%s); disabling its login instead", role,
                        exc.reason)
            self.disable_login(role)
            return False

