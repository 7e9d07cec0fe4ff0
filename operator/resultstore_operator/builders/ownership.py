"""Owner references, and the one rule that decides whether a Kubernetes object is ours.

The Secret and CronJob are created with a controller ownerReference to their ResultStore
(`controller: true`, `blockOwnerDeletion: true`): the garbage collector removes them after
the ResultStore's finalizer has run, and `kubectl` shows who manages them.

Why ownership is decided by the owner *uid* and nothing else: names are chosen by whoever
creates an object, and labels can be copied by anyone, but the uid of a ResultStore is
assigned by the API server and changes when a store of the same name is re-created. A
Secret `<store>-resultstore` that a person (or another tool) created before the store, or
one left behind by an earlier store of the same name, therefore never counts as ours: the
operator does not replace, patch or delete it, and reports it instead (condition + event).
The managed-by label is informational (selectors, `kubectl get -l`); it is restored on an
owned object and never trusted on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..api import ADMIN_CREDENTIALS_LABEL, API_VERSION, GROUP, KIND, LABEL_MANAGED_BY
from .names import MANAGED_BY


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def is_resultstore_ref(ref: Mapping[str, Any]) -> bool:
    api_version = str(ref.get("apiVersion") or "")
    return ref.get("kind") == KIND and api_version.split("/")[0] == GROUP


def controller_of(obj: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The object's controlling ownerReference, if any (at most one per object)."""
    for ref in ((obj or {}).get("metadata") or {}).get("ownerReferences") or []:
        if isinstance(ref, Mapping) and ref.get("controller"):
            return ref
    return None


def is_owned_by(obj: Mapping[str, Any] | None, uid: str) -> bool:
    """True when `obj`'s controller is the ResultStore with this uid (and uid is known)."""
    ref = controller_of(obj)
    return bool(uid) and ref is not None and is_resultstore_ref(ref) and ref.get("uid") == uid


def foreign_owner(obj: Mapping[str, Any], uid: str) -> str | None:
    """Why an existing `obj` is not ours, in words for a condition; None when it is ours.

    The text names the object and its controller (kind/name), never any data.
    """
    if is_owned_by(obj, uid):
        return None
    meta = obj.get("metadata") or {}
    kind = str(obj.get("kind") or "object")
    name = str(meta.get("name") or "")
    ref = controller_of(obj)
    if ref is None:
        managed = (meta.get("labels") or {}).get(LABEL_MANAGED_BY) == MANAGED_BY
        what = "has no controller ownerReference" + (
            " (only a copied managed-by label)" if managed else "")
    elif is_resultstore_ref(ref):
        what = (f"is controlled by another ResultStore {ref.get('name')!r} "
                f"(uid {ref.get('uid')})")
    else:
        what = f"is controlled by {ref.get('kind')} {ref.get('name')!r}"
    return (f"{kind} {name!r} already exists and {what}; it was not created for this "
            f"ResultStore and is left unchanged (delete or rename it to let the operator "
            f"create its own)")


# --- Secrets the operator reads but does not own ----------------------------------------------

#: The label an admin Secret must carry before the operator reads its data. Without it, a
#: ResultStore could name *any* Secret of its namespace as `adminSecretRef` and have the
#: operator send that Secret's values to a host of its choosing.
# ADMIN_CREDENTIALS_LABEL (imported above from api.py)


#: Server-side label selector of the operator's Secret watch (the stock-mode rollout): only
#: the binding Secrets it wrote are sent, so no other Secret's data - an admin Secret that
#: did not opt in, anybody's TLS keys - ever reaches the operator process through a watch.
SECRET_WATCH_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"


def admin_secret_opted_in(obj: Mapping[str, Any] | None) -> bool:
    """True when the Secret (or its metadata only) carries the opt-in label set to "true"."""
    labels = ((obj or {}).get("metadata") or {}).get("labels") or {}
    return str(labels.get(ADMIN_CREDENTIALS_LABEL, "")).strip().lower() == "true"


def same_object(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Both reads saw the same object (same uid): nothing replaced it in between."""
    uid_a = ((a or {}).get("metadata") or {}).get("uid")
    uid_b = ((b or {}).get("metadata") or {}).get("uid")
    return bool(uid_a) and uid_a == uid_b


def certificates_only(pem: str) -> str | None:
    """The X.509 certificates in `pem`, re-encoded; None when there are none.

    caSecretRef may name any key of any Secret, and the CA ends up in the binding Secret
    that workers (and whoever may read it) see. Re-encoding only parsed certificates means
    a private key, a password or any other value never travels that way; certificates are
    public by nature.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        return None
    if not certs:
        return None
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)
