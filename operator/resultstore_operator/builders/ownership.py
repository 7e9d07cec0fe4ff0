"""Owner references: the Secret and CronJob are owned by their ResultStore.

With `controller: true` and `blockOwnerDeletion: true` the garbage collector removes them
after the ResultStore's finalizer has run, and `kubectl` shows who manages them.
"""

from __future__ import annotations

from typing import Any

from ..spec import API_VERSION, KIND


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
