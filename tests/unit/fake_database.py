"""An in-memory PostgreSQL for the controller's unit tests: the `database.Database` seam.

It models what the controller's decisions depend on, with the rules of the real thing:
roles store a SCRAM verifier, and a login succeeds only when the password matches it
(recomputed from the verifier's salt, as the server does); objects carry ownership markers
(COMMENT) and a role without this store's marker is refused (OwnershipError), as
database.AdminSession does; the admin login checks the admin password; the server can be
made unreachable. Every effective change is recorded in `writes`, so "nothing changed" is
an assertion. The real AdminSession is tested against PostgreSQL in tests/integration and,
with the controller, in tests/e2e.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from resultstore_backend.schema import SCHEMA_VERSION, TableNames
from resultstore_operator.builders import marker as m
from resultstore_operator.builders import reasons as r
from resultstore_operator.builders.connections import ConnectionUsage
from resultstore_operator.builders.scram import scram_verifier
from resultstore_operator.database import (
    CleanupRun,
    Credentials,
    DatabaseError,
    OwnershipError,
    Session,
    Target,
)


def verifier_matches(verifier: str, password: str) -> bool:
    """Would the server accept `password` for a role storing `verifier`?"""
    head, keys = verifier.split("$", 1)[1].split("$")
    iterations, salt = head.split(":")
    expected = scram_verifier(password, base64.b64decode(salt), int(iterations))
    return hmac.compare_digest(expected.split("$", 2)[2], keys)


@dataclass
class Role:
    verifier: str
    comment: str | None
    can_login: bool = True
    #: CONNECTION LIMIT (-1: none)
    limit: int = -1


@dataclass
class FakeDatabase:
    admin: Credentials
    roles: dict[str, Role] = field(default_factory=dict)
    #: schema -> marker comment (None: unmarked)
    schemas: dict[str, str | None] = field(default_factory=dict)
    #: (schema, kind, name) -> marker comment
    objects: dict[tuple[str, str, str], str | None] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    #: (schema, role) pairs holding the store's privileges
    grants: set[tuple[str, str]] = field(default_factory=set)
    sessions: dict[str, int] = field(default_factory=dict)
    #: of `sessions`, those running a statement (the rest are idle)
    active: dict[str, int] = field(default_factory=dict)
    #: the server's max_connections, its reserved slots, and client sessions of other roles
    #: (the admin's own included)
    server_max: int = 100
    server_reserved: int = 3
    other_sessions: int = 1
    writes: list[str] = field(default_factory=list)
    #: when set, every connection fails with this reason (DatabaseUnreachable, ...)
    down: str | None = None
    opened: int = 0
    #: session method name -> errors its next calls raise (one per call), before any effect
    fail: dict[str, list[Exception]] = field(default_factory=dict)

    def fail_next(self, method: str) -> None:
        pending = self.fail.get(method)
        if pending:
            raise pending.pop(0)

    def _connect(self, creds: Credentials) -> None:
        if self.down is not None:
            raise DatabaseError(self.down, "connection to 127.0.0.1:5432 refused")
        if creds.username == self.admin.username:
            if creds.password != self.admin.password:
                raise DatabaseError(r.ADMIN_AUTH_FAILED,
                                    f'password authentication failed for user '
                                    f'"{creds.username}"')
            return
        role = self.roles.get(creds.username)
        if role is None or not role.can_login or \
                not verifier_matches(role.verifier, creds.password):
            raise DatabaseError(r.ADMIN_AUTH_FAILED,
                                f'password authentication failed for user '
                                f'"{creds.username}"')

    # --- database.Database -------------------------------------------------------------------

    @contextmanager
    def session(self, target: Target, admin: Credentials,
                owner: m.Owner) -> Iterator[Session]:
        self._connect(admin)
        self.opened += 1
        yield FakeSession(self, owner)

    def check_login(self, target: Target, creds: Credentials) -> bool:
        try:
            self._connect(creds)
        except DatabaseError as exc:
            if exc.reason == r.ADMIN_AUTH_FAILED:
                return False
            raise
        return True

    def logs_in(self, role: str, password: str) -> bool:
        return self.check_login(Target("127.0.0.1", 5432, "app"), Credentials(role, password))


class FakeSession:
    """One admin session over FakeDatabase (the methods database.Session names)."""

    def __init__(self, db: FakeDatabase, owner: m.Owner) -> None:
        self.db = db
        self.owner = owner
        self.marker = m.marker_text(owner)

    @property
    def tls_in_use(self) -> bool:
        return False

    def check_capabilities(self, schema: str) -> None:
        return None

    def inventory(self, schema: str, roles: Iterable[str]) -> m.Inventory:
        db = self.db
        exists = schema in db.schemas
        objects = tuple(m.CatalogObject(kind, name, comment)
                        for (s, kind, name), comment in sorted(db.objects.items(),
                                                               key=lambda i: i[0])
                        if s == schema)
        return m.Inventory(schema=schema, schema_exists=exists,
                           schema_comment=db.schemas.get(schema),
                           objects=objects if exists else (),
                           roles={role: db.roles[role].comment for role in sorted(set(roles))
                                  if role in db.roles})

    def mark(self, marks: Iterable[tuple[str, str]], schema: str) -> None:
        for kind, name in marks:
            self._mark(kind, name, schema)

    def _mark(self, kind: str, name: str, schema: str) -> None:
        if kind == m.SCHEMA:
            self.db.schemas[name] = self.marker
        elif kind == m.ROLE:
            self.db.roles[name].comment = self.marker
        else:
            self.db.objects[(schema, kind, name)] = self.marker
        self.db.writes.append(f"COMMENT ON {kind} {name}")

    def migrate(self, names: TableNames, assessment: m.Assessment) -> tuple[int, int]:
        schema = names.schema or "public"
        before = self.db.versions.get(schema, 0)
        if assessment.create_schema:
            self.db.schemas[schema] = None
            self.db.writes.append(f"CREATE SCHEMA {schema}")
            self._mark(m.SCHEMA, schema, schema)
        for kind, name in assessment.to_mark:
            self._mark(kind, name, schema)
        wanted = [(m.TABLE, t) for t in names.all_tables()] + \
            [(m.SEQUENCE, s) for s in names.all_sequences()]
        for kind, name in wanted:
            if (schema, kind, name) not in self.db.objects:
                self.db.objects[(schema, kind, name)] = self.marker
                self.db.writes.append(f"CREATE {kind} {name}")
        if before != SCHEMA_VERSION:
            self.db.versions[schema] = SCHEMA_VERSION
            self.db.writes.append(f"MIGRATE {schema} {before} -> {SCHEMA_VERSION}")
        return before, SCHEMA_VERSION

    def last_cleanup_run(self, names: TableNames) -> CleanupRun | None:
        return None

    def teardown(self, plan: m.Teardown, schema: str) -> None:
        for kind, dropped in ((m.TABLE, plan.tables), (m.SEQUENCE, plan.sequences)):
            for name in dropped:
                del self.db.objects[(schema, kind, name)]
                self.db.writes.append(f"DROP {kind} {name}")
        if plan.drop_schema:
            del self.db.schemas[schema]
            self.db.versions.pop(schema, None)
            self.db.writes.append(f"DROP SCHEMA {schema}")

    # --- roles ---------------------------------------------------------------------------------

    def role_state(self, role: str) -> tuple[bool, bool]:
        found = self._owned(role)
        return (False, False) if found is None else (True, found.can_login)

    def _owned(self, role: str) -> Role | None:
        found = self.db.roles.get(role)
        if found is not None and m.verdict(self.owner, found.comment)[0] != m.OURS:
            raise OwnershipError(r.OWNERSHIP_CONFLICT,
                                 f"role {role} was not created by this ResultStore; left "
                                 f"untouched")
        return found

    def ensure_role(self, role: str, verifier: str | None, schema: str,
                    limit: int = -1) -> bool:
        self.db.fail_next("ensure_role")
        found = self._owned(role)
        if found is None:
            if verifier is None:
                raise ValueError("a new role needs a password")
            self.db.roles[role] = Role(verifier, self.marker, limit=limit)
            self.db.writes.append(f"CREATE ROLE {role} CONNECTION LIMIT {limit}")
            return True
        if found.limit != limit:
            found.limit = limit
            self.db.writes.append(f"ALTER ROLE {role} CONNECTION LIMIT {limit}")
        if verifier is not None:
            found.verifier = verifier
            found.can_login = True
            self.db.writes.append(f"ALTER ROLE {role} PASSWORD")
        elif not found.can_login:
            found.can_login = True
            self.db.writes.append(f"ALTER ROLE {role} LOGIN")
        return False

    def sync_privileges(self, names: TableNames, granted: Iterable[str],
                        managed: Iterable[str], schema_ours: bool = True) -> list[str]:
        self.db.fail_next("sync_privileges")
        schema = names.schema or "public"
        wanted = set(granted)
        changes = []
        for role in sorted(wanted | set(managed)):
            holds = (schema, role) in self.db.grants
            if role in wanted and not holds:
                self.db.grants.add((schema, role))
                changes.append(f"GRANT USAGE on schema {schema} to {role}")
            elif role not in wanted and holds:
                self.db.grants.discard((schema, role))
                changes.append(f"REVOKE USAGE on schema {schema} from {role}")
        self.db.writes.extend(changes)
        return changes

    def connection_usage(self, roles: Iterable[str]) -> ConnectionUsage:
        db = self.db
        names = set(roles)
        in_use = sum(n for role, n in db.sessions.items() if role in names)
        active = sum(n for role, n in db.active.items() if role in names)
        others = sum(n for role, n in db.sessions.items() if role not in names)
        return ConnectionUsage(in_use, active, in_use - active, db.server_max,
                               db.server_reserved, in_use + others + db.other_sessions)

    def session_count(self, role: str) -> int:
        return self.db.sessions.get(role, 0)

    def terminate_sessions(self, role: str) -> int:
        if self._owned(role) is None:
            return 0
        killed = self.db.sessions.pop(role, 0)
        if killed:
            self.db.writes.append(f"TERMINATE {role}")
        return killed

    def disable_login(self, role: str) -> bool:
        found = self._owned(role)
        if found is not None and found.can_login:
            found.can_login = False
            self.db.writes.append(f"ALTER ROLE {role} NOLOGIN")
            return True
        return False

    def remove_role(self, role: str, names: TableNames) -> bool:
        if self._owned(role) is None:
            return True
        del self.db.roles[role]
        self.db.grants = {(s, g) for s, g in self.db.grants if g != role}
        self.db.writes.append(f"DROP ROLE {role}")
        return True
