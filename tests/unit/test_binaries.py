"""Pure parts of the control-plane binary builder: go.mod generation, ldflags, paths."""

from __future__ import annotations

import json
import socket
import urllib.error
from pathlib import Path

import pytest

from resultstore_devtools import binaries
from resultstore_devtools.controlplane import (
    CONTROLLERS,
    Layout,
    Ports,
    apiserver_command,
    controller_manager_command,
    kubeconfig_text,
)

K8S_GOMOD = """\
// This is a generated file. Do not edit directly.

module k8s.io/kubernetes

go 1.24.0

godebug default=go1.24

require (
\tgithub.com/blang/semver/v4 v4.0.0
\tgo.etcd.io/etcd/api/v3 v3.6.4
\tk8s.io/api v0.0.0
\tk8s.io/apimachinery v0.0.0 // indirect
\tk8s.io/client-go v0.0.0
\tk8s.io/utils v0.0.0-20250604170112-4c0f3b243397
)

require k8s.io/kms v0.0.0

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/apimachinery => ./staging/src/k8s.io/apimachinery
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tk8s.io/kms => ./staging/src/k8s.io/kms
\tk8s.io/sample-controller => ./staging/src/k8s.io/sample-controller
\tgithub.com/example/fork => github.com/example/fork v1.2.3
)
"""


def test_parse_version() -> None:
    assert binaries.parse_version("v1.34.4") == (1, 34, 4)
    with pytest.raises(ValueError):
        binaries.parse_version("1.34")


def test_staging_version_maps_minor_and_patch() -> None:
    assert binaries.staging_version("v1.34.4") == "v0.34.4"


def test_requirements_cover_blocks_single_lines_and_comments() -> None:
    required = binaries.gomod_requirements(K8S_GOMOD)
    assert required["k8s.io/apimachinery"] == "v0.0.0"
    assert required["k8s.io/kms"] == "v0.0.0"
    assert required["go.etcd.io/etcd/api/v3"] == "v3.6.4"


def test_staging_modules_are_required_local_replacements_only() -> None:
    # sample-controller is replaced but not required (and not on the proxy); the fork is a
    # non-staging replacement.
    assert binaries.staging_modules(K8S_GOMOD) == [
        "k8s.io/api", "k8s.io/apimachinery", "k8s.io/client-go", "k8s.io/kms",
    ]


def test_kubernetes_build_gomod() -> None:
    text = binaries.kubernetes_build_gomod("v1.34.4", K8S_GOMOD)
    assert "module resultstore.local/kubernetes-build" in text
    assert "\ngo 1.24.0\n" in text
    assert "\ngodebug default=go1.24\n" in text
    assert "require k8s.io/kubernetes v1.34.4" in text
    assert "\tk8s.io/client-go => k8s.io/client-go v0.34.4" in text
    assert "sample-controller" not in text
    assert "fork" not in text


def test_kubernetes_build_gomod_rejects_a_gomod_without_staging() -> None:
    with pytest.raises(ValueError):
        binaries.kubernetes_build_gomod("v1.34.4", "module x\n\ngo 1.24\n")


def test_kubernetes_ldflags_stamp_both_version_packages() -> None:
    flags = binaries.kubernetes_ldflags("v1.34.4", "2026-02-10T12:53:36Z")
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        assert f"-X {package}.gitVersion=v1.34.4" in flags
        assert f"-X {package}.gitMajor=1" in flags
        assert f"-X {package}.gitMinor=34" in flags
        assert f"-X {package}.buildDate=2026-02-10T12:53:36Z" in flags


def test_helm_ldflags_derive_default_kube_version_from_client_go() -> None:
    gomod = "module helm.sh/helm/v3\n\nrequire (\n\tk8s.io/client-go v0.34.2\n)\n"
    flags = binaries.helm_ldflags("v3.19.5", gomod)
    assert "-X helm.sh/helm/v3/internal/version.version=v3.19.5" in flags
    assert "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1" in flags
    assert "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=34" in flags


def test_simple_build_gomod_keeps_go_directive() -> None:
    text = binaries.simple_build_gomod(
        "etcd", binaries.ETCD_MODULE, "v3.6.4", "module go.etcd.io/etcd/server/v3\n\ngo 1.23.0\n"
    )
    assert "go 1.23.0" in text
    assert "require go.etcd.io/etcd/server/v3 v3.6.4" in text


def test_cache_layout_is_per_component_and_version(tmp_path: Path) -> None:
    paths = binaries.cached_binaries(tmp_path)
    assert paths.kube_apiserver == (
        tmp_path / "bin" / f"kube-apiserver-{binaries.KUBERNETES_VERSION}" / "kube-apiserver"
    )
    assert paths.etcd.parent.name == f"etcd-{binaries.ETCD_VERSION}"
    assert set(paths.all()) == {
        "etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "helm",
    }


def test_settings_reject_unknown_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESULTSTORE_BINARIES_SOURCE", "magic")
    with pytest.raises(ValueError):
        binaries.Settings.from_env()


def test_settings_cache_dir_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RESULTSTORE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("RESULTSTORE_BINARIES_SOURCE", raising=False)
    assert binaries.Settings.from_env() == binaries.Settings(tmp_path, "auto")


def test_kubeconfig_embeds_credentials() -> None:
    doc = json.loads(kubeconfig_text("https://127.0.0.1:6443", b"CA", user="u", token="t",
                                     namespace="ns"))
    assert doc["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:6443"
    assert doc["users"][0]["user"] == {"token": "t"}
    assert doc["contexts"][0]["context"]["namespace"] == "ns"


def test_commands_use_loopback_and_required_flags(tmp_path: Path) -> None:
    layout, ports = Layout(tmp_path), Ports(2379, 2380, 6443, 10257)
    api = apiserver_command(Path("/x/kube-apiserver"), layout, ports)
    assert "--bind-address=127.0.0.1" in api
    assert "--authorization-mode=RBAC" in api
    assert any(flag.startswith("--service-account-signing-key-file=") for flag in api)
    kcm = controller_manager_command(Path("/x/kcm"), layout, ports)
    assert f"--controllers={','.join(CONTROLLERS)}" in kcm
    assert "--use-service-account-credentials=true" in kcm


@pytest.mark.parametrize(("exc", "why"), [
    (urllib.error.URLError(socket.gaierror(-2, "Name or service not known")),
     "no internet access: the release host does not resolve"),
    (TimeoutError("timed out"), "the release host did not answer in time"),
    (RuntimeError("sha256 mismatch for etcd"), "sha256 mismatch for etcd"),
])
def test_download_fallback_reads_as_expected(exc: BaseException, why: str) -> None:
    """Offline, the release download fails by design: one line, no raw urllib error."""
    line = binaries.download_unavailable("kubernetes", exc)
    assert line == (f"kubernetes: official release download not available here ({why}); "
                    "building from the Go module proxy instead (expected offline; cached "
                    "afterwards)")
    assert "\n" not in line and "Errno" not in line and "urlopen" not in line
