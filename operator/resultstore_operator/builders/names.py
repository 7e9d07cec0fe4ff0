"""Names derived from a ResultStore: Kubernetes object names and PostgreSQL role names.

Roles are cluster-wide in PostgreSQL, so a role name derived from database and schema alone
let two stores (two namespaces that both chose `schema: celery`) share, and reset, one role.
The base is therefore derived from the store's identity: namespace, name and uid, readable
in `\\du` through a shortened namespace/name prefix and made unique by a hash of all three.
The uid matters: a store re-created under the same name after `deletionPolicy: Retain` gets
fresh roles instead of the retained (marked, NOLOGIN) ones of its predecessor.

Stores provisioned before this scheme keep the base recorded in `status.credentials.roleBase`
(the handlers never recompute it once recorded), so an operator upgrade neither orphans nor
duplicates their roles; `legacy_role_base` is the old derivation, kept for the tests and for
documentation of what such stores use.
"""

from __future__ import annotations

import hashlib

from ..api import LABEL_COMPONENT, LABEL_MANAGED_BY, LABEL_STORE

ROLE_SUFFIXES = ("a", "b")
MANAGED_BY = "resultstore-operator"


# docs/CONTRACTS.md: the Secret `<store>-resultstore`, mounted at /var/run/resultstore/<store>.
SECRET_SUFFIX = "-resultstore"
MOUNT_ROOT = "/var/run/resultstore"


def secret_name(store: str) -> str:
    return f"{store}{SECRET_SUFFIX}"


def cronjob_name(store: str) -> str:
    return f"{store}-resultstore-cleanup"


def config_dir(store: str) -> str:
    """Where the Secret is mounted in pods (the backend URL resultstore:///<this>)."""
    return f"{MOUNT_ROOT}/{store}"


#: PostgreSQL truncates identifiers at 63 bytes; `<base>_a` must fit.
MAX_ROLE_BYTES = 63
_PART = 16
_HASH = 12


def _role_part(text: str) -> str:
    """Lower-case letters, digits and underscore only: the role needs no quoting in psql."""
    return "".join(ch if ch.isascii() and (ch.isalnum() or ch == "_") else "_"
                   for ch in text.lower())[:_PART]


def role_base(namespace: str, name: str, uid: str) -> str:
    """`rs_<namespace>_<name>_<hash>` (parts shortened); unique per store incarnation."""
    digest = hashlib.sha256(f"{namespace}\0{name}\0{uid}".encode()).hexdigest()[:_HASH]
    # 3 + 16 + 1 + 16 + 1 + 12 = 49 bytes, plus `_a`: always within MAX_ROLE_BYTES
    return f"rs_{_role_part(namespace)}_{_role_part(name)}_{digest}"


def legacy_role_base(database: str, schema: str) -> str:
    """The derivation of stores created before role names carried the store's identity."""
    digest = hashlib.sha256(f"{database}\0{schema}".encode()).hexdigest()[:8]
    return f"rs_{schema}_{digest}"


def role_names(base: str) -> tuple[str, str]:
    return (f"{base}_{ROLE_SUFFIXES[0]}", f"{base}_{ROLE_SUFFIXES[1]}")


def other_role(base: str, role: str) -> str:
    """The alternate of `role` (rotation flips between the two)."""
    first, second = role_names(base)
    if role == first:
        return second
    if role == second:
        return first
    raise ValueError(f"role {role!r} does not belong to base {base!r}")


def labels(store: str, component: str) -> dict[str, str]:
    return {
        LABEL_STORE: store,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_COMPONENT: component,
    }
