"""Which node runs the e2e tests' pods, and the real one as a context manager.

The real node (containerd + kubelet + kube-scheduler, resultstore_devtools.realnode) is the
default. A machine where it cannot start (not root, no containerd) fails with the reason;
the Python stand-in (resultstore_devtools.node) is used only when chosen explicitly with
``RESULTSTORE_NODE=standin``. Every use prints which node it is, so a test run says it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

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
