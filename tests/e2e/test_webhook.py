"""The pod-injection webhook against a real API server, served by the real operator process.

``resultstore-operator`` runs here exactly as installed (console script, clusterwide): the
ResultStore controllers provision real stores on the session's PostgreSQL (schema, login role,
the ``<name>-resultstore`` Secret, Ready condition), and the webhook plug-in serves admission
over TLS from the CA it keeps in a Secret, registering its configuration in URL mode
(https://127.0.0.1:PORT). The stock-mode rollout plug-in runs in the same process.

No node runs while these tests do (the tests that need one run last, tests/e2e/conftest.py),
so pods are stored but never start. An injected worker pod really running, in both modes, is
test_realnode_workloads.py's (the worker image on the real node).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from resultstore_devtools.controlplane import ControlPlane, ExistingCluster
from resultstore_devtools.postgres import PostgresServer
from resultstore_devtools.procs import free_port, port_open
from resultstore_operator.builders.ownership import ADMIN_CREDENTIALS_LABEL
from resultstore_operator.crd import build_crd
from resultstore_operator.injection import (
    CONTAINERS_ANNOTATION,
    ENV_NAME,
    INJECT_LABEL,
    MODE_ANNOTATION,
    OVERRIDE_ENV_ANNOTATION,
    STATUS_ANNOTATION,
    backend_url,
    mount_path,
    secret_name,
    volume_name,
)
from resultstore_operator.rollout import HASH_ANNOTATION, ROLLOUT_LABEL, secret_hash
from resultstore_operator.spec import ANNOTATION_ROTATE as ROTATE_ANNOTATION
from resultstore_operator.webhook import GROUP, PLURAL, VERSION, WEBHOOK_PATH
from resultstore_operator.webhook_tls import TlsBundle
from tests.helpers.waiting import eventually

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
MERGE = "application/merge-patch+json"

OPERATOR = [str(REPO / ".venv" / "bin" / "resultstore-operator"), "--verbose"]
STORE_READY_TIMEOUT = 120


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# The operator process
# --------------------------------------------------------------------------------------------


@dataclass
class OperatorProcess:
    env: dict[str, str]
    port: int
    config_name: str
    namespace: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log_file = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            OPERATOR, env=self.env, cwd=REPO,
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        log_file.close()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def assert_alive(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, (
            f"operator process exited:\n{self.tail()}")


@dataclass
class WebhookEnv:
    """Everything a test needs: API clients, the operator process, a canary namespace."""

    api: client.ApiClient
    operator: OperatorProcess
    canary_namespace: str
    postgres: PostgresServer
    database: str
    # Any: the tests pass plain dict bodies, which the client accepts but its stubs do not.
    core: Any = field(init=False)
    custom: Any = field(init=False)
    admission: Any = field(init=False)

    def __post_init__(self) -> None:
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.admission = client.AdmissionregistrationV1Api(self.api)

    def to_dict(self, obj: Any) -> dict[str, Any]:
        out = self.api.sanitize_for_serialization(obj)
        assert isinstance(out, dict)
        return out

    def ca_bundle(self) -> str | None:
        try:
            cfg = self.admission.read_mutating_webhook_configuration(self.operator.config_name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        hooks = self.to_dict(cfg).get("webhooks") or []
        return hooks[0].get("clientConfig", {}).get("caBundle") if hooks else None

    def wait_serving(self, timeout: float = 90) -> None:
        """Port open, configuration registered, and the API server actually calling us."""
        def ready() -> bool:
            self.operator.assert_alive()
            return port_open(self.operator.port, "127.0.0.1") and bool(self.ca_bundle())

        eventually(ready, timeout, "the webhook to serve and register its configuration")

        # Webhook configurations reach the admission chain through an informer: probe with
        # server-side dry-run creations until one comes back mutated.
        def canary_injected() -> bool:
            self.operator.assert_alive()
            created = self.core.create_namespaced_pod(
                self.canary_namespace, pod_body("canary", "canary"), dry_run="All")
            return STATUS_ANNOTATION in (created.metadata.annotations or {})

        eventually(canary_injected, timeout, "the API server to call the webhook")

    def create_pod(self, namespace: str, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """Create a pod; return the stored object and the API's Warning header (if any)."""
        created, _, headers = self.core.create_namespaced_pod_with_http_info(namespace, body)
        return self.to_dict(created), str((headers or {}).get("Warning", ""))

    def read_pod(self, namespace: str, name: str) -> dict[str, Any]:
        return self.to_dict(self.core.read_namespaced_pod(name, namespace))


def wait_default_service_account(core: Any, namespace: str) -> None:
    """Pods are rejected until the ServiceAccount controller has created ``default``."""
    def exists() -> bool:
        try:
            core.read_namespaced_service_account("default", namespace)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    eventually(exists, 30, f"ServiceAccount default in {namespace}")


def ensure_crd(api: client.ApiClient) -> None:
    ext: Any = client.ApiextensionsV1Api(api)
    body = build_crd()
    try:  # another suite (or the chart) may have installed it already: leave it alone
        ext.read_custom_resource_definition(body["metadata"]["name"])
    except ApiException as exc:
        if exc.status != 404:
            raise
        try:
            ext.create_custom_resource_definition(body)
        except ApiException as exc2:
            if exc2.status != 409:
                raise

    def established() -> bool:
        crd = api.sanitize_for_serialization(
            ext.read_custom_resource_definition(body["metadata"]["name"]))
        return any(c["type"] == "Established" and c["status"] == "True"
                   for c in crd.get("status", {}).get("conditions") or [])

    eventually(established, 30, "the ResultStore CRD to be established")


def make_namespace(core: Any, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"resultstore.dev/e2e": "true"}}})
    wait_default_service_account(core, name)
    return name


@pytest.fixture(scope="module")
def webhook(kube: ControlPlane | ExistingCluster, api_client: client.ApiClient,
            postgres: PostgresServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebhookEnv]:
    core: Any = client.CoreV1Api(api_client)
    ensure_crd(api_client)
    operator_ns = make_namespace(core, "rs-operator")
    canary_ns = make_namespace(core, "rs-canary")
    database = f"wh_{uuid.uuid4().hex[:8]}"
    postgres.start()
    postgres.create_database(database)
    port = free_port()
    config_name = f"resultstore-injector-e2e-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ, **kube.env,
        "RESULTSTORE_OPERATOR_NAMESPACE": operator_ns,
        "RESULTSTORE_HEALTH_ADDRESS": f"127.0.0.1:{free_port()}",
        "RESULTSTORE_WEBHOOK_HOST": "127.0.0.1",
        "RESULTSTORE_WEBHOOK_PORT": str(port),
        "RESULTSTORE_WEBHOOK_URL": f"https://127.0.0.1:{port}{WEBHOOK_PATH}",
        "RESULTSTORE_WEBHOOK_CONFIG_NAME": config_name,
        "RESULTSTORE_WEBHOOK_EVENT_DEDUP_SECONDS": "0",
        # test_realnode_workloads.py's cleanup store asks for spec.cleanupJob.hostNetwork
        # (its Job reaches PostgreSQL on 127.0.0.1); off by default, refused without this.
        "RESULTSTORE_CLEANUP_ALLOW_HOST_NETWORK": "true",
    }
    operator = OperatorProcess(env, port, config_name, operator_ns,
                               tmp_path_factory.mktemp("operator") / "operator.log")
    wenv = WebhookEnv(api_client, operator, canary_ns, postgres, database)
    operator.start()
    try:
        make_ready_store(wenv, canary_ns, "canary")
        wenv.wait_serving()
        yield wenv
    finally:
        # Stores first (their finalizer needs the operator), then the operator itself.
        for ns in (operator_ns, canary_ns):
            with _ignore_404():
                core.delete_namespace(ns, propagation_policy="Background")
        operator.stop()
        print(f"--- operator log (tail) ---\n{operator.tail(80)}")
        with _ignore_404():
            wenv.admission.delete_mutating_webhook_configuration(config_name)


class _ignore_404:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return isinstance(exc, ApiException) and exc.status == 404


@pytest.fixture
def ns(webhook: WebhookEnv, namespace: str) -> str:
    wait_default_service_account(webhook.core, namespace)
    return namespace


# --------------------------------------------------------------------------------------------
# ResultStores, Secrets and pods
# --------------------------------------------------------------------------------------------


ADMIN_SECRET = "postgres-admin"


def ensure_admin_secret(wenv: WebhookEnv, namespace: str) -> None:
    """The admin credentials a ResultStore refers to (the session PostgreSQL's superuser)."""
    try:
        wenv.core.create_namespaced_secret(namespace, {
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": ADMIN_SECRET, "labels": {ADMIN_CREDENTIALS_LABEL: "true"}},
            "stringData": {"username": wenv.postgres.superuser,
                           "password": wenv.postgres.password}})
    except ApiException as exc:
        if exc.status != 409:
            raise


def make_store(wenv: WebhookEnv, namespace: str, name: str,
               admin_secret: str = ADMIN_SECRET,
               cleanup_job: dict[str, Any] | None = None) -> str:
    """Create a ResultStore on the session's PostgreSQL; return its schema."""
    ensure_admin_secret(wenv, namespace)
    schema = f"rs_{uuid.uuid4().hex[:10]}"
    spec: dict[str, Any] = {
        "database": {"host": wenv.postgres.host, "port": wenv.postgres.port,
                     "name": wenv.database, "sslMode": "disable",
                     "adminSecretRef": {"name": admin_secret}},
        "schema": schema,
        "credentials": {"drainTimeout": "5s"}}
    if cleanup_job is not None:
        spec["cleanupJob"] = cleanup_job
    wenv.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ResultStore",
        "metadata": {"name": name}, "spec": spec,
    })
    return schema


def ready_condition(wenv: WebhookEnv, namespace: str, name: str) -> dict[str, Any] | None:
    obj = wenv.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return dict(cond)
    return None


def wait_ready(wenv: WebhookEnv, namespace: str, name: str, want: str = "True") -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        wenv.operator.assert_alive()
        cond = ready_condition(wenv, namespace, name)
        return cond if cond is not None and cond.get("status") == want else None

    try:
        return eventually(probe, STORE_READY_TIMEOUT,
                          f"ResultStore {namespace}/{name} Ready={want}")
    except AssertionError:
        raise AssertionError(f"ResultStore {namespace}/{name} not Ready={want}: "
                             f"{ready_condition(wenv, namespace, name)}\n"
                             f"{wenv.operator.tail()}") from None


def make_ready_store(wenv: WebhookEnv, namespace: str, name: str,
                     cleanup_job: dict[str, Any] | None = None) -> str:
    """A ResultStore provisioned by the operator and Ready; return its schema."""
    schema = make_store(wenv, namespace, name, cleanup_job=cleanup_job)
    wait_ready(wenv, namespace, name)
    return schema


def pod_body(store: str | None, name: str | None = None, *,
             annotations: dict[str, str] | None = None,
             containers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"labels": {"app": "worker"}}
    if name:
        metadata["name"] = name
    else:
        metadata["generateName"] = "worker-"
    if store is not None:
        metadata["labels"][INJECT_LABEL] = store
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
        "spec": {"containers": containers or [
            {"name": "worker", "image": "example/worker:1", "command": ["celery", "worker"]},
            {"name": "exporter", "image": "example/exporter:1"},
        ]},
    }


def our_env(container: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in container.get("env") or [] if e["name"] == ENV_NAME]


def our_volumes(pod: dict[str, Any], store: str) -> list[dict[str, Any]]:
    return [v for v in pod["spec"].get("volumes") or [] if v["name"] == volume_name(store)]


def our_mounts(container: dict[str, Any], store: str) -> list[dict[str, Any]]:
    return [m for m in container.get("volumeMounts") or [] if m["name"] == volume_name(store)]


def assert_injected(pod: dict[str, Any], store: str, *, stock: bool = False,
                    containers: set[str] | None = None) -> None:
    assert our_volumes(pod, store) == [
        {"name": volume_name(store), "secret": {"secretName": secret_name(store),
                                                "defaultMode": 420}}]
    assert pod["metadata"]["annotations"][STATUS_ANNOTATION] == store
    for c in pod["spec"]["containers"]:
        if containers is not None and c["name"] not in containers:
            assert not our_mounts(c, store) and not our_env(c)
            continue
        assert our_mounts(c, store) == [{"name": volume_name(store),
                                         "mountPath": mount_path(store), "readOnly": True}]
        if stock:
            assert our_env(c) == [{"name": ENV_NAME, "valueFrom": {"secretKeyRef": {
                "name": secret_name(store), "key": "result_backend"}}}]
        else:
            assert our_env(c) == [{"name": ENV_NAME, "value": backend_url(store)}]


def assert_untouched(pod: dict[str, Any], store: str) -> None:
    assert not our_volumes(pod, store)
    assert STATUS_ANNOTATION not in (pod["metadata"].get("annotations") or {})
    for c in pod["spec"]["containers"]:
        assert not our_mounts(c, store) and not our_env(c)


def resubmittable(pod: dict[str, Any], name: str) -> dict[str, Any]:
    """The stored pod as a new creation request (server-owned fields dropped)."""
    body = json.loads(json.dumps(pod))
    body["metadata"] = {k: v for k, v in body["metadata"].items()
                        if k in ("labels", "annotations")}
    body["metadata"]["name"] = name
    body.pop("status", None)
    body["spec"].pop("nodeName", None)
    return body


def events_with_reason(wenv: WebhookEnv, namespace: str, reason: str) -> list[dict[str, Any]]:
    items = wenv.core.list_namespaced_event(namespace).items
    return [e for e in (wenv.to_dict(i) for i in items) if e.get("reason") == reason]


# --------------------------------------------------------------------------------------------
# The configuration the operator registers
# --------------------------------------------------------------------------------------------


def test_registered_configuration_has_the_required_properties(webhook: WebhookEnv) -> None:
    stored = webhook.to_dict(webhook.admission.read_mutating_webhook_configuration(
        webhook.operator.config_name))
    [hook] = stored["webhooks"]
    assert hook["name"] == "inject.resultstore.dev"
    assert hook["failurePolicy"] == "Ignore"
    assert hook["sideEffects"] == "None"
    assert hook["timeoutSeconds"] == 5
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["objectSelector"]["matchExpressions"] == [
        {"key": INJECT_LABEL, "operator": "Exists"}]
    assert hook["namespaceSelector"]["matchExpressions"] == [{
        "key": "kubernetes.io/metadata.name", "operator": "NotIn",
        "values": sorted(["kube-system", webhook.operator.namespace])}]
    assert hook["rules"][0]["operations"] == ["CREATE"]
    assert hook["rules"][0]["resources"] == ["pods"]
    assert hook["clientConfig"]["url"] == (
        f"https://127.0.0.1:{webhook.operator.port}{WEBHOOK_PATH}")
    tls = webhook.core.read_namespaced_secret("resultstore-webhook-tls",
                                              webhook.operator.namespace)
    bundle = TlsBundle.from_secret_data(tls.data)
    assert bundle is not None
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == bundle.ca_crt


# --------------------------------------------------------------------------------------------
# Injection of bare pods and controller-created pods
# --------------------------------------------------------------------------------------------


def test_bare_pod_is_injected_in_every_container(webhook: WebhookEnv, ns: str) -> None:
    make_ready_store(webhook, ns, "orders")
    created, _ = webhook.create_pod(ns, pod_body("orders", "bare"))
    stored = webhook.read_pod(ns, "bare")
    assert stored["spec"] == created["spec"]
    assert_injected(stored, "orders")
    # The ServiceAccount token volume the API server added is still there, next to ours.
    assert any(v["name"].startswith("kube-api-access") for v in stored["spec"]["volumes"])


def test_stock_mode_and_container_selection(webhook: WebhookEnv, ns: str) -> None:
    make_ready_store(webhook, ns, "orders")
    webhook.create_pod(ns, pod_body("orders", "stock", annotations={
        MODE_ANNOTATION: "stock", CONTAINERS_ANNOTATION: "worker"}))
    assert_injected(webhook.read_pod(ns, "stock"), "orders", stock=True, containers={"worker"})


def test_job_pods_are_injected(webhook: WebhookEnv, ns: str) -> None:
    """Pods a controller creates have no name at admission; the namespace is the request's."""
    make_ready_store(webhook, ns, "orders")
    batch: Any = client.BatchV1Api(webhook.api)
    template = pod_body("orders")
    template["metadata"].pop("generateName")
    template["spec"]["restartPolicy"] = "Never"
    batch.create_namespaced_job(ns, {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "migrate"},
        "spec": {"backoffLimit": 0, "template": {"metadata": template["metadata"],
                                                 "spec": template["spec"]}}})

    def job_pod() -> dict[str, Any] | None:
        pods = webhook.core.list_namespaced_pod(ns, label_selector="job-name=migrate").items
        return webhook.to_dict(pods[0]) if pods else None

    pod = eventually(job_pod, 60, "the Job controller to create its pod")
    assert pod["metadata"]["generateName"].startswith("migrate-")
    assert_injected(pod, "orders")


def test_applying_twice_changes_nothing(webhook: WebhookEnv, ns: str) -> None:
    """An already-injected pod spec submitted again comes back identical: no duplicates."""
    make_ready_store(webhook, ns, "orders")
    first, _ = webhook.create_pod(ns, pod_body("orders", "once"))
    again, warning = webhook.create_pod(ns, resubmittable(first, "twice"))
    assert warning == ""
    assert_injected(again, "orders")

    def strip(p: dict[str, Any]) -> list[dict[str, Any]]:  # the SA token volume is per pod
        return [v for v in p["spec"]["volumes"] if not v["name"].startswith("kube-api-access")]

    assert strip(again) == strip(first)
    for a, b in zip(again["spec"]["containers"], first["spec"]["containers"], strict=True):
        assert a["env"] == b["env"]
        assert our_mounts(a, "orders") == our_mounts(b, "orders")


def test_user_env_kept_unless_override(webhook: WebhookEnv, ns: str) -> None:
    make_ready_store(webhook, ns, "orders")
    mine = [{"name": "worker", "image": "w",
             "env": [{"name": ENV_NAME, "value": "redis://127.0.0.1:6379/1"}]}]
    kept, warning = webhook.create_pod(ns, pod_body("orders", "kept", containers=mine))
    assert our_env(kept["spec"]["containers"][0]) == mine[0]["env"]
    assert our_mounts(kept["spec"]["containers"][0], "orders")
    assert "resultstore:" in warning and OVERRIDE_ENV_ANNOTATION in warning
    replaced, _ = webhook.create_pod(ns, pod_body(
        "orders", "replaced", containers=mine, annotations={OVERRIDE_ENV_ANNOTATION: "true"}))
    assert our_env(replaced["spec"]["containers"][0]) == [
        {"name": ENV_NAME, "value": backend_url("orders")}]


# --------------------------------------------------------------------------------------------
# Never refusing: missing / not-Ready stores, excluded namespaces, unlabelled pods
# --------------------------------------------------------------------------------------------


def test_missing_or_unready_store_admits_unchanged_with_warning_and_event(
        webhook: WebhookEnv, ns: str) -> None:
    """Both admitted unchanged with a warning; an Event only about the store that exists
    (on the store itself), never about a name nobody created (issue 14)."""
    ghost, warning = webhook.create_pod(ns, pod_body("ghost", "ghost"))
    assert_untouched(ghost, "ghost")
    assert "ResultStore 'ghost' not found" in warning
    # A store the operator cannot provision (its admin Secret does not exist): not Ready.
    make_store(webhook, ns, "pending", admin_secret="no-such-secret")
    reason = wait_ready(webhook, ns, "pending", want="False")["reason"]
    for name in ("pending", "pending-2"):
        pending, warning = webhook.create_pod(ns, pod_body("pending", name))
        assert_untouched(pending, "pending")
        assert "is not Ready" in warning and reason in warning

    def aggregated() -> list[dict[str, Any]] | None:
        found = events_with_reason(webhook, ns, "ResultStoreNotReady")
        return found if found and found[0].get("count") == 2 else None

    [event] = eventually(aggregated, 30, "one Event ResultStoreNotReady with count 2")
    assert event["type"] == "Warning"
    assert event["involvedObject"]["kind"] == "ResultStore"
    assert event["involvedObject"]["name"] == "pending"
    assert "pod pending-2 admitted without injection" in event["message"]
    assert "password" not in event["message"].lower()
    # Events flow (above), and none was written about the store that does not exist.
    assert events_with_reason(webhook, ns, "ResultStoreNotFound") == []


def forged_review(namespace: str, store: str, **request: Any) -> dict[str, Any]:
    """An AdmissionReview as an attacker would send it straight to the webhook port: the
    API server's shape, a pod naming a store and an owner of the caller's choosing."""
    body: dict[str, Any] = {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": str(uuid.uuid4()), "namespace": namespace, "operation": "CREATE",
            "dryRun": False,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {
                "generateName": "payroll-", "labels": {INJECT_LABEL: store},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                     "name": "payroll-7d9f", "uid": str(uuid.uuid4()),
                                     "controller": True}]},
                "spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    body["request"].update(request)
    return body


def test_forged_reviews_do_not_flood_events(webhook: WebhookEnv, ns: str) -> None:
    """301 AdmissionReviews sent straight to the webhook port (not by the API server) about
    a victim namespace: answered (allowed, nothing to inject), and at most one Event results,
    on the one store that exists, whose count aggregates the repeats; none about the objects
    the caller named (issue 14)."""
    import http.client
    import ssl

    make_store(webhook, ns, "pending", admin_secret="no-such-secret")
    wait_ready(webhook, ns, "pending", want="False")
    tls = webhook.core.read_namespaced_secret("resultstore-webhook-tls",
                                              webhook.operator.namespace)
    bundle = TlsBundle.from_secret_data(tls.data)
    assert bundle is not None
    context = ssl.create_default_context(cadata=bundle.ca_crt.decode())
    reviews = [forged_review(ns, "ghost") for _ in range(100)]            # no such store
    reviews += [forged_review(ns, "pending") for _ in range(101)]         # exists, not Ready
    reviews += [forged_review(ns, "pending", userInfo=None) for _ in range(50)]
    reviews += [forged_review(ns, "pending", object={"metadata": {
        "namespace": "elsewhere", "labels": {INJECT_LABEL: "pending"}}}) for _ in range(50)]
    assert len(reviews) == 301
    connection = http.client.HTTPSConnection("127.0.0.1", webhook.operator.port,
                                             context=context, timeout=10)
    try:
        for body in reviews:
            connection.request("POST", WEBHOOK_PATH, json.dumps(body),
                               {"Content-Type": "application/json"})
            answer = json.loads(connection.getresponse().read())["response"]
            assert answer["allowed"] is True and "patch" not in answer, answer
    finally:
        connection.close()

    def webhook_events() -> list[dict[str, Any]]:
        items = [webhook.to_dict(e) for e in webhook.core.list_namespaced_event(ns).items]
        return [e for e in items if (e.get("source") or {}).get("component")
                == "resultstore-webhook"]

    def settled() -> list[dict[str, Any]] | None:
        found = webhook_events()
        return found if found and found[0].get("count") == 101 else None

    events = eventually(settled, 60, "the aggregate Event to count the 101 reviews")
    assert len(events) == 1, [(e["reason"], e["involvedObject"]) for e in events]
    [event] = events
    assert event["reason"] == "ResultStoreNotReady"
    assert event["involvedObject"]["kind"] == "ResultStore"
    assert event["involvedObject"]["name"] == "pending"
    assert "payroll" not in json.dumps(event["involvedObject"])


def test_unlabelled_and_excluded_namespaces_untouched(webhook: WebhookEnv, ns: str) -> None:
    make_ready_store(webhook, ns, "orders")
    plain, _ = webhook.create_pod(ns, pod_body(None, "plain"))
    assert_untouched(plain, "orders")
    assert plain["spec"]["containers"][0].get("env") is None
    for excluded in ("kube-system", webhook.operator.namespace):
        if excluded != "kube-system":
            make_ready_store(webhook, excluded, "orders")
        name = f"excluded-{uuid.uuid4().hex[:6]}"
        try:
            pod, warning = webhook.create_pod(excluded, pod_body("orders", name))
            assert_untouched(pod, "orders")
            assert warning == ""
        finally:
            webhook.core.delete_namespaced_pod(name, excluded, grace_period_seconds=0)
    # The same pod in an ordinary namespace is injected: the exclusions are what differ.
    control, _ = webhook.create_pod(ns, pod_body("orders", "control"))
    assert_injected(control, "orders")


# --------------------------------------------------------------------------------------------
# Stock-mode rollout on Secret rotation
# --------------------------------------------------------------------------------------------


def test_rollout_annotation_follows_secret_rotation(webhook: WebhookEnv, ns: str) -> None:
    make_ready_store(webhook, ns, "orders")
    apps: Any = client.AppsV1Api(webhook.api)
    template = pod_body("orders", annotations={MODE_ANNOTATION: "stock"})
    template["metadata"].pop("generateName")
    template["metadata"]["labels"]["app"] = "rollout"
    apps.create_namespaced_deployment(ns, {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "workers", "labels": {ROLLOUT_LABEL: "true"}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "rollout"}},
                 "template": {"metadata": template["metadata"], "spec": template["spec"]}}})
    apps.create_namespaced_deployment(ns, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "bystander"},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "bystander"}},
                 "template": {"metadata": {"labels": {"app": "bystander",
                                                      INJECT_LABEL: "orders"}},
                              "spec": template["spec"]}}})

    def template_hash(name: str = "workers") -> str | None:
        d = webhook.to_dict(apps.read_namespaced_deployment(name, ns))
        return (d["spec"]["template"]["metadata"].get("annotations") or {}).get(HASH_ANNOTATION)

    def secret_digest() -> str | None:
        return secret_hash(webhook.core.read_namespaced_secret(
            secret_name("orders"), ns).data)

    first = eventually(lambda: template_hash() == secret_digest() and template_hash(), 60,
                       "the pod template to carry the Secret hash")
    # Rotation on request: the operator creates the next role and rewrites the Secret.
    webhook.custom.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "orders",
        {"metadata": {"annotations": {ROTATE_ANNOTATION: "e2e-1"}}}, _content_type=MERGE)
    second = eventually(lambda: (h := template_hash()) != first and h == secret_digest() and h,
                        STORE_READY_TIMEOUT, "the hash to follow the rotated Secret")
    assert second != first

    # The Deployment controller rolls: a second ReplicaSet, whose pods are injected too.
    def replica_sets() -> list[dict[str, Any]] | None:
        items = [webhook.to_dict(r) for r in apps.list_namespaced_replica_set(
            ns, label_selector="app=rollout").items]
        hashes = {(r["spec"]["template"]["metadata"].get("annotations") or {}).get(
            HASH_ANNOTATION) for r in items}
        return items if second in hashes else None

    eventually(replica_sets, 60, "a ReplicaSet for the new hash")

    def new_pod() -> dict[str, Any] | None:
        for p in webhook.core.list_namespaced_pod(ns, label_selector="app=rollout").items:
            d = webhook.to_dict(p)
            if (d["metadata"].get("annotations") or {}).get(HASH_ANNOTATION) == second:
                return d
        return None

    assert_injected(eventually(new_pod, 60, "a pod of the new ReplicaSet"), "orders", stock=True)
    assert template_hash("bystander") is None  # not opted in: never touched


# --------------------------------------------------------------------------------------------
# Failing open and keeping the CA across restarts (restarts the operator: keep last)
# --------------------------------------------------------------------------------------------


def test_webhook_down_admits_pods_and_ca_survives_restart(webhook: WebhookEnv, ns: str) -> None:
    make_ready_store(webhook, ns, "orders")
    bundle_before = webhook.ca_bundle()
    tls_secret = webhook.core.read_namespaced_secret(
        "resultstore-webhook-tls", webhook.operator.namespace)
    ca_before = TlsBundle.from_secret_data(tls_secret.data)
    assert ca_before is not None and bundle_before is not None
    assert base64.b64decode(bundle_before) == ca_before.ca_crt

    webhook.operator.stop()
    assert not port_open(webhook.operator.port, "127.0.0.1")
    started = time.monotonic()
    down, _ = webhook.create_pod(ns, pod_body("orders", "while-down"))
    assert time.monotonic() - started < 10  # failurePolicy Ignore: no long stall either
    assert_untouched(down, "orders")
    assert webhook.read_pod(ns, "while-down")["metadata"]["name"] == "while-down"

    webhook.operator.start()
    webhook.wait_serving()
    assert webhook.ca_bundle() == bundle_before  # the CA survived the restart
    after, _ = webhook.create_pod(ns, pod_body("orders", "after-restart"))
    assert_injected(after, "orders")
