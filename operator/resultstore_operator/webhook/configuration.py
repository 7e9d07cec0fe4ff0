"""The MutatingWebhookConfiguration: built from the settings (pure), applied through `Kube`.

Why exact properties, and why we apply it ourselves instead of Kopf's managed admission:
failurePolicy Ignore, an objectSelector on the inject label, a namespaceSelector excluding
kube-system and the operator's namespace, a 5 s timeout, reinvocation, and a caBundle that
survives restarts; Kopf's managed mode fixes a 30 s timeout, no namespaceSelector and a
fresh CA per start. manifests/ and the chart ship the same body (unit tests compare them).
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from ..api import (
    INJECT_LABEL,
    LABEL_COMPONENT,
    LABEL_NAME,
    NAMESPACE_NAME_LABEL,
    WEBHOOK_CONFIGURATION_KIND,
    WEBHOOK_CONFIGURATION_VERSION,
)
from ..kube import Conflict, Kube, meta
from ..settings import (
    ALWAYS_EXCLUDED,
    DEFAULT_WEBHOOK_CONFIG_NAME,
    ServiceRef,
    WebhookSettings,
)
from ..webhook_tls import ServingNames, service_names

WEBHOOK_NAME = "inject.resultstore.dev"
#: Attempts of the read-compare-write cycle when another writer races us (409).
APPLY_ATTEMPTS = 5


def build_webhook_configuration(
    *,
    operator_namespace: str,
    name: str = DEFAULT_WEBHOOK_CONFIG_NAME,
    url: str | None = None,
    service: ServiceRef | None = None,
    ca_bundle: str | None = None,
    timeout_seconds: int = 5,
    excluded_namespaces: Sequence[str] = (),
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The MutatingWebhookConfiguration for pod injection.

    Exactly one of ``url`` (local control planes: ``https://127.0.0.1:PORT/mutate-pods``) and
    ``service`` (in-cluster). ``ca_bundle`` is the base64 CA PEM, or None when an injector
    fills it (cert-manager's ``cert-manager.io/inject-ca-from`` annotation, via
    ``annotations``). Why each property:

    * failurePolicy Ignore: a down webhook must never block pod creation (fail open);
    * objectSelector Exists on the label: the API server calls us only for opted-in pods;
    * namespaceSelector NotIn kube-system and the operator's namespace: system pods and the
      operator's own pod (which serves this webhook) are never subject to it;
    * sideEffects None: the only out-of-band write is an Event, skipped on dry-run requests;
    * reinvocationPolicy IfNeeded: if a later webhook adds containers, we are called again
      and inject them too (safe because the patch is idempotent).
    """
    if (url is None) == (service is None):
        raise ValueError("exactly one of url and service is required")
    client_config: dict[str, Any]
    if url is not None:
        client_config = {"url": url}
    else:
        assert service is not None
        client_config = {"service": {"namespace": service.namespace, "name": service.name,
                                     "port": service.port, "path": service.path}}
    if ca_bundle:
        client_config["caBundle"] = ca_bundle
    excluded = sorted({*ALWAYS_EXCLUDED, operator_namespace, *excluded_namespaces})
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {LABEL_NAME: "resultstore-operator",
                   LABEL_COMPONENT: "webhook", **(labels or {})},
    }
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {
        "apiVersion": WEBHOOK_CONFIGURATION_VERSION,
        "kind": WEBHOOK_CONFIGURATION_KIND,
        "metadata": metadata,
        "webhooks": [
            {
                "name": WEBHOOK_NAME,
                "admissionReviewVersions": ["v1"],
                "clientConfig": client_config,
                "rules": [{
                    "apiGroups": [""],
                    "apiVersions": ["v1"],
                    "operations": ["CREATE"],
                    "resources": ["pods"],
                    "scope": "Namespaced",
                }],
                "failurePolicy": "Ignore",
                "matchPolicy": "Equivalent",
                "sideEffects": "None",
                "timeoutSeconds": timeout_seconds,
                "reinvocationPolicy": "IfNeeded",
                "objectSelector": {
                    "matchExpressions": [{"key": INJECT_LABEL, "operator": "Exists"}],
                },
                "namespaceSelector": {
                    "matchExpressions": [{
                        "key": NAMESPACE_NAME_LABEL, "operator": "NotIn", "values": excluded,
                    }],
                },
            }
        ],
    }


def configuration_for(settings: WebhookSettings, ca_bundle: str | None) -> dict[str, Any]:
    """The configuration these settings describe, trusting `ca_bundle`."""
    return build_webhook_configuration(
        name=settings.config_name,
        operator_namespace=settings.operator_namespace,
        url=settings.url,
        service=settings.service_ref(),
        ca_bundle=ca_bundle,
        timeout_seconds=settings.timeout_seconds,
        excluded_namespaces=settings.excluded_namespaces,
    )


def serving_names(settings: WebhookSettings) -> ServingNames:
    """The names the serving certificate must cover for this clientConfig."""
    if settings.url is not None:
        host = urllib.parse.urlsplit(settings.url).hostname or ""
        try:
            ipaddress.ip_address(host)
            return ServingNames(ips=(host,))
        except ValueError:
            return ServingNames(dns=(host,))
    return ServingNames(dns=service_names(settings.service_name, settings.operator_namespace))


def configuration_matches(current: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether every field we set has our value (the server adds defaults of its own)."""

    def subset(want: Any, have: Any) -> bool:
        if isinstance(want, Mapping):
            return isinstance(have, Mapping) and all(
                subset(v, have.get(k)) for k, v in want.items())
        if isinstance(want, list):
            return (isinstance(have, list) and len(want) == len(have)
                    and all(subset(w, h) for w, h in zip(want, have, strict=True)))
        return bool(want == have)

    want, have = meta(desired), meta(current)
    return (subset(desired.get("webhooks"), current.get("webhooks"))
            and subset(dict(want.labels), dict(have.labels))
            and subset(dict(want.annotations), dict(have.annotations)))


def configuration_patch(current: Mapping[str, Any],
                        desired: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch taking `current` to `desired` (pure).

    A merge patch, not a replace: the ``webhooks`` list is ours and is replaced whole (a
    strategic merge would blend a stale ``url`` with a new ``service``), while labels and
    annotations others set (kubectl's last-applied, Helm's) are left alone. The
    resourceVersion makes a concurrent edit a Conflict.
    """
    want = meta(desired)
    patch: dict[str, Any] = {
        "metadata": {"labels": dict(want.labels),
                     "resourceVersion": meta(current).resource_version},
        "webhooks": desired["webhooks"]}
    if want.annotations:
        patch["metadata"]["annotations"] = dict(want.annotations)
    return patch


def apply_configuration(kube: Kube, body: Mapping[str, Any]) -> bool:
    """Make our fields of the configuration equal ``body``; True if anything changed."""
    name = meta(body).name
    for _ in range(APPLY_ATTEMPTS):
        current = kube.read_webhook_configuration(name)
        try:
            if current is None:
                kube.create_webhook_configuration(body)
                return True
            if configuration_matches(current, body):
                return False
            kube.patch_webhook_configuration(name, configuration_patch(current, body))
            return True
        except Conflict:
            continue  # created or edited meanwhile: read again
    raise RuntimeError(f"could not apply MutatingWebhookConfiguration {name}")
