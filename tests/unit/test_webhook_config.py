"""The MutatingWebhookConfiguration builder, settings parsing and the pure admission helpers."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Mapping
from typing import Any, cast

import pytest

from resultstore_operator.injection import INJECT_LABEL, InjectionPlan, StoreLookup, StoreState
from resultstore_operator.kube import Conflict, Kube
from resultstore_operator.webhook import (
    AdmissionRequest,
    ServiceRef,
    WebhookSettings,
    WebhookSettingsError,
    apply_configuration,
    build_event,
    build_webhook_configuration,
    configuration_for,
    configuration_matches,
    event_reason_for,
    pod_description,
    review_response,
    serving_names,
    store_lookup_from_object,
)


@pytest.mark.parametrize("client", ["url", "service"])
def test_configuration_properties(client: str) -> None:
    kwargs: dict[str, Any] = (
        {"url": "https://127.0.0.1:9443/mutate-pods"} if client == "url"
        else {"service": ServiceRef("resultstore-system")}
    )
    body = build_webhook_configuration(operator_namespace="resultstore-system",
                                       ca_bundle="Q0E=", **kwargs)
    assert body["apiVersion"] == "admissionregistration.k8s.io/v1"
    assert body["kind"] == "MutatingWebhookConfiguration"
    [hook] = body["webhooks"]
    assert hook["failurePolicy"] == "Ignore"
    assert hook["sideEffects"] == "None"
    assert hook["timeoutSeconds"] == 5
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["objectSelector"] == {
        "matchExpressions": [{"key": INJECT_LABEL, "operator": "Exists"}]}
    assert hook["namespaceSelector"] == {"matchExpressions": [{
        "key": "kubernetes.io/metadata.name", "operator": "NotIn",
        "values": ["kube-system", "resultstore-system"]}]}
    assert hook["rules"] == [{"apiGroups": [""], "apiVersions": ["v1"],
                              "operations": ["CREATE"], "resources": ["pods"],
                              "scope": "Namespaced"}]
    assert hook["clientConfig"]["caBundle"] == "Q0E="
    if client == "url":
        assert hook["clientConfig"]["url"] == "https://127.0.0.1:9443/mutate-pods"
    else:
        assert hook["clientConfig"]["service"] == {
            "namespace": "resultstore-system", "name": "resultstore-webhook",
            "port": 443, "path": "/mutate-pods"}


def test_configuration_for_cert_manager_has_no_bundle_but_annotation() -> None:
    body = build_webhook_configuration(
        operator_namespace="ops", service=ServiceRef("ops"), excluded_namespaces=["kube-public"],
        annotations={"cert-manager.io/inject-ca-from": "ops/resultstore-webhook"})
    hook = body["webhooks"][0]
    assert "caBundle" not in hook["clientConfig"]
    assert body["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": "ops/resultstore-webhook"}
    assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == [
        "kube-public", "kube-system", "ops"]


def test_configuration_needs_exactly_one_client() -> None:
    with pytest.raises(ValueError):
        build_webhook_configuration(operator_namespace="x")
    with pytest.raises(ValueError):
        build_webhook_configuration(operator_namespace="x", url="https://a",
                                    service=ServiceRef("x"))


def test_configuration_matches_ignores_server_defaults() -> None:
    body = build_webhook_configuration(operator_namespace="o", url="https://127.0.0.1:1/m",
                                       ca_bundle="QQ==")
    stored = json.loads(json.dumps(body))
    stored["metadata"]["resourceVersion"] = "7"
    stored["webhooks"][0]["objectSelector"]["matchLabels"] = None
    assert configuration_matches(stored, body)
    stored["webhooks"][0]["failurePolicy"] = "Fail"
    assert not configuration_matches(stored, body)


def test_settings_from_env() -> None:
    s = WebhookSettings.from_env({
        "RESULTSTORE_WEBHOOK_URL": "https://127.0.0.1:18443/mutate-pods",
        "RESULTSTORE_WEBHOOK_PORT": "18443",
        "RESULTSTORE_WEBHOOK_HOST": "127.0.0.1",
        "RESULTSTORE_WEBHOOK_EXCLUDED_NAMESPACES": "a, b",
    }, "ops")
    assert s.listen_port == 18443 and s.service_ref() is None
    assert serving_names(s).ips == ("127.0.0.1",)
    assert s.excluded == frozenset({"kube-system", "ops", "a", "b"})
    hook = configuration_for(s, "QQ==")["webhooks"][0]
    assert hook["clientConfig"]["url"] == "https://127.0.0.1:18443/mutate-pods"
    d = WebhookSettings.from_env({}, "ops")
    assert d.service_ref() == ServiceRef("ops")
    assert "resultstore-webhook.ops.svc" in serving_names(d).dns
    assert d.timeout_seconds == 5 and d.lookup_timeout < d.timeout_seconds


@pytest.mark.parametrize("env", [
    {"RESULTSTORE_WEBHOOK_URL": "http://127.0.0.1/x"},
    {"RESULTSTORE_WEBHOOK_CERT_FILE": "/tls.crt"},
    {"RESULTSTORE_WEBHOOK_TIMEOUT_SECONDS": "31"},
    {"RESULTSTORE_WEBHOOK_ENABLED": "maybe"},
])
def test_settings_reject_bad_values(env: dict[str, str]) -> None:
    with pytest.raises(WebhookSettingsError):
        WebhookSettings.from_env(env, "ops")


def test_admission_request_from_controller_pod() -> None:
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u1", "namespace": "team", "operation": "CREATE",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "object": {"metadata": {"generateName": "job-"}}, "dryRun": True}}
    req = AdmissionRequest.from_review(review)
    assert (req.uid, req.namespace, req.kind, req.dry_run) == ("u1", "team", "Pod", True)
    with pytest.raises(ValueError):
        AdmissionRequest.from_review({"request": {}})


def test_review_response_always_allows() -> None:
    patch = [{"op": "add", "path": "/spec/volumes", "value": []}]
    out = review_response("u", InjectionPlan(store="s", patch=patch, warnings=("a\nb",)))
    r = out["response"]
    assert r["allowed"] is True and r["uid"] == "u" and r["patchType"] == "JSONPatch"
    assert json.loads(base64.b64decode(r["patch"])) == patch
    assert r["warnings"] == ["resultstore: a b"]
    empty = review_response("u", InjectionPlan(store=None))["response"]
    assert empty == {"uid": "u", "allowed": True}


@pytest.mark.parametrize("obj,state", [
    (None, StoreState.MISSING),
    ({"metadata": {}}, StoreState.NOT_READY),
    ({"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "X"}]}},
     StoreState.NOT_READY),
    ({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}, StoreState.READY),
    ({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"},
      "status": {"conditions": [{"type": "Ready", "status": "True"}]}}, StoreState.NOT_READY),
])
def test_store_lookup_from_object(obj: dict[str, Any] | None, state: StoreState) -> None:
    assert store_lookup_from_object(obj).state is state


def test_event_is_about_the_store_and_names_the_pod_in_its_message() -> None:
    owned = {"metadata": {"generateName": "job-", "ownerReferences": [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "job", "uid": "U", "controller": True}]}}
    assert pod_description(owned) == "a pod of Job job"
    assert pod_description({"metadata": {"name": "p"}}) == "pod p"
    assert pod_description({"metadata": {"generateName": "web-"}}) == "pod web-*"


@pytest.mark.parametrize("metadata", [
    {"name": "Call 555-0100 to unlock your pods"},
    {"generateName": "see https://evil.example/ "},
    {"ownerReferences": [{"kind": "Deployment", "name": "x y", "controller": True}]},
    {"ownerReferences": [{"kind": "Please run: kubectl", "name": "x", "controller": True}]},
])
def test_pod_description_quotes_only_kubernetes_names(metadata: dict[str, Any]) -> None:
    """The description goes into an Event: text that no API server would send is dropped."""
    text = pod_description({"metadata": metadata})
    assert text == "a pod", text
    ev = build_event("team", "orders", "ResultStoreNotReady", "a pod of Job job admitted",
                     count=3, now=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
                     instance="resultstore-webhook")
    assert ev["type"] == "Warning" and ev["reason"] == "ResultStoreNotReady"
    assert ev["involvedObject"] == {"apiVersion": "resultstore.dev/v1alpha1",
                                    "kind": "ResultStore", "name": "orders",
                                    "namespace": "team"}
    assert ev["metadata"]["namespace"] == "team"
    assert ev["metadata"]["name"].startswith("orders.")
    assert ev["firstTimestamp"] == ev["lastTimestamp"] == "2026-01-02T03:04:05Z"
    assert ev["count"] == 3
    assert ev["reportingInstance"] == "resultstore-webhook"
    named = build_event("team", "orders", "ResultStoreNotReady", "m", instance="op-7f9c",
                        now=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    assert named["reportingInstance"] == "op-7f9c"


def test_reporting_instance_is_read_once_into_the_settings() -> None:
    from resultstore_operator.webhook import WebhookSettings

    assert WebhookSettings.from_env({"HOSTNAME": "op-7f9c"}, "ns").instance == "op-7f9c"
    assert WebhookSettings.from_env({}, "ns").instance == "resultstore-webhook"
    from resultstore_operator.settings import OperatorSettings

    op = OperatorSettings.from_env({"HOSTNAME": "op-7f9c", "PATH": "/bin"})
    assert op.webhook.instance == "op-7f9c"  # the webhook's part, parsed with the rest


GENUINE = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
    "uid": "0d6f8a52-6d1c-4f38-9a43-111111111111", "namespace": "team",
    "operation": "CREATE", "dryRun": False,
    "kind": {"group": "", "version": "v1", "kind": "Pod"},
    "resource": {"group": "", "version": "v1", "resource": "pods"},
    "userInfo": {"username": "alice"},
    "object": {"metadata": {"labels": {INJECT_LABEL: "s"}}}}}


@pytest.mark.parametrize(("state", "dry_run", "genuine", "reason"), [
    (StoreState.NOT_READY, False, True, "ResultStoreNotReady"),
    (StoreState.READY, False, True, "InjectionConflict"),
    (StoreState.MISSING, False, True, None),   # no Event about a store that is not there
    (StoreState.UNKNOWN, False, True, None),   # nor when the lookup could not tell
    (StoreState.NOT_READY, True, True, None),  # nor on a dry run
    (StoreState.NOT_READY, False, False, None),  # nor for a review the API server never sent
])
def test_event_only_for_an_existing_store_of_a_genuine_review(
        state: StoreState, dry_run: bool, genuine: bool, reason: str | None) -> None:
    body = json.loads(json.dumps(GENUINE))
    body["request"]["dryRun"] = dry_run
    if not genuine:
        del body["request"]["userInfo"]
    admission = AdmissionRequest.from_review(body)
    event = {StoreState.READY: "InjectionConflict"}.get(state, "ResultStore" + {
        StoreState.NOT_READY: "NotReady", StoreState.MISSING: "NotFound",
        StoreState.UNKNOWN: "Unknown"}.get(state, ""))
    plan = InjectionPlan(store="s", warnings=("w",), event_reason=event)
    assert event_reason_for(admission, plan, StoreLookup(state)) == reason
    assert event_reason_for(admission, InjectionPlan(store="s"), StoreLookup(state)) is None


class _RacingConfigurations:
    """The client's MutatingWebhookConfiguration calls, in memory, with one concurrent
    writer: the first write of ours loses with a Conflict (as the API server answers a
    stale resourceVersion or an AlreadyExists)."""

    def __init__(self, stored: dict[str, Any] | None) -> None:
        self.stored = stored
        self.writes: list[str] = []
        self.race = True

    def read_webhook_configuration(self, name: str) -> dict[str, Any] | None:
        return json.loads(json.dumps(self.stored)) if self.stored else None

    def _lose_once(self, what: str) -> None:
        if self.race:
            self.race = False
            self.stored = {"metadata": {"name": "resultstore-injector", "resourceVersion": "9",
                                        "labels": {"helm": "x"}},
                           "webhooks": [{"name": "someone-else"}]}
            raise Conflict(f"{what}: API answered 409 Conflict", 409)

    def create_webhook_configuration(self, body: Mapping[str, Any]) -> None:
        self._lose_once("create")
        self.writes.append("create")
        self.stored = json.loads(json.dumps(body))

    def patch_webhook_configuration(self, name: str, patch: Mapping[str, Any]) -> None:
        self._lose_once("patch")
        assert self.stored is not None
        assert patch["metadata"]["resourceVersion"] == self.stored["metadata"]["resourceVersion"]
        self.writes.append("patch")
        self.stored["webhooks"] = patch["webhooks"]
        self.stored["metadata"]["labels"].update(patch["metadata"]["labels"])


@pytest.mark.parametrize("existing", [False, True])
def test_apply_configuration_rereads_after_a_conflict_and_keeps_others_labels(
        existing: bool) -> None:
    body = build_webhook_configuration(operator_namespace="o", url="https://127.0.0.1:1/m",
                                       ca_bundle="QQ==")
    stored = None
    if existing:
        stored = {"metadata": {"name": "resultstore-injector", "resourceVersion": "3",
                               "labels": {}}, "webhooks": []}
    api = _RacingConfigurations(stored)
    assert apply_configuration(cast(Kube, api), body) is True
    assert api.writes == ["patch"], "after losing the race the winner's object is patched"
    assert api.stored is not None and configuration_matches(api.stored, body)
    assert api.stored["metadata"]["labels"]["helm"] == "x"  # another writer's label kept
    assert apply_configuration(cast(Kube, api), body) is False  # in place: no write
    assert api.writes == ["patch"]
