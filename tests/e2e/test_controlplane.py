"""Proof that the e2e cluster is a real one: CRDs, controllers, garbage collection, webhooks.

These are the behaviours the operator and the injection webhook depend on, so they are
checked here once, directly, before any product test relies on them.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from resultstore_devtools.controlplane import ControlPlane, ExistingCluster
from resultstore_devtools.pki import loopback_server_pair
from tests.helpers.waiting import eventually


def meta(obj: Any) -> client.V1ObjectMeta:
    """Typed access to ``.metadata`` (always set on objects the API server returns)."""
    metadata = obj.metadata
    assert isinstance(metadata, client.V1ObjectMeta)
    return metadata


def name_of(obj: Any) -> str:
    name = meta(obj).name
    assert name is not None
    return name


def labels_of(obj: Any) -> dict[str, str]:
    return dict(meta(obj).labels or {})


def gone(read: Callable[[], object]) -> bool:
    try:
        read()
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


def test_version_is_stamped(kube: ControlPlane | ExistingCluster,
                            api_client: client.ApiClient) -> None:
    """Helm's kubeVersion checks need a real version, not v0.0.0-master."""
    info = client.VersionApi(api_client).get_code()
    assert info.git_version.startswith("v1."), info.git_version
    assert int(info.major) == 1 and int(info.minor.rstrip("+")) >= 28


# --------------------------------------------------------------------------------------------
# CRD + custom object + CronJob -> Job + garbage collection
# --------------------------------------------------------------------------------------------


@pytest.fixture
def widget_crd(api_client: client.ApiClient) -> Iterator[tuple[str, str]]:
    """A uniquely named, structurally validated CRD (cluster-scoped, so deleted afterwards)."""
    ext = client.ApiextensionsV1Api(api_client)
    group = f"t{uuid.uuid4().hex[:8]}.e2e.resultstore.dev"
    name = f"widgets.{group}"
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "required": ["size"],
                "properties": {"size": {"type": "integer", "minimum": 1}},
            }
        },
    }
    body: Any = {  # the client accepts plain manifests, as kubectl would
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": name},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{"name": "v1", "served": True, "storage": True,
                          "schema": {"openAPIV3Schema": schema}}],
        },
    }
    ext.create_custom_resource_definition(body)

    def established() -> bool:
        status = ext.read_custom_resource_definition(name).status
        return status is not None and any(
            c.type == "Established" and c.status == "True" for c in (status.conditions or []))

    try:
        eventually(established, 30, f"CRD {name} to be established")
        yield group, name
    finally:
        ext.delete_custom_resource_definition(name)


def test_crd_cronjob_and_garbage_collection(
    api_client: client.ApiClient, namespace: str, widget_crd: tuple[str, str]
) -> None:
    batch = client.BatchV1Api(api_client)
    core = client.CoreV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    group, _ = widget_crd

    # The cronjob controller only fires on a minute boundary: create the CronJob first and
    # let the clock run while the CRD and garbage-collection checks happen.
    pod_spec = client.V1PodSpec(
        restart_policy="Never",
        containers=[client.V1Container(name="tick", image="busybox:1.36", command=["true"])],
    )
    cronjob = batch.create_namespaced_cron_job(namespace, client.V1CronJob(
        metadata=client.V1ObjectMeta(name="tick"),
        spec=client.V1CronJobSpec(
            schedule="* * * * *",
            job_template=client.V1JobTemplateSpec(spec=client.V1JobSpec(
                template=client.V1PodTemplateSpec(spec=pod_spec))),
        ),
    ))

    # Custom object: structural schema validation is enforced by the real API server.
    with pytest.raises(ApiException) as rejected:
        custom.create_namespaced_custom_object(group, "v1", namespace, "widgets", {
            "apiVersion": f"{group}/v1", "kind": "Widget",
            "metadata": {"name": "bad"}, "spec": {"size": 0},
        })
    assert rejected.value.status == 422
    owner = cast(dict[str, Any], custom.create_namespaced_custom_object(
        group, "v1", namespace, "widgets", {
            "apiVersion": f"{group}/v1", "kind": "Widget",
            "metadata": {"name": "owner"}, "spec": {"size": 3},
        }))
    assert owner["spec"]["size"] == 3

    # A dependent owned by the custom object, as the operator's Secret is owned by a
    # ResultStore: deleting the owner must make the garbage collector delete it.
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="dependent", owner_references=[
            client.V1OwnerReference(api_version=f"{group}/v1", kind="Widget", name="owner",
                                    uid=owner["metadata"]["uid"])]),
        data={"k": "v"},
    ))
    custom.delete_namespaced_custom_object(group, "v1", namespace, "widgets", "owner")
    eventually(lambda: gone(lambda: core.read_namespaced_config_map("dependent", namespace)),
               90, "the garbage collector to delete the Widget's dependent ConfigMap")

    # The controller-manager turned the CronJob into a Job it controls.
    def controlled_job() -> client.V1Job | None:
        for job in batch.list_namespaced_job(namespace).items:
            for ref in meta(job).owner_references or []:
                if ref.kind == "CronJob" and ref.uid == meta(cronjob).uid and ref.controller:
                    return job
        return None

    job = eventually(controlled_job, 90, "the cronjob controller to create a Job", interval=1)
    assert name_of(job).startswith("tick-")
    status = batch.read_namespaced_cron_job("tick", namespace).status
    assert status is not None and status.last_schedule_time is not None

    # Deleting the owner CronJob: the garbage collector removes the Job it created.
    batch.delete_namespaced_cron_job("tick", namespace, propagation_policy="Background")
    eventually(lambda: gone(lambda: batch.read_namespaced_job(name_of(job), namespace)),
               60, "the garbage collector to delete the CronJob's Job")


# --------------------------------------------------------------------------------------------
# Mutating admission webhook served on 127.0.0.1
# --------------------------------------------------------------------------------------------

PATCH = [{"op": "add", "path": "/metadata/labels/mutated-by", "value": "e2e-webhook"}]


@dataclass
class WebhookServer:
    url: str
    ca_pem: bytes
    reviews: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def webhook_server(tmp_path: Path) -> Iterator[WebhookServer]:
    """An HTTPS admission webhook on 127.0.0.1 that adds a label with a JSONPatch."""
    pair = loopback_server_pair()
    cert, key = pair.write(tmp_path, "webhook")
    reviews: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server naming)
            review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            reviews.append(review)
            body = json.dumps({
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "response": {
                    "uid": review["request"]["uid"],
                    "allowed": True,
                    "patchType": "JSONPatch",
                    "patch": base64.b64encode(json.dumps(PATCH).encode()).decode(),
                },
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield WebhookServer(f"https://127.0.0.1:{server.server_address[1]}/mutate",
                            pair.ca_pem, reviews)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_mutating_webhook_on_loopback_is_called_and_patch_applied(
    kube: ControlPlane | ExistingCluster, api_client: client.ApiClient, namespace: str,
    webhook_server: WebhookServer,
) -> None:
    """The API server must call a webhook at https://127.0.0.1 and apply its JSONPatch.

    Against an existing cluster this needs an API server that can reach this host's
    loopback (e.g. a k3d/kind API server on the host network).
    """
    admission = client.AdmissionregistrationV1Api(api_client)
    core = client.CoreV1Api(api_client)
    config_name = f"e2e-{namespace}"
    admission.create_mutating_webhook_configuration(client.V1MutatingWebhookConfiguration(
        metadata=client.V1ObjectMeta(name=config_name),
        webhooks=[client.V1MutatingWebhook(
            name="label.e2e.resultstore.dev",
            client_config=client.AdmissionregistrationV1WebhookClientConfig(
                url=webhook_server.url,
                ca_bundle=base64.b64encode(webhook_server.ca_pem).decode(),
            ),
            rules=[client.V1RuleWithOperations(
                operations=["CREATE"], api_groups=[""], api_versions=["v1"],
                resources=["configmaps"], scope="Namespaced")],
            namespace_selector=client.V1LabelSelector(
                match_labels={"kubernetes.io/metadata.name": namespace}),
            object_selector=client.V1LabelSelector(match_labels={"e2e-mutate": "yes"}),
            side_effects="None",
            admission_review_versions=["v1"],
            failure_policy="Fail",
            timeout_seconds=5,
        )],
    ))
    try:
        attempt = iter(range(1000))

        def mutated_config_map() -> client.V1ConfigMap | None:
            # Webhook configurations reach the admission chain through an informer, so the
            # first creations right after registering may not be intercepted yet.
            created = core.create_namespaced_config_map(namespace, client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name=f"target-{next(attempt)}",
                                             labels={"e2e-mutate": "yes"}),
            ))
            return created if labels_of(created).get("mutated-by") == "e2e-webhook" else None

        created = eventually(mutated_config_map, 30, "the webhook's patch to be applied")
        stored = core.read_namespaced_config_map(name_of(created), namespace)
        assert labels_of(stored)["mutated-by"] == "e2e-webhook"

        request = webhook_server.reviews[-1]["request"]
        assert request["operation"] == "CREATE"
        assert request["kind"] == {"group": "", "version": "v1", "kind": "ConfigMap"}
        assert request["namespace"] == namespace
        assert request["object"]["metadata"]["name"] == name_of(created)
        if kube.local:
            assert request["userInfo"]["username"] == "resultstore-admin"

        # The object selector scopes the webhook: unlabelled objects are not sent to it.
        calls = len(webhook_server.reviews)
        plain = core.create_namespaced_config_map(namespace, client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="plain")))
        assert "mutated-by" not in labels_of(plain)
        assert len(webhook_server.reviews) == calls
    finally:
        admission.delete_mutating_webhook_configuration(config_name)
