"""SQL for login roles, grants, drift repair and teardown, composed with psycopg.sql.

Identifiers come from validated spec fields and are still quoted with sql.Identifier; the
password is never a parameter here: only its SCRAM verifier (scram.py) reaches the server.
Privilege keywords come from the fixed sets below, never from user input.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from psycopg import sql

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


def create_schema(schema: str) -> sql.Composed:
    return sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))


def revoke_schema_from_public(schema: str) -> sql.Composed:
    return sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(sql.Identifier(schema))


def create_role(role: str, verifier: str) -> sql.Composed:
    """A plain login role: no superuser, no CREATEDB/CREATEROLE, no inherited privileges."""
    return sql.SQL(
        "CREATE ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT "
        "NOREPLICATION NOBYPASSRLS PASSWORD {}"
    ).format(sql.Identifier(role), sql.Literal(verifier))


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


def revoke_everything(role: str, schema: str, database: str) -> list[sql.Composed]:
    """Before DROP ROLE: remove every privilege this operator may have granted the role."""
    r, s = sql.Identifier(role), sql.Identifier(schema)
    return [
        sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM {}").format(s, r),
        sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA {} FROM {}").format(s, r),
        sql.SQL("REVOKE ALL ON SCHEMA {} FROM {}").format(s, r),
        revoke_connect(role, database),
        sql.SQL("ALTER ROLE {} IN DATABASE {} RESET ALL").format(r, sql.Identifier(database)),
    ]


def grant_membership_to_self(role: str) -> sql.Composed:
    """Lets a CREATEROLE admin signal the role's backends (pg_terminate_backend)."""
    return sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(role))


def drop_role(role: str) -> sql.Composed:
    return sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role))


def drop_schema(schema: str) -> sql.Composed:
    return sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))


# Parameterised catalog queries (values bound, never interpolated).
ROLE_INFO = sql.SQL(
    "SELECT rolcanlogin, oid FROM pg_catalog.pg_roles WHERE rolname = %s")
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
SCHEMA_EXISTS = sql.SQL(
    "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %s")
# (kind, name, grantee role name or '' for PUBLIC, privilege) for our schema and its objects,
# restricted to the grantees we manage (PUBLIC and the store's login roles).
OBJECT_ACLS = sql.SQL("""
    SELECT 'SCHEMA', NULL::text, coalesce(r.rolname, ''), a.privilege_type
      FROM pg_catalog.pg_namespace n
     CROSS JOIN LATERAL aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a
      LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
     WHERE n.nspname = %(schema)s
       AND (a.grantee = 0 OR r.rolname = ANY(%(roles)s))
    UNION ALL
    SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, c.relname::text,
           coalesce(r.rolname, ''), a.privilege_type
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     CROSS JOIN LATERAL aclexplode(coalesce(c.relacl, acldefault(
               CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END::"char", c.relowner))) a
      LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
     WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p', 'S')
       AND (a.grantee = 0 OR r.rolname = ANY(%(roles)s))
""")
SCHEMA_OBJECTS = sql.SQL("""
    SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, c.relname::text
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'S')
     ORDER BY 1, 2
""")
