"""`scripts/demo --kubeconfig`: the in-cluster install path, run end to end.

The session's control plane plays the "existing cluster" and the session's real node
(containerd + kubelet, tests/e2e/conftest.py ``session_node``) runs the pods the demo
creates, in the project's images: the operator's own Deployment, installed from manifests/
by the demo, Ready through its probe and running with the ServiceAccount token the kubelet
projects, and the worker Deployment, admitted and mutated by that operator's webhook, its
Secret volume refreshed by the kubelet during the rotation (with the operator's default
grace: the kubelet's default sync takes 60-90 s). PostgreSQL and Redis are the session's,
given with --postgres and --broker-url as a user with managed services would.

What differs from a cluster with a pod network: the node here has none (all traffic stays on
this machine), so the demo runs with --host-network (hostNetwork pods, loopback addresses,
the webhook by URL: resultstore_devtools.localnode.local_node_install).

Only where the session uses the stand-in (RESULTSTORE_NODE=standin, or no real node can
start here) does resultstore_devtools.node run the pods instead, each in its real image with
buildah, and the operator registers its webhook by URL given with --operator-env.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from kubernetes import client

from resultstore_devtools import image
from resultstore_devtools.node import StandInNode
from resultstore_devtools.procs import free_port
from tests.e2e.node_support import SessionNode

OPERATOR_NS = "resultstore-system"
# The rotation waits for the kubelet's default refresh (60-90 s) and the operator's 120 s grace.
pytestmark = pytest.mark.timeout(900)


def namespace_names(core: client.CoreV1Api) -> set[str]:
    """The names of the cluster's namespaces (what the demo must leave as it found it)."""
    return {n.metadata.name for n in core.list_namespace().items
            if n.metadata is not None and n.metadata.name is not None}


def test_demo_against_an_existing_cluster(kube, api_client, postgres, redis_server,
                                          tmp_path: Path, session_node: SessionNode) -> None:
    database = f"demo_{uuid.uuid4().hex[:8]}"
    postgres.create_database(database)
    password = uuid.uuid4().hex
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE demo_admin LOGIN CREATEROLE PASSWORD '{password}'")
        conn.execute(f"GRANT CREATE ON DATABASE {database} TO demo_admin")
    namespace = f"demo-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(api_client)
    operator_ns_before = namespace_names(core)
    command = [sys.executable, "-m", "resultstore_devtools.demo",
               "--kubeconfig", str(kube.kubeconfig), "--namespace", namespace,
               "--postgres", f"{postgres.host}:{postgres.port}", "--database", database,
               "--postgres-admin-user", "demo_admin", "--broker-url", redis_server.url,
               "--timeout", "180", "--operator-env", "RESULTSTORE_TICK_INTERVAL=1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESULTSTORE_")}
    env["RESULTSTORE_DEMO_ADMIN_PASSWORD"] = password
    if session_node.choice.real:
        real = session_node.real()
        # the operator's default rotation grace: the kubelet's default sync is 60-90 s
        proc = subprocess.run([*command, "--host-network"], env=env, capture_output=True,
                              text=True, timeout=900)
        output = proc.stdout + proc.stderr
        print(output)  # shown with -s, or on failure
        node_name, ran = real.node_name, None
        operator_log = ""
    else:
        node_name, ran, proc, output, operator_log = _on_the_standin(
            api_client, kube, tmp_path, namespace, command, env)
    assert proc.returncode == 0, (
        f"the demo failed against the existing cluster:\n{output[-6000:]}\n"
        f"--- operator pod log ---\n{operator_log[-4000:]}")
    if ran is not None:
        images = {(ns, pod.rsplit("-", 2)[0]): image for ns, pod, image in ran}
        assert images.get((OPERATOR_NS, "resultstore-operator")) == "celery-resultstore:0.1.0"
        assert images.get((namespace, "orders-worker")) == "celery-resultstore-worker:0.1.0"
    else:  # the kubelet ran it (only imported images exist there: pulls cannot leave)
        line = rf"^\s*resultstore-operator-\S+\s+1/1\s+Running\s+0\s[^\n]*{node_name}"
        assert re.search(line, output, re.M), f"operator pod not Ready on {node_name}"
    assert f"on node {node_name}" in output, output[-3000:]
    assert "CELERY_RESULT_BACKEND=resultstore:///var/run/resultstore/orders" in output
    assert "tasks during the rotation:" in output and " 0 failed" in output, output[-3000:]
    assert "login with the previous password: refused" in output, output[-3000:]
    assert "Demo finished" in output

    # The demo removed what it installed, and nothing else.
    # Gone, not Terminating: the next user of the cluster must be able to install again.
    namespaces = namespace_names(core)
    assert namespace not in namespaces, "the demo namespace was left behind"
    if OPERATOR_NS not in operator_ns_before:
        assert OPERATOR_NS not in namespaces, "the operator install was left behind"
    # deletionPolicy Retain: the results outlive the ResultStore.
    with psycopg.connect(postgres.dsn(database)) as conn:
        row = conn.execute("SELECT count(*) FROM orders_results.celery_taskmeta").fetchone()
    assert row is not None and row[0] > 100, f"results not retained: {row}"


def _on_the_standin(api_client: client.ApiClient, kube, tmp_path: Path, namespace: str,
                    command: list[str], env: dict[str, str]):
    """The same run with resultstore_devtools.node running the pods (the fallback)."""
    def kubeconfig_for(ns: str, account: str) -> Path:
        return kube.service_account_kubeconfig(ns, account, tmp_path / f"{ns}-{account}.conf",
                                               duration="1h")

    built = image.build()  # seconds when the sources have not changed since the last build
    local_images = {"celery-resultstore:0.1.0": built.operator,
                    "celery-resultstore-worker:0.1.0": built.worker}
    server = urlsplit(kube.server)
    webhook_port, health_port = free_port(), free_port()
    node = StandInNode(api_client, (OPERATOR_NS, namespace), kubeconfig_for, tmp_path / "node",
                       images=lambda name: local_images.get(name, name),
                       api_server=(server.hostname or "127.0.0.1", server.port or 443))
    node.start()
    try:
        proc = subprocess.run(
            [*command,
             "--operator-env", f"RESULTSTORE_HEALTH_ADDRESS=127.0.0.1:{health_port}",
             "--operator-env", "RESULTSTORE_WEBHOOK_HOST=127.0.0.1",
             "--operator-env", f"RESULTSTORE_WEBHOOK_PORT={webhook_port}",
             "--operator-env",
             f"RESULTSTORE_WEBHOOK_URL=https://127.0.0.1:{webhook_port}/mutate-pods",
             "--operator-env", "RESULTSTORE_ROTATION_GRACE=5"],
            env=env, capture_output=True, text=True, timeout=900)
        output = proc.stdout + proc.stderr
        print(output)  # shown with -s, or on failure
        operator_log = "".join(node.logs(ns, pod) for ns, pod, _ in node.ran
                               if ns == OPERATOR_NS)
    finally:
        node.stop()
    return "resultstore-standin", list(node.ran), proc, output, operator_log


def test_in_cluster_postgres_and_redis_are_accepted_by_the_api_server(kube, kube_tools,
                                                                        namespace) -> None:
    """What --kubeconfig deploys when no --postgres/--broker-url is given (server dry-run)."""
    import yaml

    from resultstore_devtools.demo_services import build_postgres, build_redis

    objs = build_postgres(namespace, "celery", "superpw", "adminpw") + build_redis(namespace)
    result = subprocess.run(
        [str(kube_tools.kubectl), "--kubeconfig", str(kube.kubeconfig), "apply",
         "--dry-run=server", "-f", "-"],
        input=yaml.safe_dump_all(objs), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"API server rejected the demo's services:\n{result.stderr}"
    assert result.stdout.count("(server dry run)") == len(objs), result.stdout
