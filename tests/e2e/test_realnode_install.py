"""The operator installed from the Helm chart runs on the real node: its image, its
ServiceAccount token as the kubelet projects it, Ready through the kubelet's real probes.

The same from manifests/ is test_demo_cluster.py's (`scripts/demo --kubeconfig
--host-network` installs them with the same local-node changes, waits for the rollout, and
its operator pod must be 1/1 Running on the node and serve the webhook): it was also a case
here, folded to keep one node run per install path (``_rendered`` still renders both, and
``SOURCES`` says which run here).

The manifests (`kubectl kustomize`) or the chart (`helm template`) are rendered and changed
only as this machine's node needs (resultstore_devtools.localnode.local_node_install: hostNetwork,
one replica, loopback addresses); the operator then takes the leader Lease and registers
the injection webhook with the API server, which it can only do with the projected token's
identity and RBAC.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from resultstore_devtools import binaries
from resultstore_devtools.controlplane import ControlPlane
from resultstore_devtools.localnode import local_node_install
from resultstore_devtools.procs import eventually, free_port
from resultstore_devtools.realnode import RealNode
from tests.e2e.node_support import COLD_NODE_BUILD_TIMEOUT, node_binaries_missing

pytestmark = pytest.mark.timeout(COLD_NODE_BUILD_TIMEOUT if node_binaries_missing() else 900)

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "resultstore-system"


def _kubectl(kube: ControlPlane, *args: str, stdin: str | None = None,
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binaries.cached_binaries().kubectl), "--kubeconfig",
                           str(kube.kubeconfig), *args], input=stdin, capture_output=True,
                          text=True, timeout=180)


def _json(kube: ControlPlane, *args: str) -> dict[str, Any]:
    got = _kubectl(kube, *args, "-o", "json")
    assert got.returncode == 0, got.stderr
    data: dict[str, Any] = json.loads(got.stdout)
    return data


def _rendered(kube: ControlPlane, source: str) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k manifests/` or `helm install` (-n resultstore-system
    --create-namespace) would create, rendered locally so they can be adapted."""
    if source == "manifests":
        rendered = _kubectl(kube, "kustomize", str(ROOT / "manifests"))
        assert rendered.returncode == 0, rendered.stderr
        return [d for d in yaml.safe_load_all(rendered.stdout) if d]
    helm = subprocess.run([str(binaries.cached_binaries().helm), "template", "resultstore",
                           str(ROOT / "helm" / "resultstore"), "-n", NAMESPACE,
                           "--include-crds"], capture_output=True, text=True, timeout=120)
    assert helm.returncode == 0, helm.stderr
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    return [namespace, *(d for d in yaml.safe_load_all(helm.stdout) if d)]


# "manifests" is test_demo_cluster.py's (see the module docstring).
SOURCES = ["chart"]


@pytest.mark.parametrize("source", SOURCES)
def test_operator_installed_is_ready_on_the_real_node(
        kube: ControlPlane, node: RealNode, source: str) -> None:
    documents = _rendered(kube, source)
    port = urllib.parse.urlsplit(kube.server).port
    assert port is not None
    webhook_port = free_port()
    install = yaml.safe_dump_all(local_node_install(documents, port, free_port(), webhook_port))
    # The CRD stays when the test ends: other e2e tests of the session use it (and leave an
    # existing one alone); everything else the manifests made is deleted.
    removable = yaml.safe_dump_all([d for d in documents
                                    if d.get("kind") != "CustomResourceDefinition"])
    applied = _kubectl(kube, "apply", "-f", "-", stdin=install)
    assert applied.returncode == 0, applied.stderr
    try:
        def available() -> bool:
            status = _json(kube, "-n", NAMESPACE, "get", "deployment",
                           "resultstore-operator").get("status") or {}
            return status.get("readyReplicas") == 1

        try:
            eventually(available, 180, "the operator Deployment Ready on the real node", 1.0)
        except TimeoutError:
            logs = _kubectl(kube, "-n", NAMESPACE, "logs", "deploy/resultstore-operator")
            pods = _kubectl(kube, "-n", NAMESPACE, "describe", "pods")
            raise AssertionError(f"operator not Ready:\n{pods.stdout[-3000:]}\n"
                                 f"{logs.stdout[-3000:]}{logs.stderr}") from None
        pods = _json(kube, "-n", NAMESPACE, "get", "pods", "-l",
                     "app.kubernetes.io/name=resultstore-operator")["items"]
        assert len(pods) == 1
        pod = pods[0]
        assert pod["spec"]["nodeName"] == node.node_name
        container = pod["status"]["containerStatuses"][0]
        assert container["ready"] is True and container["restartCount"] == 0, container
        # the image the manifests name, found under its short name in containerd
        assert pod["spec"]["containers"][0]["image"] == "celery-resultstore:0.1.0"
        volumes = {v["name"] for v in pod["spec"]["volumes"]}
        assert any(name.startswith("kube-api-access-") for name in volumes), volumes

        # Only the projected token's identity (system:serviceaccount:resultstore-system:
        # resultstore-operator, with the manifests' RBAC) can take the Lease and register
        # the webhook.
        def leading() -> str | None:
            lease = _json(kube, "-n", NAMESPACE, "get", "lease",
                          "resultstore-operator-leader")
            holder = str((lease.get("spec") or {}).get("holderIdentity") or "")
            return holder if holder.startswith(pod["metadata"]["name"]) else None

        eventually(leading, 60, "the operator pod to hold the leader Lease", 1.0)
        config = _json(kube, "get", "mutatingwebhookconfiguration", "resultstore-injector")
        url = config["webhooks"][0]["clientConfig"].get("url")
        assert url == f"https://127.0.0.1:{webhook_port}/mutate-pods", url
        assert config["webhooks"][0]["clientConfig"].get("caBundle")
    finally:
        _kubectl(kube, "delete", "--wait=true", "--ignore-not-found", "-f", "-",
                 stdin=removable)
