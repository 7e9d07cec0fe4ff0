"""Which node runs the e2e tests' pods, and the real one as a context manager.

The real node (containerd + kubelet + kube-scheduler, resultstore_devtools.realnode) is the
default. A machine where it cannot start (not root, no containerd) fails with the reason;
the Python stand-in (resultstore_devtools.node) is used only when chosen explicitly with
``RESULTSTORE_NODE=standin``. Every use prints which node it is, so a test run says it.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import pytest

from resultstore_devtools import binaries
from resultstore_devtools.realnode import NODE_ENV, RealNode

NodeKind = Literal["real", "standin"]
STATE_PREFIX = "resultstore-node-"
# kubelet + kube-scheduler compile from the Go build cache in about 2 minutes warm; with an
# empty cache they are a large share of a Kubernetes build.
COLD_NODE_BUILD_TIMEOUT = 3600
# One real node per machine: a concurrent session's node is waited for, not fought.
CLAIM_WAIT = 480.0


def node_kind() -> NodeKind:
    """``RESULTSTORE_NODE``: ``real`` (default) or ``standin``; anything else is an error."""
    value = os.environ.get(NODE_ENV, "real").strip().lower() or "real"
    if value not in ("real", "standin"):
        raise pytest.UsageError(f"{NODE_ENV} must be 'real' or 'standin', not {value!r}")
    return value  # type: ignore[return-value]


def node_binaries_missing() -> bool:
    paths = [binaries.binary_path(binaries.settings().cache_dir, name,
                                  binaries.KUBERNETES_VERSION)
             for name in binaries.NODE_COMMANDS]
    return not all(path.is_file() for path in paths)


def announce(pytestconfig: pytest.Config, message: str) -> None:
    """Print past pytest's capture, so the run's output names the node used."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print(f"\n[e2e] {message}", file=sys.stderr, flush=True)
    else:
        print(f"[e2e] {message}", file=sys.stderr, flush=True)


@contextmanager
def real_node(admin_kubeconfig: Path, images: Sequence[str],
              pytestconfig: pytest.Config) -> Iterator[RealNode]:
    """A real node in a fresh /tmp state directory, stopped (host restored) and removed after.

    Fails, never skips, when this machine cannot run one, naming the stand-in switch.
    A watchdog runs ``node stop`` if the test process is killed.
    """
    state_dir = Path(tempfile.mkdtemp(prefix=STATE_PREFIX))
    node = RealNode(admin_kubeconfig=admin_kubeconfig, state_dir=state_dir, images=images,
                    watchdog=True, claim_wait=CLAIM_WAIT,
                    progress=lambda m: announce(pytestconfig, f"node: {m}"))
    problems = node.problems()
    if problems:
        shutil.rmtree(state_dir, ignore_errors=True)
        pytest.fail(f"the real node cannot start here: {'; '.join(problems)}. "
                    f"Set {NODE_ENV}=standin to run the e2e pods on the Python stand-in "
                    "node instead.", pytrace=False)
    try:
        node.start()
        announce(pytestconfig, f"pods run on the REAL node {node.node_name} (containerd + "
                               f"kubelet {binaries.KUBERNETES_VERSION}); start "
                               f"{node.timings.get('total', 0):.1f}s")
        yield node
    finally:
        leftovers = node.stop()
        if leftovers:
            announce(pytestconfig, f"node stop left {leftovers}; logs kept in {state_dir}")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)


def local_node_install(documents: list[dict[str, Any]], api_server_port: int,
                       health_port: int, webhook_port: int) -> list[dict[str, Any]]:
    """The manifests' objects as this machine's real node can run them (pure; unit tested).

    What changes, and why (docs/CONTROLPLANE.md, the real node's network): the operator pod
    uses hostNetwork and 127.0.0.1, because pods here have no network but the host's; so
    one replica (two would claim the same host ports), the API server's own address instead
    of the ``kubernetes`` Service (no kube-proxy), the health server and the webhook on
    loopback ports of their own, the webhook registered by URL (no Service endpoints), and
    the probes sent to 127.0.0.1. Image, command, ServiceAccount, security context,
    resources and the probes' paths and timings stay as shipped.
    """
    out = copy.deepcopy(documents)
    for doc in out:
        if not doc or doc.get("kind") != "Deployment":
            continue
        doc["spec"]["replicas"] = 1
        pod = doc["spec"]["template"]["spec"]
        pod["hostNetwork"] = True
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env") or []}
            overrides = {
                "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": str(api_server_port),
                "RESULTSTORE_HEALTH_ADDRESS": f"127.0.0.1:{health_port}",
                "RESULTSTORE_WEBHOOK_HOST": "127.0.0.1",
                "RESULTSTORE_WEBHOOK_PORT": str(webhook_port),
                "RESULTSTORE_WEBHOOK_URL": f"https://127.0.0.1:{webhook_port}/mutate-pods",
            }
            for name, value in overrides.items():
                env[name] = {"name": name, "value": value}
            container["env"] = list(env.values())
            container["ports"] = [{"name": "health", "containerPort": health_port},
                                  {"name": "webhook", "containerPort": webhook_port}]
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe in container:
                    container[probe]["httpGet"]["host"] = "127.0.0.1"
    return out
