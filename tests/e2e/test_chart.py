"""The Helm chart against the real API server: template + server dry-run, install, upgrade,
uninstall, and the documented CRD upgrade path.

No pods run on the local control plane (no kubelet), so nothing waits for readiness
(`--wait` is never used); the operator running under the chart's identity is test_rbac.py.
Every release gets its own name and namespace, so cluster-scoped names never collide with
manifests/ (test_manifests.py) or with another release. The CRD from crds/ is shared and
left installed, as Helm itself does on uninstall.
"""

from __future__ import annotations

import base64
import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import pytest
import yaml

from resultstore_devtools import binaries
from resultstore_devtools.controlplane import ControlPlane, ExistingCluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "resultstore"
CRD_NAME = "resultstores.resultstore.dev"

Cluster: TypeAlias = ControlPlane | ExistingCluster


@dataclass(frozen=True)
class Tools:
    kube: Cluster
    bins: binaries.Binaries

    def run(self, tool: str, *args: str, stdin: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        exe = self.bins.helm if tool == "helm" else self.bins.kubectl
        result = subprocess.run([str(exe), "--kubeconfig", str(self.kube.kubeconfig), *args],
                                input=stdin, capture_output=True, text=True, timeout=300)
        if check:
            assert result.returncode == 0, f"{tool} {' '.join(args)}:\n{result.stderr}"
        return result

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("helm", *args, check=check)

    def kubectl(self, *args: str, stdin: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, stdin=stdin, check=check)

    def get(self, *args: str) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.kubectl("get", *args, "-o", "json").stdout)
        return loaded

    def exists(self, *args: str) -> bool:
        return self.kubectl("get", *args, check=False).returncode == 0


@pytest.fixture
def tools(kube: Cluster, kube_tools: binaries.Binaries) -> Tools:
    return Tools(kube, kube_tools)


@dataclass(frozen=True)
class Release:
    name: str
    namespace: str

    @property
    def fullname(self) -> str:
        return f"{self.name}-resultstore"


@pytest.fixture
def release(tools: Tools) -> Iterator[Release]:
    """A release name and namespace of its own; uninstalled and removed afterwards."""
    suffix = uuid.uuid4().hex[:6]
    rel = Release(name=f"rs{suffix}", namespace=f"rs-chart-{suffix}")
    try:
        yield rel
    finally:
        tools.helm("uninstall", rel.name, "-n", rel.namespace, "--ignore-not-found",
                   check=False)
        tools.kubectl("delete", "namespace", rel.namespace, "--ignore-not-found",
                      "--wait=false", check=False)


def rendered(tools: Tools, rel: Release, *values: str) -> str:
    args = ["template", rel.name, str(CHART), "-n", rel.namespace, "--include-crds"]
    for v in values:
        args += ["--set", v]
    return tools.helm(*args).stdout


@pytest.mark.parametrize("values", [
    [],
    ["metrics.enabled=true", "operator.watchNamespaces={team-a,team-b}",
     "webhook.excludeNamespaces={monitoring}"],
    ["webhook.enabled=false"],
    ["networkPolicy.enabled=true", "networkPolicy.webhookFrom[0].ipBlock.cidr=10.0.0.10/32",
     "metrics.enabled=true",
     "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.team=monitoring",
     "operator.cleanupImageAllowlist={reg.test/jobs:*}",
     "webhook.clientCA.configMap=apiserver-client-ca"],
], ids=["defaults", "metrics-watch", "no-webhook", "network-policy"])
def test_template_passes_a_server_side_dry_run(tools: Tools, release: Release,
                                               values: list[str]) -> None:
    tools.kubectl("create", "namespace", release.namespace)
    out = tools.kubectl("apply", "--dry-run=server", "-n", release.namespace, "-f", "-",
                        stdin=rendered(tools, release, *values))
    assert f"deployment.apps/{release.fullname}-operator" in out.stdout
    assert f"clusterrole.rbac.authorization.k8s.io/{release.fullname}-operator" in out.stdout
    if "networkPolicy.enabled=true" in values:
        assert f"networkpolicy.networking.k8s.io/{release.fullname}-operator" in out.stdout


def test_cert_manager_mode_passes_a_server_side_dry_run(tools: Tools, release: Release) -> None:
    """cert-manager itself is not installed here: its Issuer/Certificate are only checked for
    shape (tests/unit/test_chart.py); everything else must pass the dry run unchanged."""
    tools.kubectl("create", "namespace", release.namespace)
    docs = [d for d in yaml.safe_load_all(rendered(tools, release, "webhook.tls.mode=certManager"))
            if d]
    cert_manager = [d for d in docs if d["apiVersion"].startswith("cert-manager.io/")]
    assert sorted(d["kind"] for d in cert_manager) == ["Certificate", "Issuer"]
    rest = [d for d in docs if d not in cert_manager]
    mwc = next(d for d in rest if d["kind"] == "MutatingWebhookConfiguration")
    assert "cert-manager.io/inject-ca-from" in mwc["metadata"]["annotations"]
    out = tools.kubectl("apply", "--dry-run=server", "-n", release.namespace, "-f", "-",
                        stdin=yaml.safe_dump_all(rest))
    assert "mutatingwebhookconfiguration" in out.stdout


def test_install_upgrade_uninstall(tools: Tools, release: Release) -> None:
    ns, full = release.namespace, release.fullname
    install = tools.helm("install", release.name, str(CHART), "-n", ns, "--create-namespace")
    assert "STATUS: deployed" in install.stdout
    assert "CRDs are NOT upgraded" in install.stdout  # NOTES.txt tells how
    tools.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{CRD_NAME}")
    deployment = tools.get("deployment", f"{full}-operator", "-n", ns)
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert deployment["spec"]["replicas"] == 2
    assert tools.exists("role", f"{full}-operator-leader-election", "-n", ns)
    assert tools.exists("rolebinding", f"{full}-operator-leader-election", "-n", ns)
    assert tools.exists("poddisruptionbudget", f"{full}-operator", "-n", ns)
    assert tools.exists("serviceaccount", f"{full}-operator", "-n", ns)
    assert tools.exists("service", f"{full}-webhook", "-n", ns)
    assert tools.exists("clusterrole", f"{full}-operator")
    assert tools.exists("clusterrolebinding", f"{full}-operator")
    mwc = tools.get("mutatingwebhookconfiguration", f"{full}-injector")
    assert mwc["webhooks"][0]["timeoutSeconds"] == 5

    # The operator writes the caBundle (a JSON merge patch of webhooks, as it does it);
    # an upgrade must keep it, since the chart never sets that field.
    ca_bundle = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nstand-in\n").decode()
    hooks = mwc["webhooks"]
    hooks[0]["clientConfig"]["caBundle"] = ca_bundle
    tools.kubectl("patch", "mutatingwebhookconfiguration", f"{full}-injector", "--type=merge",
                  "-p", json.dumps({"webhooks": hooks}))

    upgrade = tools.helm("upgrade", release.name, str(CHART), "-n", ns, "--reuse-values",
                         "--set", "operator.logLevel=DEBUG", "--set", "webhook.timeoutSeconds=3",
                         "--set", "metrics.enabled=true")
    assert "REVISION: 2" in upgrade.stdout
    deployment = tools.get("deployment", f"{full}-operator", "-n", ns)
    env = {e["name"]: e.get("value") for e in
           deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RESULTSTORE_LOG_LEVEL"] == "DEBUG"
    assert env["RESULTSTORE_WEBHOOK_TIMEOUT_SECONDS"] == "3"
    assert tools.exists("service", f"{full}-metrics", "-n", ns)
    hook = tools.get("mutatingwebhookconfiguration", f"{full}-injector")["webhooks"][0]
    assert hook["timeoutSeconds"] == 3
    assert hook["clientConfig"].get("caBundle") == ca_bundle
    assert hook["failurePolicy"] == "Ignore"

    history = tools.helm("history", release.name, "-n", ns, "-o", "json").stdout
    assert [h["status"] for h in json.loads(history)] == ["superseded", "deployed"]

    tools.helm("uninstall", release.name, "-n", ns)
    for args in (("deployment", f"{full}-operator", "-n", ns),
                 ("clusterrole", f"{full}-operator"),
                 ("clusterrolebinding", f"{full}-operator"),
                 ("mutatingwebhookconfiguration", f"{full}-injector")):
        assert not tools.exists(*args), args
    # Helm never deletes CRDs (that would delete every ResultStore); neither do we.
    assert tools.exists("crd", CRD_NAME)


def test_documented_crd_upgrade_path(tools: Tools, release: Release) -> None:
    """docs/install.md: `kubectl apply --server-side --force-conflicts -f crds/` then upgrade."""
    tools.helm("install", release.name, str(CHART), "-n", release.namespace,
               "--create-namespace")
    applied = tools.kubectl("apply", "--server-side", "--force-conflicts", "-f",
                            str(CHART / "crds"))
    assert CRD_NAME in applied.stdout
    tools.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{CRD_NAME}")
    upgrade = tools.helm("upgrade", release.name, str(CHART), "-n", release.namespace)
    assert "STATUS: deployed" in upgrade.stdout


def test_template_with_namespace_applies_to_an_empty_cluster(tools: Tools,
                                                             release: Release) -> None:
    """`helm template --set namespace.create=true | kubectl apply -f -` (GitOps without Helm
    releases) creates the namespace too. (`helm install` stores its release record in the
    namespace before creating anything, so it needs `--create-namespace` instead.)"""
    assert not tools.exists("namespace", release.namespace)
    docs = [d for d in yaml.safe_load_all(rendered(tools, release, "namespace.create=true")) if d]
    assert docs[0]["kind"] == "CustomResourceDefinition" and docs[1]["kind"] == "Namespace"
    body = yaml.safe_dump_all([d for d in docs if d["kind"] != "CustomResourceDefinition"])
    try:
        tools.kubectl("apply", "-f", "-", stdin=body)
        ns = tools.get("namespace", release.namespace)
        assert ns["metadata"]["labels"]["app.kubernetes.io/part-of"] == "celery-resultstore"
        assert tools.exists("deployment", f"{release.fullname}-operator", "-n", release.namespace)
    finally:
        tools.kubectl("delete", "-f", "-", "--ignore-not-found", "--wait=false", stdin=body,
                      check=False)
