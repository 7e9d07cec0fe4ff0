"""Which node runs this machine's pods (the real one, or the Python stand-in as a fallback),
and the manifests' objects as the real node here can run them. Shared by the e2e tests and
the demo, so both choose the same way and say the same thing.

Why a choice at all: the real node (:mod:`realnode`: containerd + kubelet + kube-scheduler)
is what users run under, so it is the default. It needs root, containerd, runc, ctr, the
CNI loopback plugin and buildah; a machine without them (a laptop without root, a CI image
without containerd) can still run the e2e tests and the demo on the stand-in
(:mod:`node`, :mod:`kubelet`), but only as a fallback that is said out loud, and never in
CI (``CI=true``), where a real node that cannot start is a failure. A real node that fails
*while* starting is always a failure: that is a bug here, not a missing prerequisite.

Pure: :func:`choose_node` decides from settings read once (:class:`NodeRequest`) and the
real node's precondition check; :func:`local_node_install` rewrites plain dicts.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .realnode import NODE_ENV, NodeError

NodeKind = Literal["real", "standin"]
KINDS: tuple[NodeKind, ...] = ("real", "standin")


@dataclass(frozen=True)
class NodeRequest:
    """``RESULTSTORE_NODE`` (``real``, the default, or ``standin``) and whether this is CI."""

    requested: str
    ci: bool

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> NodeRequest:
        requested = environ.get(NODE_ENV, "").strip().lower() or "real"
        ci = environ.get("CI", "").strip().lower() in ("1", "true", "yes")
        return cls(requested, ci)


@dataclass(frozen=True)
class NodeChoice:
    """The node pods run on, and why the stand-in when it is the stand-in."""

    kind: NodeKind
    reason: str = ""

    @property
    def real(self) -> bool:
        return self.kind == "real"

    def describe(self) -> str:
        """One line for a pytest header or the demo's output."""
        if self.real and self.reason:  # CI, where it cannot start: the node's tests fail
            return f"pods must run on the REAL node, which cannot start: {self.reason}"
        if self.real:
            return "pods run on the REAL node (containerd + kubelet + kube-scheduler)"
        return (f"pods run on the Python STAND-IN node, not a real kubelet: {self.reason}; "
                "Secret refresh, probes, security contexts and images are emulated")


def choose_node(request: NodeRequest, problems: Sequence[str]) -> NodeChoice:
    """The real node unless the stand-in is asked for, or the machine lacks what a real
    node needs (``problems``, :meth:`realnode.RealNode.problems`) outside CI.

    Raises ValueError for an unknown ``RESULTSTORE_NODE`` and NodeError in CI when the real
    node cannot start: CI must not go green on the emulation.
    """
    if request.requested not in KINDS:
        raise ValueError(f"{NODE_ENV} must be 'real' or 'standin', not {request.requested!r}")
    if request.requested == "standin":
        return NodeChoice("standin", f"chosen with {NODE_ENV}=standin")
    if problems:
        missing = "; ".join(problems)
        if request.ci:
            raise NodeError(f"CI=true and the real node cannot start here: {missing} (CI "
                            f"never falls back to the stand-in; set {NODE_ENV}=standin "
                            "explicitly to run on it)")
        return NodeChoice("standin", f"the real node cannot start here ({missing})")
    return NodeChoice("real")


def local_node_install(documents: list[dict[str, Any]], api_server_port: int,
                       health_port: int, webhook_port: int,
                       extra_env: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The manifests' objects as this machine's real node can run them.

    What changes, and why (docs/CONTROLPLANE.md, the real node's network): the operator pod
    uses hostNetwork and 127.0.0.1, because pods here have no network but the host's; so
    one replica (two would claim the same host ports), the API server's own address instead
    of the ``kubernetes`` Service (no kube-proxy), the health server and the webhook on
    loopback ports of their own, the webhook registered by URL (no Service endpoints), and
    the probes sent to 127.0.0.1. Image, command, ServiceAccount, security context,
    resources and the probes' paths and timings stay as shipped. ``extra_env`` (the demo's
    short rotation grace) is set on the operator container too, except for the addresses
    above, which must match the ports.
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
                **(extra_env or {}),  # first: the addresses below must match the ports
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
