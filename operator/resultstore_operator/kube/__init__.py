"""The operator's one Kubernetes client, its error family and the typed views it offers.

Everything that talks to the API server (handlers, the webhook, the rollout, the webhook's
TLS keeper) goes through :class:`Kube`; everything that can go wrong there is a
:class:`KubeError` (:class:`NotFound`, :class:`Conflict`, :class:`Forbidden`,
:class:`Unavailable`, and :class:`NotOwnedError` for an object of our name that is not ours).
The API's constants are in :mod:`resultstore_operator.api` and the typed views in
:mod:`resultstore_operator.views` (pure modules the builders may import too); both are
re-exported here for the callers of the client.
"""

from __future__ import annotations

from ..api import FIELD_MANAGER, METADATA_ONLY
from ..views import ObjectMeta, condition, conditions, meta, pod_template, section
from .client import REQUEST_TIMEOUT, WORKLOAD_CLIENT_NAMES, Kube, new_api_client
from .errors import (
    Conflict,
    Forbidden,
    KubeError,
    NotFound,
    NotOwnedError,
    Unavailable,
    api_errors,
    from_api_exception,
)

__all__ = [
    "FIELD_MANAGER", "METADATA_ONLY", "REQUEST_TIMEOUT", "WORKLOAD_CLIENT_NAMES",
    "Conflict", "Forbidden", "Kube", "KubeError", "NotFound", "NotOwnedError", "ObjectMeta",
    "Unavailable", "api_errors", "condition", "conditions", "from_api_exception", "meta",
    "new_api_client", "pod_template", "section",
]
