"""The HTTPS admission endpoint: parse the review, look the store up, plan, answer.

The webhook never refuses a pod: every failure path (a malformed review aside, which gets a
400) answers ``allowed: true`` without a patch, with an admission warning and, when the user
must act, an aggregated Event (events.py). The lookup and the Event writes are functions
passed in (the runtime binds them to the Kubernetes client), so the server is tested on
loopback without an API server.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .. import metrics
from ..injection import InjectionPlan, StoreLookup, StoreState, plan_injection, requested_store
from ..settings import WEBHOOK_PATH, WebhookSettings
from .admission import AdmissionRequest, pod_description, pod_display, review_response
from .events import EventAggregator, UpdateFn, event_reason_for

log = logging.getLogger("resultstore.webhook")

HEALTH_PATH = "/healthz"
#: Largest review body accepted (a pod with many containers stays far below).
MAX_REVIEW_BYTES = 4 * 1024 * 1024

LookupFn = Callable[[str, str], Awaitable[StoreLookup]]
EmitFn = Callable[[Mapping[str, Any]], Awaitable[None]]


@dataclass
class InjectionServer:
    """The admission endpoint. Stateless apart from the Event aggregates (bounded).

    ``emit`` creates an Event, ``update`` (optional) raises an existing one's count.
    """

    settings: WebhookSettings
    lookup: LookupFn
    emit: EmitFn
    update: UpdateFn | None = None
    _runner: web.AppRunner | None = None
    events: EventAggregator = field(init=False)

    def __post_init__(self) -> None:
        self.events = EventAggregator(self.emit, self.update,
                                      self.settings.event_dedup_seconds,
                                      self.settings.event_cache_size,
                                      instance=self.settings.instance)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REVIEW_BYTES)
        app.router.add_post(WEBHOOK_PATH, self.handle_mutate)
        app.router.add_get(HEALTH_PATH, self.handle_health)
        return app

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def handle_mutate(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        try:
            review = await request.json()
            admission = AdmissionRequest.from_review(review)
        except (ValueError, UnicodeDecodeError) as exc:
            metrics.record_admission(metrics.ERROR, time.monotonic() - started)
            return web.Response(status=400, text=f"bad AdmissionReview: {exc}")
        try:
            plan = await self.admit(admission)
            outcome = metrics.MUTATED if plan.patch else metrics.UNCHANGED
        except Exception:  # never refuse: a bug here must not block pod creation
            log.exception("admission of a pod in %s failed; admitted unchanged",
                          admission.namespace)
            plan = InjectionPlan(store=None, warnings=("internal error; admitted unchanged",))
            outcome = metrics.ERROR
        response = web.json_response(review_response(admission.uid, plan))
        metrics.record_admission(outcome, time.monotonic() - started)
        return response

    async def _lookup(self, namespace: str, name: str) -> StoreLookup:
        """The store's state, or UNKNOWN with the reason: the webhook fails open."""
        try:
            return await asyncio.wait_for(self.lookup(namespace, name),
                                          self.settings.lookup_timeout)
        except TimeoutError:
            return StoreLookup(StoreState.UNKNOWN, "API lookup timed out")
        except Exception as exc:  # API down, RBAC, ...: fail open, say why
            return StoreLookup(StoreState.UNKNOWN, type(exc).__name__)

    async def admit(self, admission: AdmissionRequest) -> InjectionPlan:
        if admission.problem is not None:
            # Not what the API server sends: answered, never mutated, no lookup, no Event.
            log.debug("review %s ignored: %s", admission.uid[:40], admission.problem)
            return InjectionPlan(store=None)
        if (admission.kind != "Pod" or admission.operation != "CREATE"
                or admission.namespace in self.settings.excluded):
            return InjectionPlan(store=None)
        store = requested_store(admission.pod)
        if store is None:
            return InjectionPlan(store=None)
        lookup = StoreLookup(StoreState.UNKNOWN, "invalid name")
        if store.valid:
            lookup = await self._lookup(admission.namespace, store.name)
        plan = plan_injection(admission.pod, lookup)
        pod_name = pod_display(admission.pod)
        if plan.patch:
            log.info("injected ResultStore %s into pod %s/%s", plan.store, admission.namespace,
                     pod_name)
        elif plan.warnings:
            log.info("pod %s/%s admitted without injection: %s", admission.namespace, pod_name,
                     "; ".join(plan.warnings))
        reason = event_reason_for(admission, plan, lookup)
        if reason is not None and plan.store is not None:
            message = (f"{pod_description(admission.pod)} admitted without injection: "
                       + "; ".join(plan.warnings))
            self.events.record(admission.namespace, plan.store, reason, message)
        return plan

    async def start(self, ssl_context: ssl.SSLContext) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.listen_host, self.settings.listen_port,
                           ssl_context=ssl_context, reuse_address=True)
        await site.start()
        log.info("webhook serving on https://%s:%d%s", self.settings.listen_host,
                 self.settings.listen_port, WEBHOOK_PATH)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.events.stop()


def server_ssl_context(cert_file: str, key_file: str,
                       client_ca_file: str | None = None) -> ssl.SSLContext:
    """TLS 1.2+ with our serving pair; with `client_ca_file`, mutual TLS: only a caller
    holding a certificate from that CA (the API server, configured through its
    AdmissionConfiguration kubeConfigFile) completes the handshake."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        context.load_verify_locations(cafile=client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
