"""End-to-end fixtures: one real Kubernetes control plane, and one node, per test session.

``kube`` starts etcd + kube-apiserver + kube-controller-manager on loopback (building the
pinned binaries first if they are not cached; never skipping), or uses the cluster named by
``RESULTSTORE_E2E_KUBECONFIG`` (kind, k3d, ...). Teardown always runs, and the children
carry a parent-death signal, so no process outlives the session even if pytest is killed.

``session_node`` is the node pods run on (tests/e2e/node_support.py): the real one, started
when the first test asks for it and stopped (host restored) at the end; tests that need it
run after the others, so the rest of the suite never shares the cluster with a kubelet.
The header and the summary of the run say which node it was.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from resultstore_devtools import binaries
from resultstore_devtools.controlplane import (
    ControlPlane,
    ExistingCluster,
    cluster_from_environment,
)
from resultstore_devtools.realnode import RealNode
from tests.e2e.node_support import SessionNode, announce, session_choice
from tests.e2e.operator_support import OPERATOR_LOGS, discard_operator_logs

E2E_DIR = Path(__file__).parent
# A cold build of the binaries compiles a few thousand Go packages; on 2 cores that is far
# beyond the default per-test timeout, so the first e2e test gets room for it.
COLD_BUILD_TIMEOUT = 3600


NODE_FIXTURE = "session_node"
_SESSION_NODE = pytest.StashKey[SessionNode]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark e2e tests, lift their timeout when the first one will have to build, say which
    node the pods will run on, and run the tests that need the node last (stable order
    otherwise): the node starts once, and the tests before it never see their pending pods
    scheduled to a kubelet."""
    cold = bool(binaries.missing())
    e2e = False
    for item in items:
        if E2E_DIR in Path(str(item.path)).parents:
            e2e = True
            item.add_marker(pytest.mark.e2e)
            if cold:
                item.add_marker(pytest.mark.timeout(COLD_BUILD_TIMEOUT))
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if e2e and reporter is not None:
        # A header line: this conftest is loaded after pytest's own header when the run
        # starts from tests/, so pytest_report_header would be missed there.
        reporter.write_line(f"e2e: {session_choice().describe()}", bold=True)
    needs_node = [NODE_FIXTURE in getattr(item, "fixturenames", ()) for item in items]
    items[:] = ([i for i, n in zip(items, needs_node, strict=True) if not n]
                + [i for i, n in zip(items, needs_node, strict=True) if n])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            exitstatus: int, config: pytest.Config) -> None:
    """The run's last lines name the node its pods ran on."""
    node = config.stash.get(_SESSION_NODE, None)
    if node is not None:
        terminalreporter.write_line(f"[e2e] {node.summary()}", bold=True)


@pytest.fixture(scope="session")
def kube(pytestconfig: pytest.Config) -> Iterator[ControlPlane | ExistingCluster]:
    """The cluster under test: has ``.kubeconfig``, ``.server``, ``.env`` and ``.local``."""
    cluster = cluster_from_environment()
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    try:
        # Show build progress and start-up timing even though output is captured.
        if capture is not None:
            with capture.global_and_fixture_disabled():
                cluster.start()
        else:
            cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def session_node(kube: ControlPlane | ExistingCluster,
                 pytestconfig: pytest.Config) -> Iterator[SessionNode]:
    """The session's node (real unless the stand-in was chosen or the machine cannot run
    one); the real one is started by ``node`` or ``session_node.real()`` when first used."""
    choice = session_choice()
    announce(pytestconfig, choice.describe())
    if choice.real:
        assert isinstance(kube, ControlPlane), (
            "the real node registers with the local control plane; unset "
            "RESULTSTORE_E2E_KUBECONFIG (or set RESULTSTORE_NODE=standin)")
    holder = SessionNode(kube.kubeconfig, pytestconfig, choice)
    pytestconfig.stash[_SESSION_NODE] = holder
    try:
        yield holder
    finally:
        leftovers = holder.stop()
        assert not leftovers, f"the real node's stop did not restore the host: {leftovers}"


@pytest.fixture
def node(session_node: SessionNode) -> RealNode:
    """The running real node (started if needed); skips when the stand-in was chosen."""
    return session_node.real()


@pytest.fixture(scope="session")
def kube_tools() -> binaries.Binaries:
    """Pinned kubectl/helm (and the rest), built or reused from the cache."""
    return binaries.ensure_all()


@pytest.fixture(scope="session")
def api_client(kube: ControlPlane | ExistingCluster) -> Iterator[client.ApiClient]:
    """A kubernetes-client ApiClient authenticated as the cluster admin."""
    api = config.new_client_from_config(config_file=str(kube.kubeconfig))
    try:
        yield api
    finally:
        api.close()


def _fresh_namespace(api_client: client.ApiClient) -> Iterator[str]:
    core = client.CoreV1Api(api_client)
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=name, labels={"resultstore.dev/e2e": "true"})))
    try:
        yield name
    finally:
        core.delete_namespace(name, propagation_policy="Background")


@pytest.fixture
def namespace(api_client: client.ApiClient) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (the namespace controller empties it)."""
    yield from _fresh_namespace(api_client)


@pytest.fixture
def other_namespace(api_client: client.ApiClient) -> Iterator[str]:
    """A second fresh namespace ("another team"), deleted afterwards."""
    yield from _fresh_namespace(api_client)


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Remember a failed setup or call, for the log clean-up below."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        item.stash[_FAILED] = True


@pytest.fixture(autouse=True)
def _operator_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    """The logs of the operator processes started during a test (function-scoped fixtures
    included) are deleted when it passes; a failing test keeps them and names them.

    Autouse, so set up before and torn down after the test's own function-scoped fixtures,
    which have stopped their operator processes by then; logs of processes started by
    wider-scoped fixtures were registered before this snapshot and are left alone."""
    before = set(OPERATOR_LOGS)
    yield
    kept = discard_operator_logs(OPERATOR_LOGS - before,
                                 keep=request.node.stash.get(_FAILED, False))
    for path in kept:
        print(f"operator log kept: {path}", file=sys.stderr)
