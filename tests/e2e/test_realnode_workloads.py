"""The product's pods on the real node: an injected worker of the worker image stores results,
and the operator's cleanup Job runs to completion in its image.

The operator (webhook included) runs as the process test_webhook.py starts; the pods run on
containerd + kubelet (tests/e2e/node_support.py), so the Secret volume, the ConfigMap volume,
the image's user, the pod security context and the absent ServiceAccount token are the real
kubelet's. Pods use hostNetwork and 127.0.0.1 (docs/CONTROLPLANE.md: all traffic stays on
this machine).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import threading
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from kubernetes import client

from resultstore_devtools import image
from resultstore_devtools.controlplane import ControlPlane
from resultstore_devtools.postgres import PostgresServer
from resultstore_devtools.realnode import RealNode
from resultstore_devtools.redis import RedisServer
from resultstore_operator.builders.cronjob import NON_ROOT_UID
from resultstore_operator.builders.names import cronjob_name
from resultstore_operator.injection import ENV_NAME, MODE_ANNOTATION, volume_name
from resultstore_operator.spec import ANNOTATION_ROTATE as ROTATE_ANNOTATION
from resultstore_operator.webhook import GROUP, PLURAL, VERSION
from tests.e2e.node_support import COLD_NODE_BUILD_TIMEOUT, announce, node_binaries_missing
from tests.e2e.operator_support import Cluster, can_login
from tests.e2e.test_webhook import (  # noqa: F401  (webhook and ns are fixtures)
    ADMIN_SECRET,
    WebhookEnv,
    assert_injected,
    ensure_admin_secret,
    make_ready_store,
    ns,
    pod_body,
    wait_ready,
    webhook,
)
from tests.helpers.waiting import eventually

pytestmark = pytest.mark.timeout(COLD_NODE_BUILD_TIMEOUT if node_binaries_missing() else 900)

APP = '''\
from celery import Celery

app = Celery("realnode_e2e")
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                broker_connection_retry_on_startup=True)


@app.task(name="e2e.add")
def add(x, y):
    return x + y
'''


def _kubectl(kube: ControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    from resultstore_devtools import binaries

    return subprocess.run([str(binaries.cached_binaries().kubectl), "--kubeconfig",
                           str(kube.kubeconfig), *args], capture_output=True, text=True,
                          timeout=120)


def _pod_phase(wenv: WebhookEnv, namespace: str, name: str) -> str:
    return str((wenv.read_pod(namespace, name).get("status") or {}).get("phase") or "")


def _start_worker(webhook: WebhookEnv, ns: str, kube: ControlPlane,  # noqa: F811
                  node: RealNode, store: str, redis_server: RedisServer,
                  stock: bool = False) -> str:
    """An injected worker pod of the worker image, Running on the real node; its queue."""
    webhook.core.create_namespaced_config_map(ns, {
        "metadata": {"name": "app"}, "data": {"realnode_app.py": APP}})
    queue = f"q-{store}"
    worker_image = image.Targets(image.project_version()).worker
    annotations = {MODE_ANNOTATION: "stock"} if stock else None
    body = pod_body(store, "worker", annotations=annotations, containers=[{
        "name": "worker", "image": worker_image, "imagePullPolicy": "Never",
        "command": ["celery", "-A", "realnode_app", "worker", "--pool=solo", "-Q", queue,
                    "-n", f"{store}@%h", "--loglevel=INFO", "--without-gossip",
                    "--without-mingle", "--without-heartbeat"],
        "env": [{"name": "CELERY_BROKER_URL", "value": redis_server.url},
                {"name": "PYTHONPATH", "value": "/app"}],
        "volumeMounts": [{"name": "app", "mountPath": "/app", "readOnly": True}]}])
    body["spec"]["hostNetwork"] = True
    body["spec"]["volumes"] = [{"name": "app", "configMap": {"name": "app"}}]
    created, _ = webhook.create_pod(ns, body)
    assert_injected(created, store, stock=stock)

    def running() -> bool:
        phase = _pod_phase(webhook, ns, "worker")
        assert phase not in ("Failed", "Succeeded"), _kubectl(kube, "logs", "worker", "-n",
                                                              ns).stdout
        return phase == "Running"

    eventually(running, 120, f"the worker pod Running on {node.node_name}")
    assert webhook.read_pod(ns, "worker")["spec"]["nodeName"] == node.node_name
    return queue


def decode_result(raw: bytes) -> Any:
    """A ``result`` column value: a pickle (stock's PickleType layout) or the serializer's JSON.

    Celery >= 5.6 stock writes the result_serializer's bytes; older rows and this project's
    backend may store a pickle. Either way it must decode to the task's return value.
    """
    raw = bytes(raw)
    return pickle.loads(raw) if raw[:1] == b"\x80" else json.loads(raw)


@pytest.mark.parametrize("mode", ["resultstore", "stock"])
def test_injected_worker_pod_stores_results_on_the_real_node(
        webhook: WebhookEnv, ns: str, node: RealNode, kube: ControlPlane,  # noqa: F811
        postgres: PostgresServer, redis_server: RedisServer, mode: str) -> None:
    """The webhook's two modes, each in a pod of the worker image: ``resultstore`` (the
    Secret volume and ``resultstore:///var/run/resultstore/<store>``) and ``stock`` (Celery's
    own database backend from the Secret's ``result_backend`` key via ``secretKeyRef``)."""
    store = f"w{uuid.uuid4().hex[:6]}"
    schema = make_ready_store(webhook, ns, store)
    queue = _start_worker(webhook, ns, kube, node, store, redis_server, stock=mode == "stock")

    from celery import Celery

    sender = Celery("sender", broker=redis_server.url)
    sender.conf.update(task_serializer="json", accept_content=["json"])
    engine = sa.create_engine(postgres.url(webhook.database))
    try:
        ids = [sender.send_task("e2e.add", args=(i, i), queue=queue).id for i in range(5)]

        def stored() -> dict[str, tuple[str, bytes]] | None:
            with engine.connect() as conn:
                rows = conn.execute(sa.text(
                    f'SELECT task_id, status, result FROM "{schema}".celery_taskmeta '
                    "WHERE task_id = ANY(:ids)"), {"ids": ids}).all()
            done = {r.task_id: (r.status, r.result) for r in rows}
            complete = {status for status, _ in done.values()} == {"SUCCESS"}
            return done if len(done) == len(ids) and complete else None

        try:
            done = eventually(stored, 120, "the pod's results in the store's schema", 0.5)
        except AssertionError:
            failed = _kubectl(kube, "logs", "worker", "-n", ns)
            raise AssertionError(f"no results; worker log:\n{failed.stdout}{failed.stderr}"
                                 ) from None
        for i, task_id in enumerate(ids):
            assert decode_result(done[task_id][1]) == 2 * i
        worker_log = _kubectl(kube, "logs", "worker", "-n", ns).stdout
        assert "e2e.add" in worker_log, worker_log
        env = _kubectl(kube, "exec", "worker", "-n", ns, "--", "printenv", ENV_NAME).stdout
        if mode == "stock":
            assert env.strip().startswith("db+postgresql+psycopg://"), "stock URL expected"
        else:
            assert env.strip() == f"resultstore:///var/run/resultstore/{store}"
    finally:
        sender.close()
        engine.dispose()
        webhook.core.delete_namespaced_pod("worker", ns, grace_period_seconds=1)


def test_cleanup_job_runs_to_completion_in_its_image(
        webhook: WebhookEnv, ns: str, node: RealNode, kube: ControlPlane,  # noqa: F811
        postgres: PostgresServer) -> None:
    """The CronJob's own Job, as the operator builds it for ``spec.cleanupJob.hostNetwork:
    true`` (this node's pods reach PostgreSQL on 127.0.0.1 only on the host network), started
    with ``kubectl create job --from=cronjob/...``: nothing of the template is changed."""
    store = f"c{uuid.uuid4().hex[:6]}"
    schema = make_ready_store(webhook, ns, store, cleanup_job={"hostNetwork": True})
    batch: Any = client.BatchV1Api(webhook.api)
    cronjob = webhook.to_dict(batch.read_namespaced_cron_job(cronjob_name(store), ns))
    template_pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert template_pod["automountServiceAccountToken"] is False
    assert template_pod["hostNetwork"] is True
    assert template_pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    job_name = f"{store}-now"
    created = _kubectl(kube, "create", "job", job_name, f"--from=cronjob/{cronjob_name(store)}",
                       "-n", ns)
    assert created.returncode == 0, created.stderr
    engine = sa.create_engine(postgres.url(webhook.database))
    try:
        def finished() -> str | None:
            status = webhook.to_dict(batch.read_namespaced_job(job_name, ns)).get("status") or {}
            for cond in status.get("conditions") or []:
                if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
                    return str(cond["type"])
            return None

        outcome = eventually(finished, 180, f"Job {ns}/{job_name} to finish on {node.node_name}")
        job = webhook.to_dict(batch.read_namespaced_job(job_name, ns))
        # The CronJob's template as is (kubectl copies it; the API server adds only the
        # Job controller's selector labels).
        assert job["spec"]["template"]["spec"] == template_pod
        assert [o["kind"] for o in job["metadata"]["ownerReferences"]] == ["CronJob"]
        pods = _kubectl(kube, "get", "pods", "-n", ns, "-l", f"job-name={job_name}", "-o",
                        "json")
        items = json.loads(pods.stdout)["items"]
        logs = _kubectl(kube, "logs", "-n", ns, f"job/{job_name}")
        assert outcome == "Complete", f"cleanup Job {outcome}:\n{logs.stdout}{logs.stderr}"
        pod = items[0]
        assert pod["spec"]["nodeName"] == node.node_name
        assert pod["spec"]["hostNetwork"] is True
        assert pod["spec"]["automountServiceAccountToken"] is False
        mounts = [m["mountPath"] for m in pod["spec"]["containers"][0].get("volumeMounts") or []]
        assert not any("serviceaccount" in m for m in mounts), mounts
        status = pod["status"]["containerStatuses"][0]
        assert status["state"]["terminated"]["exitCode"] == 0
        # the operator's image, as the CronJob names it (short name -> docker.io/library)
        assert status["image"].endswith(pod["spec"]["containers"][0]["image"])
        assert pod["spec"]["securityContext"]["runAsUser"] == NON_ROOT_UID
        with engine.connect() as conn:
            runs = conn.execute(sa.text(
                f'SELECT count(*) FROM "{schema}".resultstore_cleanup_runs')).scalar_one()
        assert runs >= 1, f"no cleanup run recorded; job log:\n{logs.stdout}"
    finally:
        engine.dispose()
        batch.delete_namespaced_job(job_name, ns, propagation_policy="Background")


def test_rotation_with_the_real_kubelet_refresh_loses_no_store(
        webhook: WebhookEnv, ns: str, node: RealNode, kube: ControlPlane,  # noqa: F811
        postgres: PostgresServer, redis_server: RedisServer,
        pytestconfig: pytest.Config) -> None:
    """The operator's default grace (120 s) against the kubelet's default sync (~75-85 s).

    A worker pod stores results throughout a rotation; the old role may be dropped only
    after the kubelet has refreshed the pod's Secret volume, and no result may be lost.
    """
    store = f"r{uuid.uuid4().hex[:6]}"
    ensure_admin_secret(webhook, ns)
    schema = f"rs_{uuid.uuid4().hex[:10]}"
    webhook.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ResultStore", "metadata": {"name": store},
        "spec": {"database": {"host": webhook.postgres.host, "port": webhook.postgres.port,
                              "name": webhook.database, "sslMode": "disable",
                              "adminSecretRef": {"name": ADMIN_SECRET}},
                 "schema": schema, "credentials": {"drainTimeout": "2m"}}})
    wait_ready(webhook, ns, store)
    queue = _start_worker(webhook, ns, kube, node, store, redis_server)
    pod = webhook.read_pod(ns, "worker")
    mounted = (node.layout.kubelet_root / "pods" / pod["metadata"]["uid"] / "volumes"
               / "kubernetes.io~secret" / volume_name(store) / "username")
    cluster = Cluster(webhook.api)
    old = cluster.binding(ns, store)
    old_role = old["username"]
    assert mounted.read_text() == old_role

    from celery import Celery

    sender = Celery("sender", broker=redis_server.url)
    sender.conf.update(task_serializer="json", accept_content=["json"])
    engine = sa.create_engine(postgres.url(webhook.database))
    ids: list[str] = []
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            ids.append(sender.send_task("e2e.add", args=(i, 1), queue=queue).id)
            i += 1
            stop.wait(0.1)

    def stored() -> dict[str, str]:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                f'SELECT task_id, status FROM "{schema}".celery_taskmeta '
                "WHERE task_id = ANY(:ids)"), {"ids": list(ids)}).all()
        return {r.task_id: r.status for r in rows}

    def role_exists(role: str) -> bool:
        with engine.connect() as conn:
            return bool(conn.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"),
                                     {"r": role}).first())

    def rotated() -> bool:
        obj = webhook.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, store)
        creds = (obj.get("status") or {}).get("credentials") or {}
        return bool(creds.get("rotations", 0) >= 1 and creds.get("phase") == "Stable")

    loader = threading.Thread(target=load, daemon=True, name="task-load")
    loader.start()
    try:
        eventually(lambda: len(stored()) >= 20, 60, "20 results before the rotation", 0.5)
        webhook.custom.patch_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, store,
            {"metadata": {"annotations": {ROTATE_ANNOTATION: "real-kubelet-1"}}})
        started = time.monotonic()
        refreshed_after: float | None = None
        dropped_after: float | None = None
        deadline = started + 420
        while time.monotonic() < deadline:
            elapsed = time.monotonic() - started
            if refreshed_after is None and mounted.read_text() != old_role:
                refreshed_after = elapsed
            if dropped_after is None and not role_exists(old_role):
                dropped_after = elapsed
            if refreshed_after is not None and dropped_after is not None and rotated():
                break
            time.sleep(0.5)
        announce(pytestconfig, f"rotation on the real node: pod's Secret refreshed after "
                               f"{refreshed_after}s, old role dropped after {dropped_after}s")
        assert refreshed_after is not None, "the kubelet never refreshed the Secret volume"
        assert dropped_after is not None and rotated(), "the rotation did not complete"
        assert refreshed_after < dropped_after, (
            f"the old role was dropped {dropped_after:.1f}s after the rotation began, before "
            f"the kubelet refreshed the pod's credentials ({refreshed_after:.1f}s)")
        count = len(ids)
        eventually(lambda: len(ids) >= count + 20, 60, "20 more tasks after the rotation")
    finally:
        stop.set()
        loader.join(timeout=30)
    try:
        def all_stored() -> bool:
            done = stored()
            return len(done) == len(ids)

        try:
            eventually(all_stored, 180, f"all {len(ids)} results stored", 1.0)
        except AssertionError:
            logs = _kubectl(kube, "logs", "worker", "-n", ns).stdout
            raise AssertionError(f"{len(ids) - len(stored())} of {len(ids)} results never "
                                 f"stored; worker log tail:\n{logs[-4000:]}") from None
        statuses = set(stored().values())
        assert statuses == {"SUCCESS"}, statuses
        # What the rotation leaves: new credentials that log in, the previous role gone,
        # its steps as Events, and the conditions back to rest.
        new = cluster.binding(ns, store)
        assert new["username"] != old_role and new["password"] != old["password"]
        assert can_login(new), "the new credentials do not log in"
        assert not can_login(old), "the previous role still logs in after the rotation"
        reasons = cluster.reasons(ns, store)
        for reason in ("RotationStarted", "NextRoleReady", "SecretSwitched",
                       "PreviousRoleRemoved", "RotationComplete"):
            assert reason in reasons, reasons
        rotating = cluster.condition(ns, store, "CredentialsRotating")
        assert rotating is not None and (rotating["status"], rotating["reason"]) == (
            "False", "RotationComplete"), rotating
        ready = cluster.condition(ns, store, "Ready")
        assert ready is not None and ready["status"] == "True", ready
    finally:
        sender.close()
        engine.dispose()
        webhook.core.delete_namespaced_pod("worker", ns, grace_period_seconds=1)
