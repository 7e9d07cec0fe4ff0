"""Which node runs the e2e tests' pods: one real node per test session, started on first use.

The real node (containerd + kubelet + kube-scheduler, resultstore_devtools.realnode) is the
default. The Python stand-in (resultstore_devtools.node) is used only when chosen with
``RESULTSTORE_NODE=standin``, or when this machine lacks what a real node needs (not root,
no containerd, ...) outside CI (resultstore_devtools.localnode.choose_node); with ``CI=true``
that is a failure. The choice is printed in pytest's header and summary, and loudly when a
test first asks for a node.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

from resultstore_devtools import binaries, image
from resultstore_devtools.localnode import (
    NodeChoice,
    NodeKind,
    NodeRequest,
    choose_node,
)
from resultstore_devtools.localnode import local_node_install as local_node_install
from resultstore_devtools.realnode import NodeError, NodeSettings, RealNode

STATE_PREFIX = "resultstore-node-"
# kubelet + kube-scheduler compile from the Go build cache in about 2 minutes warm; with an
# empty cache they are a large share of a Kubernetes build.
COLD_NODE_BUILD_TIMEOUT = 3600
# One real node per machine: a concurrent session's node is waited for, not fought.
CLAIM_WAIT = 480.0


@cache
def session_choice() -> NodeChoice:
    """Decided once per session (settings read once); a UsageError names a bad value."""
    probe = RealNode(admin_kubeconfig=Path(os.devnull), settings=NodeSettings.from_env())
    try:
        return choose_node(NodeRequest.from_env(), probe.problems())
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    except NodeError as exc:  # CI: the tests that need a node fail with this, none skips
        return NodeChoice("real", str(exc))


def node_kind() -> NodeKind:
    return session_choice().kind


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


@dataclass
class SessionNode:
    """The session's one real node: started when a test first needs it, with the project's
    operator and worker images, and stopped (host restored) at the end of the session.

    ``stop`` may be called mid-session (test_realnode.py checks the host around a start and
    a stop); the next ``real()`` starts it again, a warm start of a few seconds.
    """

    admin_kubeconfig: Path
    pytestconfig: pytest.Config
    choice: NodeChoice
    node: RealNode | None = None
    starts: int = 0
    used: list[str] = field(default_factory=list)

    def real(self) -> RealNode:
        """The running real node; skips (outside CI) when the stand-in is this session's."""
        if not self.choice.real:
            pytest.skip(f"this test is about the real node; {self.choice.describe()}")
        if self.node is not None:
            return self.node
        built = image.build()  # cached: seconds when the context did not change
        state_dir = Path(tempfile.mkdtemp(prefix=STATE_PREFIX))
        node = RealNode(admin_kubeconfig=self.admin_kubeconfig, state_dir=state_dir,
                        images=[built.operator, built.worker], watchdog=True,
                        claim_wait=CLAIM_WAIT,
                        progress=lambda m: announce(self.pytestconfig, f"node: {m}"))
        try:
            node.start()
        except NodeError as exc:
            shutil.rmtree(state_dir, ignore_errors=True)
            pytest.fail(f"the real node did not start: {exc}", pytrace=False)
        self.node = node
        self.starts += 1
        announce(self.pytestconfig, f"pods run on the REAL node {node.node_name} (containerd "
                                    f"+ kubelet {binaries.KUBERNETES_VERSION}); start "
                                    f"{node.timings.get('total', 0):.1f}s")
        if node.node_name not in self.used:
            self.used.append(node.node_name)
        return node

    def stop(self) -> list[str]:
        """Stop the node if it runs; returns what its host restore could not undo."""
        node, self.node = self.node, None
        if node is None:
            return []
        leftovers = node.stop()
        if leftovers:
            announce(self.pytestconfig, f"node stop left {leftovers}; logs kept in "
                                        f"{node.state_dir}")
        else:
            shutil.rmtree(node.state_dir, ignore_errors=True)
        return leftovers

    def summary(self) -> str:
        if not self.choice.real:
            return self.choice.describe()
        if not self.used:
            return "no test of this run needed a node (the real one was the choice)"
        return (f"pods ran on the REAL node {', '.join(self.used)} (containerd + kubelet "
                f"{binaries.KUBERNETES_VERSION}; started {self.starts} time(s))")
