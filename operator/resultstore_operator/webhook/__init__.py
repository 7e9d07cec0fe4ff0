"""The pod-injection mutating admission webhook, served by the operator process over TLS.

Why we serve it ourselves (aiohttp, which Kopf already depends on) instead of Kopf's managed
admission: see configuration.py. One module per concern, as everywhere in the operator:

* pure: configuration.py (the MutatingWebhookConfiguration, reused by manifests/ and the
  chart), admission.py (what a genuine review looks like, the request, the answer, a
  store's readiness), events.py (when an Event is deserved, its body, the aggregator), and
  the patch itself in :mod:`resultstore_operator.injection`;
* I/O: server.py (the HTTPS endpoint) and runtime.py (certificates, configuration,
  resync, shutdown, through the one client :class:`resultstore_operator.kube.Kube`);
* settings: :class:`resultstore_operator.settings.WebhookSettings`, parsed once with the
  operator's settings (`OperatorSettings.webhook`);
* wiring: :func:`register` adds a Kopf startup/cleanup/probe handler to a registry so the
  webhook runs inside ``resultstore-operator``.

The webhook never refuses a pod: every failure path answers ``allowed: true`` without a patch,
with an admission warning and (when the user must act) an Event.

The names below are the package's public surface (tests, manifests' generator, the chart's
unit test use them).
"""

from __future__ import annotations

from ..api import GROUP, PLURAL, VERSION
from ..settings import (
    ALWAYS_EXCLUDED,
    DEFAULT_WEBHOOK_CONFIG_NAME,
    DEFAULT_WEBHOOK_SERVICE,
    DEFAULT_WEBHOOK_TLS_SECRET,
    WEBHOOK_COMPONENT,
    WEBHOOK_PATH,
    ServiceRef,
    SettingsError,
    WebhookSettings,
)
from .admission import (
    AdmissionRequest,
    pod_description,
    review_problem,
    review_response,
    store_lookup_from_object,
)
from .configuration import (
    WEBHOOK_NAME,
    apply_configuration,
    build_webhook_configuration,
    configuration_for,
    configuration_matches,
    serving_names,
)
from .events import EventAggregator, build_event, event_reason_for
from .runtime import WebhookRuntime, WebhookService, run_webhook
from .server import HEALTH_PATH, InjectionServer, server_ssl_context

#: A malformed RESULTSTORE_WEBHOOK_* variable is a malformed operator setting.
WebhookSettingsError = SettingsError

__all__ = [
    "ALWAYS_EXCLUDED", "DEFAULT_WEBHOOK_CONFIG_NAME", "DEFAULT_WEBHOOK_SERVICE",
    "DEFAULT_WEBHOOK_TLS_SECRET", "GROUP", "HEALTH_PATH", "PLURAL", "VERSION",
    "WEBHOOK_COMPONENT", "WEBHOOK_NAME", "WEBHOOK_PATH", "AdmissionRequest", "EventAggregator",
    "InjectionServer", "ServiceRef", "WebhookRuntime", "WebhookService", "WebhookSettings",
    "WebhookSettingsError", "apply_configuration", "build_event", "build_webhook_configuration",
    "configuration_for", "configuration_matches", "event_reason_for", "pod_description",
    "review_problem", "review_response", "run_webhook", "server_ssl_context",
    "serving_names", "store_lookup_from_object",
]
