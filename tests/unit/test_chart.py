"""helm/resultstore: lint-clean, schema-checked, and rendering the same install as manifests/.

Why compare with manifests/: the RBAC proof runs the operator with the chart's identity, and
the demo may install either way; two install paths that drift apart would make one of them
untested. The server-side checks (dry-run, install/upgrade/uninstall) are in
tests/e2e/test_chart.py.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from resultstore_devtools import binaries
from resultstore_operator import crd
from resultstore_operator.webhook import WebhookSettings, configuration_for
from tests.unit.test_manifests import container, env_values, find, manifest_objects

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "resultstore"
CRD_COPY = CHART / "crds" / "resultstore.dev_resultstores.yaml"

Obj = dict[str, Any]


def helm() -> Path:
    """The pinned helm (a missing binary fails the test: bootstrap builds it)."""
    return binaries.cached_binaries().helm


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm()), *args], capture_output=True, text=True, timeout=120)


def render(release: str = "resultstore", namespace: str = "resultstore-system",
           values: Sequence[str] = (), extra: Sequence[str] = ()) -> list[Obj]:
    """`helm template` output as objects (CRDs from crds/ included)."""
    args = ["template", release, str(CHART), "--namespace", namespace, "--include-crds"]
    for v in values:
        args += ["--set", v]
    result = run_helm(*args, *extra)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def strip_helm_labels(o: Obj) -> Obj:
    o = json.loads(json.dumps(o))
    o["metadata"].pop("labels", None)
    o["metadata"].pop("annotations", None)
    return o


# ---------------------------------------------------------------------------------------------


def test_chart_crd_copy_is_what_the_builder_builds() -> None:
    """crds/ is a generated copy: `python -m resultstore_operator.crd > ...crds/<file>`."""
    assert [p.name for p in (CHART / "crds").iterdir()] == [CRD_COPY.name]
    assert CRD_COPY.read_text() == crd.render_yaml()


@pytest.mark.parametrize("values", [
    [],
    ["webhook.tls.mode=certManager"],
    ["webhook.tls.mode=certManager", "webhook.tls.certManager.issuerRef.name=corp-ca",
     "webhook.tls.certManager.issuerRef.kind=ClusterIssuer"],
    ["metrics.enabled=true", "namespace.create=true", "operator.watchNamespaces={a,b}"],
    ["webhook.enabled=false", "serviceAccount.create=false", "serviceAccount.name=existing"],
    ["networkPolicy.enabled=true", "networkPolicy.webhookFrom[0].ipBlock.cidr=10.0.0.10/32"],
], ids=["defaults", "cert-manager", "cert-manager-issuer", "metrics-namespace", "no-webhook",
        "network-policy"])
def test_helm_lint_is_clean(values: list[str]) -> None:
    args = ["lint", str(CHART), "--strict", "--namespace", "resultstore-system"]
    for v in values:
        args += ["--set", v]
    result = run_helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


def test_defaults_render_the_same_install_as_manifests() -> None:
    chart = render()
    plain = manifest_objects()
    for kind in ("CustomResourceDefinition", "ServiceAccount", "ClusterRole",
                 "ClusterRoleBinding", "MutatingWebhookConfiguration", "Role", "RoleBinding"):
        a, b = strip_helm_labels(find(chart, kind)), strip_helm_labels(find(plain, kind))
        assert a == b, kind
    service_a = find(chart, "Service")
    service_b = find(plain, "Service")
    assert service_a["metadata"]["name"] == service_b["metadata"]["name"]
    assert service_a["spec"]["ports"] == service_b["spec"]["ports"]

    # The chart's selectors carry the release instance too; the budget is the same.
    pdb_a, pdb_b = find(chart, "PodDisruptionBudget"), find(plain, "PodDisruptionBudget")
    assert pdb_a["spec"]["minAvailable"] == pdb_b["spec"]["minAvailable"] == 1
    deploy_a, deploy_b = find(chart, "Deployment"), find(plain, "Deployment")
    assert pdb_a["spec"]["selector"]["matchLabels"].items() <= \
        deploy_a["spec"]["template"]["metadata"]["labels"].items()
    assert deploy_a["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert deploy_a["metadata"]["name"] == deploy_b["metadata"]["name"]
    assert deploy_a["spec"]["strategy"] == deploy_b["spec"]["strategy"]
    assert deploy_a["spec"]["replicas"] == deploy_b["spec"]["replicas"] == 2
    pod_a, pod_b = deploy_a["spec"]["template"]["spec"], deploy_b["spec"]["template"]["spec"]
    for key in ("serviceAccountName", "securityContext", "volumes"):
        assert pod_a[key] == pod_b[key], key
    ca, cb = container(deploy_a), container(deploy_b)
    for key in ("image", "command", "ports", "livenessProbe", "readinessProbe", "resources",
                "securityContext", "volumeMounts"):
        assert ca[key] == cb[key], key
    # Every setting the manifests pass, the chart passes with the same value.
    env_a, env_b = env_values(ca), env_values(cb)
    assert {k: env_a.get(k) for k in env_b} == env_b
    assert "RESULTSTORE_OPERATOR_NAMESPACE" in {e["name"] for e in ca["env"]}


def test_webhook_configuration_matches_the_operator_in_any_namespace() -> None:
    chart = render(release="rs", namespace="platform-ops",
                   values=["webhook.excludeNamespaces={monitoring}", "webhook.timeoutSeconds=3"])
    deployment = find(chart, "Deployment")
    settings = WebhookSettings.from_env(env_values(container(deployment)), "platform-ops")
    shipped = find(chart, "MutatingWebhookConfiguration")
    assert shipped["metadata"]["name"] == settings.config_name == "rs-resultstore-injector"
    assert shipped["webhooks"] == configuration_for(settings, ca_bundle=None)["webhooks"]
    hook = shipped["webhooks"][0]
    assert hook["timeoutSeconds"] == 3
    assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == [
        "kube-system", "monitoring", "platform-ops"]
    service = find(chart, "Service", settings.service_name)
    assert service["metadata"]["namespace"] == "platform-ops"
    role = find(chart, "ClusterRole")
    pinned = [r for r in role["rules"] if "mutatingwebhookconfigurations" in r["resources"]]
    assert [r["resourceNames"] for r in pinned] == [["rs-resultstore-injector"]]
    binding = find(chart, "ClusterRoleBinding")
    assert binding["subjects"][0]["namespace"] == "platform-ops"


def test_cert_manager_mode() -> None:
    chart = render(values=["webhook.tls.mode=certManager"])
    issuer = find(chart, "Issuer")
    assert issuer["spec"] == {"selfSigned": {}}
    cert = find(chart, "Certificate")
    assert cert["spec"]["issuerRef"]["name"] == issuer["metadata"]["name"]
    assert "resultstore-webhook.resultstore-system.svc" in cert["spec"]["dnsNames"]
    mwc = find(chart, "MutatingWebhookConfiguration")
    assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
        f"resultstore-system/{cert['metadata']['name']}"
    deployment = find(chart, "Deployment")
    c = container(deployment)
    env = env_values(c)
    settings = WebhookSettings.from_env(env, "resultstore-system")
    assert settings.external_certs and not settings.manage_config
    mount = next(m for m in c["volumeMounts"] if m["name"] == "webhook-tls")
    assert settings.cert_file == f"{mount['mountPath']}/tls.crt"
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == "webhook-tls")
    assert volume["secret"]["secretName"] == cert["spec"]["secretName"]
    # cert-manager's cainjector writes the caBundle: the operator needs no access to it.
    role = find(chart, "ClusterRole")
    assert not [r for r in role["rules"] if "mutatingwebhookconfigurations" in r["resources"]]


def test_cert_manager_with_an_existing_issuer() -> None:
    chart = render(values=["webhook.tls.mode=certManager",
                           "webhook.tls.certManager.issuerRef.name=corp-ca",
                           "webhook.tls.certManager.issuerRef.kind=ClusterIssuer"])
    assert not [o for o in chart if o["kind"] == "Issuer"]
    assert find(chart, "Certificate")["spec"]["issuerRef"] == {
        "name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}


def test_optional_metrics_service_and_namespace() -> None:
    assert not [o for o in render() if o["kind"] == "Namespace"]
    assert len([o for o in render() if o["kind"] == "Service"]) == 1
    chart = render(values=["metrics.enabled=true", "namespace.create=true"])
    ns = find(chart, "Namespace")
    assert ns["metadata"]["name"] == "resultstore-system"
    metrics = find(chart, "Service", "resultstore-metrics")
    c = container(find(chart, "Deployment"))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert metrics["spec"]["ports"][0]["targetPort"] == "metrics"
    assert ports["metrics"] == 9090
    assert metrics["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_webhook_can_be_disabled() -> None:
    chart = render(values=["webhook.enabled=false"])
    assert not [o for o in chart if o["kind"] == "MutatingWebhookConfiguration"]
    assert not [o for o in chart if o["kind"] == "Service"]
    env = env_values(container(find(chart, "Deployment")))
    assert env["RESULTSTORE_WEBHOOK_ENABLED"] == "false"
    assert WebhookSettings.from_env(env, "x").enabled is False


def test_image_digest_and_cleanup_image() -> None:
    digest = "sha256:" + "a" * 64
    c = container(find(render(values=["image.repository=reg.test/rs", f"image.digest={digest}"]),
                       "Deployment"))
    assert c["image"] == f"reg.test/rs@{digest}"
    assert env_values(c)["RESULTSTORE_CLEANUP_IMAGE"] == c["image"]


def test_watch_namespaces_reach_the_operator() -> None:
    from resultstore_operator.settings import OperatorSettings

    c = container(find(render(values=["operator.watchNamespaces={team-a,team-b}"]), "Deployment"))
    settings = OperatorSettings.from_env(env_values(c))
    assert settings.namespaces == ("team-a", "team-b")


@pytest.mark.parametrize("values, message", [
    (["webhook.tls.mode=vault"], "/webhook/tls/mode"),
    (["webhook.timeoutSeconds=60"], "/webhook/timeoutSeconds"),
    (["image.pullPolicy=Sometimes"], "/image/pullPolicy"),
    (["unknownKey=1"], "unknownKey"),
    (["securityContext.allowPrivilegeEscalation=true"], "allowPrivilegeEscalation"),
    (["operator.watchNamespaces={Not_A_Namespace}"], "watchNamespaces"),
    (["operator.cleanupImageAllowlist={*}"], "cleanupImageAllowlist"),
    (["networkPolicy.webhookFrom[0].cidr=10.0.0.0/8"], "webhookFrom"),
])
def test_schema_rejects_bad_values(values: list[str], message: str) -> None:
    args = ["template", "x", str(CHART)]
    for v in values:
        args += ["--set", v]
    result = run_helm(*args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_kube_version_constraint() -> None:
    old = run_helm("template", "x", str(CHART), "--kube-version", "v1.27.9")
    assert old.returncode != 0 and "kubeVersion" in old.stderr
    for version in ("v1.28.0", "v1.30.2-gke.1", "v1.34.4"):
        ok = run_helm("template", "x", str(CHART), "--kube-version", version)
        assert ok.returncode == 0, (version, ok.stderr)


def test_chart_and_app_versions_follow_the_project() -> None:
    import tomllib

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]
    assert chart["kubeVersion"] == ">=1.28.0-0"


# --- issue 14: NetworkPolicy option and cleanup-pod policy ---------------------------------



def test_no_network_policy_by_default() -> None:
    assert not [o for o in render() if o["kind"] == "NetworkPolicy"]


def test_network_policy_admits_only_the_api_server_to_the_webhook_port() -> None:
    chart = render(values=["networkPolicy.enabled=true",
                           "networkPolicy.webhookFrom[0].ipBlock.cidr=10.0.0.10/32"])
    policy = find(chart, "NetworkPolicy")
    deployment = find(chart, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector and all(pod_labels.get(k) == v for k, v in selector.items()), \
        "the policy does not select the operator pod"
    assert policy["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    webhook_port = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    assert policy["spec"]["ingress"] == [{
        "from": [{"ipBlock": {"cidr": "10.0.0.10/32"}}],
        "ports": [{"protocol": "TCP", "port": webhook_port["webhook"]}]}]


def test_network_policy_metrics_and_extra_rules() -> None:
    chart = render(values=[
        "networkPolicy.enabled=true", "metrics.enabled=true",
        "networkPolicy.webhookFrom[0].ipBlock.cidr=10.0.0.10/32",
        "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.team=monitoring",
        "networkPolicy.extraIngress[0].ports[0].port=8080"])
    rules = find(chart, "NetworkPolicy")["spec"]["ingress"]
    assert rules[1] == {"from": [{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}],
                        "ports": [{"protocol": "TCP", "port": 9090}]}
    assert rules[2] == {"ports": [{"port": 8080}]}


def test_network_policy_without_webhook_peers_is_refused() -> None:
    result = run_helm("template", "x", str(CHART), "--set", "networkPolicy.enabled=true")
    assert result.returncode != 0
    assert "networkPolicy.webhookFrom must list the API server" in result.stderr, result.stderr
    # Without the webhook there is nothing to reach: the policy denies all ingress.
    chart = render(values=["networkPolicy.enabled=true", "webhook.enabled=false"])
    assert not find(chart, "NetworkPolicy")["spec"].get("ingress")


def test_cleanup_policy_values_reach_the_operator() -> None:
    from resultstore_operator.settings import OperatorSettings

    default = OperatorSettings.from_env(env_values(container(find(render(), "Deployment"))))
    assert default.cleanup_image_allowlist == ()
    assert default.cleanup_allow_service_account is False
    c = container(find(render(values=[
        "operator.cleanupImageAllowlist={reg.test/tools:2,reg.test/jobs:*}",
        "operator.cleanupAllowServiceAccount=true"]), "Deployment"))
    settings = OperatorSettings.from_env(env_values(c))
    assert settings.cleanup_image_allowlist == ("reg.test/tools:2", "reg.test/jobs:*")
    assert settings.cleanup_allow_service_account is True
    assert settings.cleanup_image == c["image"]


@pytest.mark.parametrize(("values", "allowed"), [
    ([], False),
    (["operator.cleanupAllowHostNetwork=false"], False),
    (["operator.cleanupAllowHostNetwork=true"], True),
])
def test_cleanup_host_network_value_reaches_the_operator(values: list[str],
                                                         allowed: bool) -> None:
    from resultstore_operator.settings import OperatorSettings

    c = container(find(render(values=values), "Deployment"))
    assert env_values(c)["RESULTSTORE_CLEANUP_ALLOW_HOST_NETWORK"] == str(allowed).lower()
    settings = OperatorSettings.from_env(env_values(c))
    assert settings.cleanup_allow_host_network is allowed
    assert settings.cleanup_allow_service_account is False


def test_cleanup_host_network_value_must_be_a_boolean() -> None:
    result = run_helm("template", "x", str(CHART), "--set",
                      "operator.cleanupAllowHostNetwork=sometimes")
    assert result.returncode != 0
    assert "cleanupAllowHostNetwork" in result.stderr, result.stderr


def test_webhook_client_ca_enables_mutual_tls() -> None:
    assert "RESULTSTORE_WEBHOOK_CLIENT_CA_FILE" not in env_values(
        container(find(render(), "Deployment")))
    deployment = find(render(values=["webhook.clientCA.configMap=apiserver-client-ca"]),
                      "Deployment")
    c = container(deployment)
    settings = WebhookSettings.from_env(env_values(c), "resultstore-system")
    mount = next(m for m in c["volumeMounts"] if m["name"] == "webhook-client-ca")
    assert settings.client_ca_file == f"{mount['mountPath']}/ca.crt"
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == "webhook-client-ca")
    assert volume["configMap"] == {"name": "apiserver-client-ca",
                                   "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    args = ["lint", str(CHART), "--strict", "--namespace", "resultstore-system", "--set",
            "webhook.clientCA.configMap=apiserver-client-ca"]
    result = run_helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
