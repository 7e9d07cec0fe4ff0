"""Ownership markers on PostgreSQL objects, and the decisions taken from them.

Schemas, roles, tables and sequences are server objects that several ResultStores (and
people) may name alike. The operator therefore writes `COMMENT ON <object> IS
'resultstore.dev/owner=<namespace>/<name> uid=<uid>'` in the same transaction that creates
the object, and before it alters, grants, revokes, terminates or drops anything it reads the
comments back: only objects that carry *this* store's marker (same uid) are touched. Names
alone never prove ownership; neither does a comment that merely looks similar.

Everything here is pure: database.py reads the catalog into an `Inventory`, `assess` decides,
and the caller applies (or reports the conflict and touches nothing).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..spec import SCHEMA_POLICY_ADOPT_EXISTING, SCHEMA_POLICY_EXCLUSIVE

MARKER_PREFIX = "resultstore.dev/owner="
_MARKER = re.compile(
    r"^resultstore\.dev/owner=(?P<namespace>[a-z0-9]([-a-z0-9]*[a-z0-9])?)/"
    r"(?P<name>[a-z0-9]([-.a-z0-9]*[a-z0-9])?) uid=(?P<uid>[0-9a-fA-F-]{1,64})$")

# verdicts of one object's marker against the store asking
OURS = "ours"            # this store (same uid)
PREVIOUS = "previous"    # a deleted store of the same namespace/name (other uid)
FOREIGN = "foreign"      # another ResultStore
MISSING = "missing"      # no marker (created by someone else, or before markers existed)

# object kinds, as in builders.sql
SCHEMA = "SCHEMA"
ROLE = "ROLE"
TABLE = "TABLE"
SEQUENCE = "SEQUENCE"

# schemaPolicy values (spec.py defines and validates them)
POLICY_EXCLUSIVE = SCHEMA_POLICY_EXCLUSIVE
POLICY_ADOPT_EXISTING = SCHEMA_POLICY_ADOPT_EXISTING

# conflict kinds (handlers map them onto condition reasons)
CONFLICT_OWNER = "owner"            # an object of ours is marked by another store / nobody
CONFLICT_FOREIGN_SCHEMA = "schema"  # an existing schema holds objects we did not create


@dataclass(frozen=True)
class Owner:
    """The identity a marker records: enough to name the other store in a message."""

    namespace: str
    name: str
    uid: str

    def label(self) -> str:
        return f"{self.namespace}/{self.name}"


def marker_text(owner: Owner) -> str:
    return f"{MARKER_PREFIX}{owner.namespace}/{owner.name} uid={owner.uid}"


def parse_marker(comment: str | None) -> Owner | None:
    """The owner recorded in a comment, or None when it is not a marker of ours."""
    if not comment:
        return None
    match = _MARKER.match(comment.strip())
    if match is None:
        return None
    return Owner(match["namespace"], match["name"], match["uid"])


def verdict(me: Owner, comment: str | None) -> tuple[str, Owner | None]:
    """(OURS|PREVIOUS|FOREIGN|MISSING, the recorded owner or None)."""
    other = parse_marker(comment)
    if other is None:
        return MISSING, None
    if other.uid == me.uid:
        return OURS, other
    if (other.namespace, other.name) == (me.namespace, me.name):
        return PREVIOUS, other
    return FOREIGN, other


@dataclass(frozen=True)
class CatalogObject:
    """A relation in the store's schema (TABLE/SEQUENCE, or OTHER for views, functions...)."""

    kind: str
    name: str
    comment: str | None = None


@dataclass(frozen=True)
class Inventory:
    """What exists on the server under the names the store uses."""

    schema: str
    schema_exists: bool
    schema_comment: str | None = None
    objects: tuple[CatalogObject, ...] = ()
    #: existing roles among the store's role names -> their comment
    roles: Mapping[str, str | None] = field(default_factory=dict)
    #: the admin role owns the schema (only an owner may COMMENT on it, i.e. mark it)
    schema_owned: bool = True


@dataclass(frozen=True)
class Conflict:
    kind: str
    message: str
    other: Owner | None = None
    #: every problem is an unmarked object of one of our names: a store provisioned before
    #: markers existed would see exactly this, so proof of authorship can clear it
    legacy_fixable: bool = False


@dataclass(frozen=True)
class Assessment:
    conflict: Conflict | None
    #: the schema is (or will be, once created) ours: drop it when empty; manage PUBLIC on it
    schema_ours: bool
    create_schema: bool
    #: (kind, name) to COMMENT with our marker in the provisioning transaction
    to_mark: tuple[tuple[str, str], ...] = ()


def _describe(kind: str, name: str) -> str:
    return f"{kind.lower()} {name}"


class _Findings:
    """What `assess` found so far: the objects to mark and the problems that refuse."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, str]] = []
        self.problems: list[str] = []
        #: every problem so far is an unmarked object of our names (Conflict.legacy_fixable)
        self.fixable = True
        self.other_owner: Owner | None = None

    def refuse(self, kind: str, name: str, state: str, other: Owner | None) -> None:
        what = _describe(kind, name)
        if state == FOREIGN and other is not None:
            self.problems.append(f"{what} belongs to ResultStore {other.label()}")
            self.other_owner = self.other_owner or other
            self.fixable = False
        elif state == PREVIOUS and other is not None:
            self.problems.append(f"{what} was created by an earlier ResultStore "
                                 f"{other.label()} (uid {other.uid})")
            self.fixable = False
        else:
            self.problems.append(f"{what} exists and was not created by this ResultStore")


def _assess_schema(me: Owner, inv: Inventory, adopt: bool, legacy: bool,
                   found: _Findings) -> bool:
    """Whether the (existing or new) schema is ours; refuses or marks it as it goes."""
    if not inv.schema_exists:
        return True
    state, other = verdict(me, inv.schema_comment)
    if state == OURS:
        return True
    if state == FOREIGN or (state == PREVIOUS and not adopt):
        found.refuse(SCHEMA, inv.schema, state, other)
        return False
    if state == PREVIOUS or (legacy and inv.schema_owned):
        # PREVIOUS with adopt: re-marked when the admin owns it, otherwise used as someone
        # else's schema; MISSING with proof of authorship: ours from before markers
        if inv.schema_owned:
            found.marks.append((SCHEMA, inv.schema))
        return inv.schema_owned
    # MISSING without proof (or not the admin's, e.g. pre-created by a DBA): a schema
    # someone else made; usable only as `assess` sets out, and never dropped
    return False


def _assess_objects(me: Owner, inv: Inventory, ours: set[tuple[str, str]], adopt: bool,
                    legacy: bool, found: _Findings) -> list[str]:
    """Refuse or mark the objects of our names; return the others' (descriptions)."""
    foreign: list[str] = []
    for obj in inv.objects:
        key = (obj.kind, obj.name)
        state, other = verdict(me, obj.comment)
        if key not in ours:
            if state != OURS:
                foreign.append(_describe(obj.kind, obj.name) if obj.kind != "OTHER"
                               else obj.name)
        elif state == FOREIGN or (state != OURS and not (legacy or adopt)):
            found.refuse(obj.kind, obj.name, state, other)
        elif state != OURS:
            found.marks.append(key)
    for role, comment in sorted(inv.roles.items()):
        state, other = verdict(me, comment)
        if state == OURS:
            continue
        if legacy and state == MISSING:
            found.marks.append((ROLE, role))
        else:
            found.refuse(ROLE, role, state, other)
    return foreign


def assess(me: Owner, inv: Inventory, tables: Iterable[str], sequences: Iterable[str],
           policy: str = POLICY_EXCLUSIVE, legacy: bool = False) -> Assessment:
    """Decide whether the store may provision into `inv`, and what it must mark.

    `legacy` is the proof (checked by the caller) that this store itself provisioned the
    objects before markers existed: its status records the schema version and roles, and
    its Secret's password logs in as the recorded active role. With it, unmarked objects of
    our names are marked instead of refused. `policy` AdoptExisting lets the store use an
    existing schema holding other objects, and take over unmarked tables of its own names
    (e.g. a stock Celery backend's); an object marked by another store is always refused.
    """
    ours = {(TABLE, t) for t in tables} | {(SEQUENCE, s) for s in sequences}
    adopt = policy == POLICY_ADOPT_EXISTING
    found = _Findings()
    create = not inv.schema_exists
    schema_ours = _assess_schema(me, inv, adopt, legacy, found)
    foreign = _assess_objects(me, inv, ours, adopt, legacy, found)
    if found.problems:
        message = "; ".join(found.problems)
        if found.fixable and not adopt:
            message += (f" (set spec.schemaPolicy: {POLICY_ADOPT_EXISTING} to take over "
                        f"existing tables of the store's names, e.g. a stock Celery backend's)")
        return Assessment(Conflict(CONFLICT_OWNER, message, found.other_owner,
                                   legacy_fixable=found.fixable), schema_ours, create, ())
    if foreign and not schema_ours and not adopt:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more"
                                          if len(foreign) > 5 else "")
        return Assessment(Conflict(
            CONFLICT_FOREIGN_SCHEMA,
            f"schema {inv.schema} already exists and holds objects this ResultStore did not "
            f"create ({shown}); choose another spec.schema, or set spec.schemaPolicy: "
            f"{POLICY_ADOPT_EXISTING} to share it (the store's role is then granted only the "
            f"store's own tables, and deletion drops only those)"), schema_ours, create, ())
    return Assessment(None, schema_ours, create, tuple(found.marks))


@dataclass(frozen=True)
class Teardown:
    """What deletion may drop: only objects carrying this store's marker."""

    tables: tuple[str, ...]
    sequences: tuple[str, ...]
    roles: tuple[str, ...]
    drop_schema: bool
    #: human-readable list of what is left alone and why
    kept: tuple[str, ...]


def plan_teardown(me: Owner, inv: Inventory) -> Teardown:
    """Our marked tables, sequences and roles; the schema only if ours and left empty.

    Nothing is dropped with CASCADE: an object of someone else's that depends on ours makes
    the DROP fail (deletion is then blocked with the server's message) instead of vanishing.
    """
    tables: list[str] = []
    sequences: list[str] = []
    kept: list[str] = []
    for obj in inv.objects:
        state, other = verdict(me, obj.comment)
        if state == OURS and obj.kind == TABLE:
            tables.append(obj.name)
        elif state == OURS and obj.kind == SEQUENCE:
            sequences.append(obj.name)
        else:
            kept.append(_describe(obj.kind, obj.name) if obj.kind != "OTHER" else obj.name)
    roles: list[str] = []
    for role, comment in sorted(inv.roles.items()):
        if verdict(me, comment)[0] == OURS:
            roles.append(role)
        else:
            kept.append(f"role {role} (not created by this ResultStore)")
    schema_ours = inv.schema_exists and verdict(me, inv.schema_comment)[0] == OURS
    if inv.schema_exists and not schema_ours:
        kept.insert(0, f"schema {inv.schema} (not created by this ResultStore)")
    drop_schema = schema_ours and not any(
        verdict(me, o.comment)[0] != OURS for o in inv.objects)
    if schema_ours and not drop_schema:
        kept.insert(0, f"schema {inv.schema} (holds objects of others)")
    return Teardown(tuple(tables), tuple(sequences), tuple(roles), drop_schema, tuple(kept))
