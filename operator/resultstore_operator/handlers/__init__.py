"""Kopf handlers: read the ResultStore, call the builders, apply; nothing else.

One idempotent `reconcile` converges everything a store needs (schema, roles, grants,
Secret, CronJob, rotation, status). Kopf calls it on create/resume/spec change/rotate
request; the controller's one periodic loop (not a Kopf timer per store) calls it again for
drift checks, rotation progress (draining) and retries with exponential backoff, from the
stores as the watch last showed them. A per-store asyncio lock serialises these callers, and
each reconcile re-reads the object from the API, so a decision is never taken on a stale
status (rotation state lives there and must be exact after a crash).

Blocking I/O (PostgreSQL, the Kubernetes client) runs in a bounded thread pool; the event
loop only schedules. Errors become conditions with distinct reasons and Warning Events, never
carrying a password; an invalid spec is a PermanentError until the spec changes.

The package, by noun: `controller` (locks, backoff, the periodic checks, the thread pool),
`reconcile` (the synchronous reconcile: inputs, database, CronJob, reporting),
`credentials` (observe -> builders.credentials.plan -> apply), `deletion` (the finalizer),
`run` (one reconcile's status and Events, and the `StoreApi` seam of the Kubernetes calls).
This module registers the handlers with Kopf.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from .. import metrics
from ..builders.ownership import SECRET_WATCH_SELECTOR
from ..settings import OperatorSettings
from ..spec import ANNOTATION_ROTATE, GROUP, PLURAL, VERSION
from .controller import Controller, ObjectState
from .run import StoreApi, StoreError

__all__ = ["FINALIZER", "Controller", "ObjectState", "StoreApi", "StoreError",
           "configure_kopf", "register"]

log = logging.getLogger("resultstore.operator")

FINALIZER = f"{GROUP}/finalizer"


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: OperatorSettings) -> None:
    """Our finalizer/annotation names, and Events only from explicit posts."""
    kopf_settings.persistence.finalizer = FINALIZER
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    kopf_settings.posting.level = logging.WARNING
    # The ResultStore CRD is installed before the operator (manifests/chart): no need to
    # watch CRDs, which would only need a cluster-wide RBAC grant for nothing.
    kopf_settings.scanning.disabled = True
    # Secrets are watched (rollout.py) with a server-side selector: only our own binding
    # Secrets reach this process, never the data of any other Secret of the namespace.
    selectors = getattr(kopf_settings.watching, "label_selectors", None)
    if selectors is not None:
        selectors[("v1", "secrets")] = SECRET_WATCH_SELECTOR
    else:  # kopf < 1.45: the watch filters client-side only
        log.warning("this kopf has no server-side label selectors: the Secret watch "
                    "receives every Secret of the watched namespaces")
    kopf_settings.execution.max_workers = settings.workers
    kopf_settings.networking.request_timeout = 60
def register(registry: kopf.OperatorRegistry, settings: OperatorSettings,
             controller: Controller | None = None) -> Controller:
    """Register the ResultStore handlers on `registry` with intervals from `settings`."""
    ctl = controller or Controller(settings)
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.startup(registry=registry, id="resultstore-configure")
    def _configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(settings, ctl.settings)
        # Load credentials now, so that a bad kubeconfig fails at start-up.
        log.debug("API client ready: %s", ctl.kube is not None)

    @kopf.on.login(registry=registry, id="resultstore-login")
    def _login(**kwargs: Any) -> Any:
        # A private registry has no default login handler: use the kubernetes client's
        # loading rules (in-cluster service account, else KUBECONFIG), like our own calls.
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry, id="resultstore-checks")
    async def _start_checks(**_: Any) -> None:
        # Kopf runs only on the replica that holds the Lease (main.py), and so does this
        # loop; a replica that loses the Lease ends its process (elector.py).
        ctl.start_checks()

    @kopf.on.cleanup(registry=registry, id="resultstore-cleanup")
    async def _cleanup(**_: Any) -> None:
        await ctl.stop_checks()
        ctl.executor.shutdown(wait=False, cancel_futures=True)

    @kopf.on.resume(*resource, registry=registry, id="resume")
    async def _resume(body: kopf.Body, **_: Any) -> None:
        await ctl.reconcile(body, "resume", "resume")

    @kopf.on.create(*resource, registry=registry, id="create")
    async def _create(body: kopf.Body, **_: Any) -> None:
        await ctl.reconcile(body, "create", "create")

    @kopf.on.update(*resource, registry=registry, id="spec", field="spec")
    async def _update(body: kopf.Body, **_: Any) -> None:
        await ctl.reconcile(body, "spec changed", "spec")

    @kopf.on.field(*resource, registry=registry, id="rotate",
                   field=("metadata", "annotations", ANNOTATION_ROTATE))
    async def _rotate(body: kopf.Body, new: Any, **_: Any) -> None:
        if new:
            await ctl.reconcile(body, "rotation requested", "rotate")

    @kopf.on.event(*resource, registry=registry, id="observe")
    async def _observe(body: kopf.Body, event: kopf.RawEvent, **_: Any) -> None:
        # Every watch event carries the whole object: the store gauges and the periodic
        # checks' view of the store follow the API.
        # Async: a few dict reads under a lock, not worth a thread hop per watch event
        # (a sync handler runs in Kopf's thread pool; at 1000 stores that was one hop for
        # every status patch).
        metrics.observe_store(body, event.get("type"))
        ctl.observe(body, event.get("type"))

    @kopf.on.delete(*resource, registry=registry, id="finalize")
    async def _delete(body: kopf.Body, retry: int, **_: Any) -> None:
        await ctl.finalize(body, retry)

    return ctl
