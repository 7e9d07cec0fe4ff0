"""The real node runs a pod of the project's image, and `stop` leaves the host as it was.

Snapshot the host (sysctls, /proc/self/mountinfo, iptables-save, ip link, cgroups, the
paths a kubelet or containerd creates), start containerd + kubelet + kube-scheduler against
the session's control plane, run a hostNetwork pod of the worker image to completion and
read its output with `kubectl logs` (API server -> kubelet -> containerd), stop, and compare.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from resultstore_devtools import hoststate, image
from resultstore_devtools.controlplane import ControlPlane, ExistingCluster
from resultstore_devtools.procs import eventually
from resultstore_devtools.realnode import wait_for_free_machine
from tests.e2e.node_support import (
    CLAIM_WAIT,
    COLD_NODE_BUILD_TIMEOUT,
    SessionNode,
    announce,
    node_binaries_missing,
)

pytestmark = pytest.mark.timeout(COLD_NODE_BUILD_TIMEOUT if node_binaries_missing() else 900)

POD_SCRIPT = (
    "import os, pathlib, resultstore_backend; "
    "token = pathlib.Path('/var/run/secrets/kubernetes.io/serviceaccount/token'); "
    "print('MARKER', os.getuid(), token.is_file(), flush=True)"
)


def _pod(name: str, namespace: str, worker_image: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "hostNetwork": True,
            "restartPolicy": "Never",
            "containers": [{
                "name": "main",
                "image": worker_image,
                "imagePullPolicy": "Never",
                "command": ["python", "-c", POD_SCRIPT],
            }],
        },
    }


def _kubectl(kubectl: Path, kubeconfig: Path, *args: str,
             stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(kubectl), "--kubeconfig", str(kubeconfig), *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def _other_tools_mounts() -> list[Path]:
    """buildah's project store: other tests build and run images there concurrently."""
    flags = image.storage()
    return [Path(flags[flags.index(flag) + 1]) for flag in ("--root", "--runroot")]


def test_real_node_runs_a_pod_and_stop_restores_the_host(
    kube: ControlPlane | ExistingCluster, kube_tools: object, namespace: str,
    pytestconfig: pytest.Config, session_node: SessionNode,
) -> None:
    """The session's node is stopped first (when an earlier test started it) and started
    again inside the snapshots; later tests get it back with a warm start."""
    if not session_node.choice.real:
        pytest.skip(f"this test is about the real node's effect on the host; "
                    f"{session_node.choice.describe()}")
    worker = image.build().worker  # cached: seconds when the context did not change
    kubectl = kube_tools.kubectl  # type: ignore[attr-defined]
    ignored = _other_tools_mounts()
    assert session_node.stop() == [], "the session's node did not restore the host"
    # Another session's real node would be in the snapshot and gone afterwards.
    wait_for_free_machine(CLAIM_WAIT, lambda m: announce(pytestconfig, m))
    before = hoststate.snapshot()

    try:
        node = session_node.real()
        name = f"hello-{uuid.uuid4().hex[:6]}"
        created = _kubectl(kubectl, kube.kubeconfig, "apply", "-f", "-",
                           stdin=json.dumps(_pod(name, namespace, worker)))
        assert created.returncode == 0, created.stderr

        def phase() -> str | None:
            got = _kubectl(kubectl, kube.kubeconfig, "get", "pod", name, "-n", namespace,
                           "-o", "jsonpath={.status.phase}")
            return got.stdout if got.stdout in ("Succeeded", "Failed") else None

        final = eventually(phase, 180, f"pod {namespace}/{name} to finish on {node.node_name}")
        logs = _kubectl(kubectl, kube.kubeconfig, "logs", name, "-n", namespace)
        assert final == "Succeeded", f"pod ended {final}; logs:\n{logs.stdout}{logs.stderr}"
        assert logs.returncode == 0, f"kubectl logs failed: {logs.stderr}"
        # the image's own user, and the ServiceAccount token the kubelet really projected
        assert "MARKER 10001 True" in logs.stdout, logs.stdout
        bound = _kubectl(kubectl, kube.kubeconfig, "get", "pod", name, "-n", namespace,
                         "-o", "jsonpath={.spec.nodeName}")
        assert bound.stdout == node.node_name

        during = hoststate.snapshot()
        assert during.sysctls.get("net.ipv4.ip_forward") == before.sysctls.get(
            "net.ipv4.ip_forward"), "ip_forward changed while the node ran"
        assert during.iptables == before.iptables, "iptables changed while the node ran"
        assert during.links == before.links, "a network device appeared while the node ran"
        deleted = _kubectl(kubectl, kube.kubeconfig, "delete", "pod", name, "-n", namespace,
                           "--wait=false")
        assert deleted.returncode == 0, deleted.stderr
    finally:
        leftovers = session_node.stop()
    assert leftovers == [], f"node stop could not undo: {leftovers}"

    after = hoststate.snapshot()
    changed = hoststate.differences(hoststate.ignoring(before, ignored),
                                    hoststate.ignoring(after, ignored))
    assert changed == [], "node stop did not restore the host:\n" + "\n".join(changed)
