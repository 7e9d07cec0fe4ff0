"""Names derived from a ResultStore: Kubernetes object names and PostgreSQL role names.

Roles are cluster-wide in PostgreSQL while schemas are per database, so a role name derived
from the schema alone could collide between two databases on one server. The base therefore
carries a short hash of database and schema: stable for the store's life (both are
immutable), recomputable after a crash, and readable in `\\du` thanks to the schema prefix.
"""

from __future__ import annotations

import hashlib

from ..spec import GROUP

ROLE_SUFFIXES = ("a", "b")
LABEL_STORE = f"{GROUP}/store"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "app.kubernetes.io/component"
MANAGED_BY = "resultstore-operator"


# DESIGN.md: the Secret `<store>-resultstore`, mounted at /var/run/resultstore/<store>.
SECRET_SUFFIX = "-resultstore"
MOUNT_ROOT = "/var/run/resultstore"


def secret_name(store: str) -> str:
    return f"{store}{SECRET_SUFFIX}"


def cronjob_name(store: str) -> str:
    return f"{store}-resultstore-cleanup"


def config_dir(store: str) -> str:
    """Where the Secret is mounted in pods (the backend URL resultstore:///<this>)."""
    return f"{MOUNT_ROOT}/{store}"


def role_base(database: str, schema: str) -> str:
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
