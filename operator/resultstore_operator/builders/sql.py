"""SQL for login roles, grants, drift repair and teardown, composed with psycopg.sql.

Identifiers come from validated spec fields and are still quoted with sql.Identifier; the
password is never a parameter here: only its SCRAM verifier (scram.py) reaches the server.
Privilege keywords come from the fixed sets below, never from user input.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from psycopg import sql

from ..spec import CONNECTION_LIMIT_RANGE

TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES",
                    "TRIGGER")
DML = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE"})
READ_ONLY = frozenset({"SELECT"})
SEQUENCE_PRIVILEGES = ("USAGE", "SELECT", "UPDATE")
SEQUENCE_GRANT = frozenset({"USAGE", "SELECT"})
SCHEMA_PRIVILEGES = ("USAGE", "CREATE")
SCHEMA_GRANT = frozenset({"USAGE"})

KIND_SCHEMA = "SCHEMA"
KIND_TABLE = "TABLE"
KIND_SEQUENCE = "SEQUENCE"


@dataclass(frozen=True, order=True)
class DbObject:
    """A schema, or a table/sequence inside our schema."""

    kind: str
    schema: str
    name: str | None = None

    def ident(self) -> sql.Composable:
        if self.kind == KIND_SCHEMA or self.name is None:
            return sql.Identifier(self.schema)
        return sql.Identifier(self.schema, self.name)

    def label(self) -> str:
        return self.schema if self.name is None else f"{self.schema}.{self.name}"


def create_schema(schema: str, if_not_exists: bool = True) -> sql.Composed:
    """`if_not_exists=False` when the store is to own it: a schema created concurrently by
    someone else then fails our transaction instead of being taken over."""
    return sql.SQL("CREATE SCHEMA IF NOT EXISTS {}" if if_not_exists
                   else "CREATE SCHEMA {}").format(sql.Identifier(schema))


def revoke_schema_from_public(schema: str) -> sql.Composed:
    return sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(sql.Identifier(schema))


def connection_limit(limit: int) -> sql.Composable:
    """`CONNECTION LIMIT n` from a checked integer (-1: none, else spec.py's range); the
    keyword takes no parameter, so the number is rendered only after that check."""
    low, high = CONNECTION_LIMIT_RANGE
    if isinstance(limit, bool) or not isinstance(limit, int) or \
            not (limit == -1 or low <= limit <= high):
        raise ValueError(f"invalid connection limit {limit!r}")
    return sql.SQL("CONNECTION LIMIT " + str(int(limit)))


def create_role(role: str, verifier: str, limit: int = -1) -> sql.Composed:
    """A plain login role: no superuser, no CREATEDB/CREATEROLE, no inherited privileges,
    with the store's CONNECTION LIMIT (-1: none) from the start, so a next role of a
    rotation is never briefly unlimited."""
    return sql.SQL(
        "CREATE ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT "
        "NOREPLICATION NOBYPASSRLS {} PASSWORD {}"
    ).format(sql.Identifier(role), connection_limit(limit), sql.Literal(verifier))


def set_connection_limit(role: str, limit: int) -> sql.Composed:
    return sql.SQL("ALTER ROLE {} WITH {}").format(sql.Identifier(role),
                                                   connection_limit(limit))


def set_password(role: str, verifier: str) -> sql.Composed:
    return sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
        sql.Identifier(role), sql.Literal(verifier))


def set_login(role: str, enabled: bool) -> sql.Composed:
    return sql.SQL("ALTER ROLE {} WITH " + ("LOGIN" if enabled else "NOLOGIN")).format(
        sql.Identifier(role))


def set_search_path(role: str, database: str, schema: str) -> sql.Composed:
    """Interactive sessions of the role land in its schema (psql, stock clients)."""
    return sql.SQL("ALTER ROLE {} IN DATABASE {} SET search_path = {}").format(
        sql.Identifier(role), sql.Identifier(database), sql.Identifier(schema))


#: First key of the transaction lock taken before GRANT/REVOKE ... ON DATABASE ("RSDA");
#: the second is the database name's hash
DATABASE_ACL_LOCK = 0x52534441


def lock_database_acl(database: str) -> sql.Composed:
    """The first statement of a transaction that grants or revokes on the database.

    Why: GRANT and REVOKE ON DATABASE rewrite the database's one pg_database row, and of two
    sessions doing it at once the later fails with "tuple concurrently updated" instead of
    waiting. Stores provisioned together (a new namespace, hundreds after a failover) then
    fail a reconcile each and report a DatabaseError for nothing. Under this lock they wait
    their turn (milliseconds each); it ends with the transaction.
    """
    return sql.SQL("SELECT pg_advisory_xact_lock({}, hashtext({}))").format(
        sql.Literal(DATABASE_ACL_LOCK), sql.Literal(database))


def grant_connect(role: str, database: str) -> sql.Composed:
    return sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
        sql.Identifier(database), sql.Identifier(role))


def revoke_connect(role: str, database: str) -> sql.Composed:
    return sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(
        sql.Identifier(database), sql.Identifier(role))


def grant(obj: DbObject, privileges: Iterable[str], grantee: str) -> sql.Composed:
    return _privilege_statement("GRANT", "TO", obj, privileges, grantee)


def revoke(obj: DbObject, privileges: Iterable[str], grantee: str) -> sql.Composed:
    return _privilege_statement("REVOKE", "FROM", obj, privileges, grantee)


def _privilege_statement(verb: str, preposition: str, obj: DbObject,
                         privileges: Iterable[str], grantee: str) -> sql.Composed:
    allowed = set(TABLE_PRIVILEGES) | set(SEQUENCE_PRIVILEGES) | set(SCHEMA_PRIVILEGES)
    privs = sorted(set(privileges))
    if not privs or not set(privs) <= allowed:
        raise ValueError(f"invalid privileges {privs!r}")
    who: sql.Composable = (sql.SQL("PUBLIC") if grantee == "PUBLIC"
                           else sql.Identifier(grantee))
    return sql.SQL("{verb} {privs} ON {kind} {obj} {prep} {who}").format(
        verb=sql.SQL(verb),
        privs=sql.SQL(", ").join(sql.SQL(p) for p in privs),
        kind=sql.SQL(obj.kind),
        obj=obj.ident(),
        prep=sql.SQL(preposition),
        who=who,
    )


def expected_privileges(obj: DbObject, version_table: str) -> frozenset[str]:
    """Least privilege for a login role: use the schema, DML on tables, use sequences.

    The schema-version table is read-only for workers: only the operator migrates.
    """
    if obj.kind == KIND_SCHEMA:
        return SCHEMA_GRANT
    if obj.kind == KIND_SEQUENCE:
        return SEQUENCE_GRANT
    if obj.name == version_table:
        return READ_ONLY
    return DML


def privilege_changes(
    actual: Mapping[tuple[DbObject, str], frozenset[str]],
    expected: Mapping[tuple[DbObject, str], frozenset[str]],
) -> list[tuple[str, DbObject, str, frozenset[str]]]:
    """(GRANT|REVOKE, object, grantee, privileges) turning `actual` into `expected`.

    Keys are (object, grantee); a grantee absent from `expected` should hold nothing (that
    is how PUBLIC and a drained role are handled).
    """
    changes: list[tuple[str, DbObject, str, frozenset[str]]] = []
    for key in sorted(set(actual) | set(expected)):
        have = actual.get(key, frozenset())
        want = expected.get(key, frozenset())
        obj, grantee = key
        missing = want - have
        extra = have - want
        if extra:
            changes.append(("REVOKE", obj, grantee, frozenset(extra)))
        if missing:
            changes.append(("GRANT", obj, grantee, frozenset(missing)))
    return changes


def change_statement(change: tuple[str, DbObject, str, frozenset[str]]) -> sql.Composed:
    verb, obj, grantee, privs = change
    return grant(obj, privs, grantee) if verb == "GRANT" else revoke(obj, privs, grantee)


def revoke_everything(role: str, schema: str | None, objects: Iterable[DbObject],
                      database: str) -> list[sql.Composed]:
    """Before DROP ROLE: remove what this operator granted the role, object by object.

    Only the store's own `objects` (and its schema) are named: a privilege somebody else
    granted the role on a foreign table is not ours to revoke (DROP ROLE then fails and the
    role is disabled instead).
    """
    r = sql.Identifier(role)
    out: list[sql.Composed] = [lock_database_acl(database)]
    out += [
        sql.SQL("REVOKE ALL ON {} {} FROM {}").format(sql.SQL(obj.kind), obj.ident(), r)
        for obj in objects if obj.kind in (KIND_TABLE, KIND_SEQUENCE)
    ]
    if schema is not None:
        out.append(sql.SQL("REVOKE ALL ON SCHEMA {} FROM {}").format(sql.Identifier(schema), r))
    out.append(revoke_connect(role, database))
    out.append(sql.SQL("ALTER ROLE {} IN DATABASE {} RESET ALL").format(
        r, sql.Identifier(database)))
    return out


def comment_on(kind: str, schema: str | None, name: str, text: str) -> sql.Composed:
    """The ownership marker (builders.marker) on a schema, role, table or sequence."""
    if kind not in (KIND_SCHEMA, KIND_TABLE, KIND_SEQUENCE, "ROLE"):
        raise ValueError(f"cannot mark a {kind!r}")
    ident = (sql.Identifier(name) if kind in (KIND_SCHEMA, "ROLE") or schema is None
             else sql.Identifier(schema, name))
    return sql.SQL("COMMENT ON {} {} IS {}").format(sql.SQL(kind), ident, sql.Literal(text))


def drop_objects(kind: str, schema: str, names: Iterable[str]) -> sql.Composed | None:
    """DROP TABLE/SEQUENCE of exactly our objects, without CASCADE (one statement, so our
    tables' references to each other do not matter)."""
    if kind not in (KIND_TABLE, KIND_SEQUENCE):
        raise ValueError(f"cannot drop a {kind!r}")
    idents = [sql.Identifier(schema, n) for n in sorted(set(names))]
    if not idents:
        return None
    return sql.SQL("DROP {} IF EXISTS {} RESTRICT").format(
        sql.SQL(kind), sql.SQL(", ").join(idents))


def grant_membership_to_self(role: str) -> sql.Composed:
    """Lets a CREATEROLE admin signal the role's backends (pg_terminate_backend)."""
    return sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(role))


def drop_role(role: str) -> sql.Composed:
    return sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role))


def drop_schema(schema: str) -> sql.Composed:
    """RESTRICT: an object we did not create (and so did not drop) keeps the schema alive."""
    return sql.SQL("DROP SCHEMA IF EXISTS {} RESTRICT").format(sql.Identifier(schema))


# Parameterised catalog queries (values bound, never interpolated).
ROLE_INFO = sql.SQL(
    "SELECT rolcanlogin, shobj_description(oid, 'pg_authid'), rolconnlimit "
    "FROM pg_catalog.pg_roles WHERE rolname = %s")
ADMIN_CAPABILITIES = sql.SQL(
    "SELECT rolsuper, rolcreaterole, "
    "has_database_privilege(current_user, current_database(), 'CREATE') "
    "FROM pg_catalog.pg_roles WHERE rolname = current_user")
COUNT_SESSIONS = sql.SQL(
    "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE usename = %s "
    "AND pid <> pg_backend_pid()")
TERMINATE_SESSIONS = sql.SQL(
    "SELECT count(pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity "
    "WHERE usename = %s AND pid <> pg_backend_pid()")
# The connection budget (builders.connections.ConnectionUsage), in one row: the sessions of
# the store's roles (%(roles)s: both names of the rotation pair) by state, the server's
# max_connections and its reserved slots (superuser_reserved_connections, plus PostgreSQL
# 16's reserved_connections when the server has it), and every client session. The admin's
# own session is a client session of the server, not one of the store's.
CONNECTION_USAGE = sql.SQL("""
    SELECT count(*) FILTER (WHERE a.usename = ANY(%(roles)s)),
           count(*) FILTER (WHERE a.usename = ANY(%(roles)s) AND a.state = 'active'),
           count(*) FILTER (WHERE a.usename = ANY(%(roles)s) AND a.state LIKE 'idle%%'),
           current_setting('max_connections')::int,
           current_setting('superuser_reserved_connections')::int
             + coalesce(current_setting('reserved_connections', true), '0')::int,
           count(*) FILTER (WHERE a.backend_type = 'client backend')
      FROM pg_catalog.pg_stat_activity a
""")
SCHEMA_EXISTS = sql.SQL(
    "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %s")
# (kind, name, grantee role name or '' for PUBLIC, privilege) for our schema and exactly our
# own tables/sequences (%(objects)s: never every relation of the schema, which may hold
# someone else's), restricted to the grantees we manage (the store's login roles, and PUBLIC;
# PUBLIC on the schema itself only when the schema is ours, %(schema_public)s).
OBJECT_ACLS = sql.SQL("""
    SELECT 'SCHEMA', NULL::text, coalesce(r.rolname, ''), a.privilege_type
      FROM pg_catalog.pg_namespace n
     CROSS JOIN LATERAL aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a
      LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
     WHERE n.nspname = %(schema)s
       AND ((a.grantee = 0 AND %(schema_public)s) OR r.rolname = ANY(%(roles)s))
    UNION ALL
    SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, c.relname::text,
           coalesce(r.rolname, ''), a.privilege_type
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     CROSS JOIN LATERAL aclexplode(coalesce(c.relacl, acldefault(
               CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END::"char", c.relowner))) a
      LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
     WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p', 'S')
       AND c.relname = ANY(%(objects)s)
       AND (a.grantee = 0 OR r.rolname = ANY(%(roles)s))
""")
# Our own tables and sequences that exist (%(objects)s: TableNames.all_tables/all_sequences).
SCHEMA_OBJECTS = sql.SQL("""
    SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, c.relname::text
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p', 'S')
       AND c.relname = ANY(%(objects)s)
     ORDER BY 1, 2
""")
# The store's own tables and sequences (%(objects)s) with their markers, and whether this
# very transaction wrote their catalog row (created or altered them; no xid yet: no).
# AdminSession.migrate marks an unmarked one only when it did (and it did not exist before).
OWN_OBJECT_MARKERS = sql.SQL("""
    SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, c.relname::text,
           obj_description(c.oid, 'pg_class'),
           coalesce(c.xmin = pg_current_xact_id_if_assigned()::xid, false)
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p', 'S')
       AND c.relname = ANY(%(objects)s)
""")
# The ownership inventory (builders.marker): the schema's comment, ...
SCHEMA_MARKER = sql.SQL(
    "SELECT obj_description(oid, 'pg_namespace'), pg_has_role(nspowner, 'USAGE') "
    "FROM pg_catalog.pg_namespace WHERE nspname = %s")
# ... every object in it that someone could care about (relations except indexes/TOAST and
# row types, functions, free-standing types) with its comment ...
SCHEMA_INVENTORY = sql.SQL("""
    SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'r' THEN 'TABLE' WHEN 'p' THEN 'TABLE'
                ELSE 'OTHER' END,
           CASE WHEN c.relkind IN ('r', 'p', 'S') THEN c.relname::text
                ELSE 'relation ' || c.relname::text END,
           obj_description(c.oid, 'pg_class')
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p', 'S', 'v', 'm', 'f')
    UNION ALL
    SELECT 'OTHER', 'function ' || p.proname::text, NULL
      FROM pg_catalog.pg_proc p
      JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
     WHERE n.nspname = %(schema)s
    UNION ALL
    SELECT 'OTHER', 'type ' || t.typname::text, NULL
      FROM pg_catalog.pg_type t
      JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
     WHERE n.nspname = %(schema)s AND t.typtype IN ('d', 'e', 'r', 'm')
     ORDER BY 1, 2
""")
# ... and the store's roles that exist, with their comments (pg_shdescription).
ROLE_MARKERS = sql.SQL(
    "SELECT rolname::text, shobj_description(oid, 'pg_authid') FROM pg_catalog.pg_roles "
    "WHERE rolname = ANY(%s)")
