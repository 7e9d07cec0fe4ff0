"""`kubectl apply -k manifests/` against the real API server, and the examples validated by it.

The operator Deployment gets no pod here (the local control plane has no kubelet); what is
proven is that the API server accepts every object as written (schema, CEL rules, RBAC
objects, webhook configuration) and that re-applying is a no-op. The operator running with
these permissions is proven in test_rbac.py.

The CRD is left installed at the end: other e2e tests of the session share it, and deleting a
CRD deletes every ResultStore of the cluster.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from resultstore_devtools import binaries
from resultstore_devtools.controlplane import ControlPlane, ExistingCluster

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
EXAMPLES = MANIFESTS / "examples"
OPERATOR_NAMESPACE = "resultstore-system"


def kubectl(kube: ControlPlane | ExistingCluster, tools: binaries.Binaries, *args: str,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(tools.kubectl), "--kubeconfig", str(kube.kubeconfig), *args],
                            capture_output=True, text=True, timeout=180)
    if check:
        assert result.returncode == 0, f"kubectl {' '.join(args)}:\n{result.stderr}"
    return result


def non_crd_objects(kube: ControlPlane | ExistingCluster,
                    tools: binaries.Binaries) -> list[tuple[str, str]]:
    """(kind/name, namespace) of everything the kustomization installs except the CRD."""
    rendered = kubectl(kube, tools, "kustomize", str(MANIFESTS)).stdout
    out = []
    for o in yaml.safe_load_all(rendered):
        if o and o["kind"] != "CustomResourceDefinition":
            out.append((f"{o['kind'].lower()}/{o['metadata']['name']}",
                        o["metadata"].get("namespace", "")))
    return out


@pytest.fixture
def installed(kube: ControlPlane | ExistingCluster,
              kube_tools: binaries.Binaries) -> Iterator[subprocess.CompletedProcess[str]]:
    """`kubectl apply -k manifests/`, removed afterwards (all but the shared CRD)."""
    objects = non_crd_objects(kube, kube_tools)
    try:
        yield kubectl(kube, kube_tools, "apply", "-k", str(MANIFESTS))
    finally:
        # Cluster-scoped objects by name; the namespace takes its contents with it.
        for ref, namespace in objects:
            if not namespace:
                kubectl(kube, kube_tools, "delete", ref, "--ignore-not-found", "--wait=false",
                        check=False)


def test_server_side_dry_run_accepts_the_manifests(kube: ControlPlane | ExistingCluster,
                                                   kube_tools: binaries.Binaries) -> None:
    """A server-side dry run cannot create the namespace its namespaced objects go into, so
    the namespace is created for real first (and removed again if this test created it)."""
    created = kubectl(kube, kube_tools, "get", "namespace", OPERATOR_NAMESPACE,
                      check=False).returncode != 0
    if created:
        kubectl(kube, kube_tools, "create", "namespace", OPERATOR_NAMESPACE)
    try:
        result = kubectl(kube, kube_tools, "apply", "-k", str(MANIFESTS), "--dry-run=server")
        optional = kubectl(kube, kube_tools, "apply", "--dry-run=server", "-f",
                           str(MANIFESTS / "optional" / "networkpolicy.yaml"))
    finally:
        if created:
            kubectl(kube, kube_tools, "delete", "namespace", OPERATOR_NAMESPACE, "--timeout=120s")
    for ref in ("customresourcedefinition.apiextensions.k8s.io/resultstores.resultstore.dev",
                "deployment.apps/resultstore-operator",
                "mutatingwebhookconfiguration.admissionregistration.k8s.io/resultstore-injector"):
        assert f"{ref} created (server dry run)" in result.stdout or \
            f"{ref} configured (server dry run)" in result.stdout or \
            f"{ref} unchanged (server dry run)" in result.stdout, result.stdout
    assert "networkpolicy.networking.k8s.io/resultstore-operator created (server dry run)" in \
        optional.stdout, optional.stdout


def test_apply_k_installs_everything_and_is_idempotent(
        kube: ControlPlane | ExistingCluster, kube_tools: binaries.Binaries,
        installed: subprocess.CompletedProcess[str]) -> None:
    for ref, namespace in non_crd_objects(kube, kube_tools):
        args = ["get", ref, "-o", "name"] + (["-n", namespace] if namespace else [])
        assert ref.split("/")[1] in kubectl(kube, kube_tools, *args).stdout
    kubectl(kube, kube_tools, "wait", "--for=condition=Established", "--timeout=60s",
            "crd/resultstores.resultstore.dev")
    pdb = ["get", "poddisruptionbudget/resultstore-operator", "-n", OPERATOR_NAMESPACE,
           "-o", "jsonpath={.metadata.resourceVersion}"]
    pdb_version = kubectl(kube, kube_tools, *pdb).stdout
    again = kubectl(kube, kube_tools, "apply", "-k", str(MANIFESTS))
    lines = [line for line in again.stdout.splitlines() if line.strip()]
    # kubectl always sends a PodDisruptionBudget's selector (patchStrategy "replace") and so
    # says "configured"; the object is not written again (same resourceVersion).
    assert lines and all(line.endswith("unchanged") or line ==
                         "poddisruptionbudget.policy/resultstore-operator configured"
                         for line in lines), again.stdout
    assert kubectl(kube, kube_tools, *pdb).stdout == pdb_version

    # The ServiceAccount may do what the operator needs, and not more.
    sa = "system:serviceaccount:resultstore-system:resultstore-operator"
    can = kubectl(kube, kube_tools, "auth", "can-i", "--list", "--as", sa).stdout
    assert "resultstores.resultstore.dev" in can
    for verb, resource in (("watch", "resultstores.resultstore.dev"),
                           ("patch", "resultstores.resultstore.dev/status"),
                           ("create", "secrets"), ("create", "events")):
        assert kubectl(kube, kube_tools, "auth", "can-i", verb, resource, "--as", sa,
                       "-A").stdout.strip() == "yes", (verb, resource)
    for verb, resource in (("create", "pods"), ("delete", "namespaces"), ("create",
                           "mutatingwebhookconfigurations"), ("create", "clusterroles"),
                           ("delete", "resultstores.resultstore.dev")):
        assert kubectl(kube, kube_tools, "auth", "can-i", verb, resource, "--as", sa, "-A",
                       check=False).stdout.strip() == "no", (verb, resource)
    assert kubectl(kube, kube_tools, "auth", "can-i", "patch",
                   "mutatingwebhookconfigurations/resultstore-injector", "--as",
                   sa).stdout.strip() == "yes"
    assert kubectl(kube, kube_tools, "auth", "can-i", "patch",
                   "mutatingwebhookconfigurations/someone-elses", "--as", sa,
                   check=False).stdout.strip() == "no"


def test_examples_are_accepted_by_the_api_server(kube: ControlPlane | ExistingCluster,
                                                 kube_tools: binaries.Binaries,
                                                 namespace: str) -> None:
    """The example ResultStore passes the real CRD schema and CEL rules (dry-run: no operator
    runs here, and a real store would point at a database that does not exist)."""
    kubectl(kube, kube_tools, "apply", "--server-side", "-f", str(MANIFESTS / "crd.yaml"))
    kubectl(kube, kube_tools, "wait", "--for=condition=Established", "--timeout=60s",
            "crd/resultstores.resultstore.dev")
    result = kubectl(kube, kube_tools, "apply", "-n", namespace, "-f", str(EXAMPLES),
                     "--dry-run=server")
    for ref in ("secret/postgres-admin", "resultstore.resultstore.dev/orders",
                "configmap/orders-worker-app", "deployment.apps/orders-worker"):
        assert ref in result.stdout, result.stdout


@pytest.mark.parametrize("field, value, message", [
    ("deletionPolicy", "Shred", "spec.deletionPolicy: Unsupported value"),  # OpenAPI enum
    ("schema", "Not-An-Identifier", "schema must be a lower-case identifier"),  # CEL rule
], ids=["enum", "cel"])
def test_the_api_server_refuses_a_broken_example(kube: ControlPlane | ExistingCluster,
                                                 kube_tools: binaries.Binaries,
                                                 namespace: str, tmp_path: Path, field: str,
                                                 value: str, message: str) -> None:
    """The dry-run above is meaningful: the same path rejects an invalid store."""
    store = yaml.safe_load((EXAMPLES / "resultstore.yaml").read_text())
    store["spec"][field] = value
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(store))
    kubectl(kube, kube_tools, "apply", "--server-side", "-f", str(MANIFESTS / "crd.yaml"))
    result = kubectl(kube, kube_tools, "apply", "-n", namespace, "-f", str(broken),
                     "--dry-run=server", check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
