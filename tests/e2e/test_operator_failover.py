"""Two real `resultstore-operator` processes, one Lease: failover, handover, partition, and
the webhook served by both throughout (issue 16).

Each test runs two replicas (`POD_NAME` op-a / op-b) with leader election on and short
durations (lease 4 s, renew deadline 2.5 s, retry 0.5 s), in their own Lease namespace.
What each replica did is read from the outside: the Lease (who holds it), the processes
(alive or exited, and with which status), the operators' logs (acquired, lost), and
PostgreSQL's own log of the admin role's statements (`log_statement = all` set on that role
only), which says which CREATE ROLE / PASSWORD statements were *committed*, per backend.
"""

from __future__ import annotations

import re
import select
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from resultstore_devtools.procs import free_port
from resultstore_operator.injection import INJECT_LABEL, STATUS_ANNOTATION
from resultstore_operator.webhook import WEBHOOK_PATH
from tests.e2e.operator_support import (
    Admin,
    Cluster,
    OperatorProcess,
    create_admin,
    ensure_crd,
    store_spec,
    superuser_query,
)
from tests.helpers.waiting import eventually

LEASE_TIMING = {"RESULTSTORE_LEASE_DURATION": "4", "RESULTSTORE_RENEW_DEADLINE": "2.5",
                "RESULTSTORE_RETRY_PERIOD": "0.5"}
STORES = 50
READY_TIMEOUT = 300


# --- a TCP proxy: the Service in front of two webhooks, or a partition of one replica -------


class TcpProxy:
    """Forwards 127.0.0.1:port to the first backend that accepts, in turn (round robin).

    `cut()` drops every open connection and refuses new ones: a network partition of
    whatever talks through it (the API server behind it stays up for everyone else).
    """

    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self.backends = backends
        self.port = free_port()
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._turn = 0
        self._cut = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _dial(self) -> socket.socket | None:
        for i in range(len(self.backends)):
            host, port = self.backends[(self._turn + i) % len(self.backends)]
            try:
                upstream = socket.create_connection((host, port), timeout=2)
            except OSError:
                continue
            self._turn += i + 1
            return upstream
        return None

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = None if self._cut else self._dial()
            if upstream is None:
                conn.close()
                continue
            with self._lock:
                self._open.update((conn, upstream))
            threading.Thread(target=self._pump, args=(conn, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while not self._stop.is_set() and not self._cut:
                ready, _, _ = select.select([a, b], [], [], 0.2)
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    (b if src is a else a).sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with self._lock:
                    self._open.discard(s)
                s.close()

    def cut(self) -> None:
        self._cut = True
        with self._lock:
            for s in list(self._open):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._sock.close()
        self._thread.join(5)


# --- PostgreSQL's log of the admin role's statements ------------------------------------------

LINE = re.compile(r"^\S+ \S+ \S+ \[(?P<pid>\d+)\] (?P<level>[A-Z]+):  (?:statement: )?"
                  r"(?P<text>.*)$")
CREATE_ROLE = re.compile(r'CREATE ROLE "?(?P<role>[a-z0-9_]+)"?', re.I)
ALTER_PASSWORD = re.compile(r'ALTER ROLE "?(?P<role>[a-z0-9_]+)"? .*PASSWORD', re.I)


def committed_role_statements(log_text: str) -> tuple[Counter[str], Counter[str]]:
    """(roles created, passwords set), counting only statements whose transaction committed.

    Per backend pid: statements after BEGIN wait for that backend's COMMIT; ROLLBACK, an
    ERROR, or a backend that never commits (its client was SIGKILLed) drops them.
    """
    created: Counter[str] = Counter()
    passwords: Counter[str] = Counter()
    pending: dict[str, list[tuple[str, str]]] = {}
    for line in log_text.splitlines():
        m = LINE.match(line)
        if m is None:
            continue
        pid, level, text = m["pid"], m["level"], m["text"].strip()
        if level == "ERROR":
            pending.pop(pid, None)
            continue
        if level != "LOG":
            continue
        word = text.split(" ", 1)[0].upper()
        if word in ("BEGIN", "ROLLBACK"):
            pending[pid] = []
            continue
        if word == "COMMIT":
            for kind, role in pending.pop(pid, []):
                (created if kind == "create" else passwords)[role] += 1
            continue
        if (c := CREATE_ROLE.search(text)) is not None:
            pending.setdefault(pid, []).append(("create", c["role"]))
            if "PASSWORD" in text.upper():
                pending[pid].append(("password", c["role"]))
        elif (a := ALTER_PASSWORD.search(text)) is not None:
            pending.setdefault(pid, []).append(("password", a["role"]))
    return created, passwords


# --- two replicas ------------------------------------------------------------------------------


@dataclass
class Pair:
    cluster: Cluster
    namespace: str
    lease_namespace: str
    lease_name: str
    pg: Any
    database: str
    admin: Admin
    kubeconfig: Path
    replicas: dict[str, OperatorProcess] = field(default_factory=dict)
    coordination: Any = None

    def start(self, name: str, kubeconfig: Path | None = None,
              args: tuple[str, ...] = ("--no-plugins",),
              env: dict[str, str] | None = None) -> OperatorProcess:
        op = OperatorProcess(kubeconfig or self.kubeconfig, (self.namespace,), {
            "RESULTSTORE_LEADER_ELECTION": "true", "POD_NAME": name,
            "RESULTSTORE_OPERATOR_NAMESPACE": self.lease_namespace,
            "RESULTSTORE_LEASE_NAME": self.lease_name, **LEASE_TIMING, **(env or {})},
            args=args)
        self.replicas[name] = op.start()
        return op

    def holder(self) -> str:
        try:
            lease = self.coordination.read_namespaced_lease(self.lease_name,
                                                            self.lease_namespace)
        except ApiException as exc:
            if exc.status == 404:
                return ""
            raise
        return str(lease.spec.holder_identity or "")

    def wait_leader(self, name: str, timeout: float = 30) -> None:
        eventually(lambda: self.holder().startswith(name + "_"), timeout,
                   f"{name} to hold the Lease (holder now: {self.holder()!r})")

    def create_stores(self, names: list[str]) -> None:
        for n in names:
            self.cluster.create_store(self.namespace, n, store_spec(self.pg, self.database,
                                                                    f"s_{n}"))

    def ready(self, names: list[str]) -> list[str]:
        out = []
        for n in names:
            cond = self.cluster.condition(self.namespace, n, "Ready")
            if cond and cond.get("status") == "True":
                out.append(n)
        return out


@pytest.fixture
def pair(kube: Any, api_client: client.ApiClient, namespace: str, other_namespace: str,
         postgres: Any, pg_database: Any) -> Iterator[Pair]:
    ensure_crd(api_client)
    cluster = Cluster(api_client)
    admin = create_admin(postgres, pg_database.name)
    # Only this admin's sessions log their statements (a role setting, read at connect).
    superuser_query(postgres, pg_database.name,
                    f"ALTER ROLE {admin.username} SET log_statement = 'all'")
    cluster.admin_secret(namespace, admin)
    p = Pair(cluster, namespace, other_namespace, f"leader-{uuid.uuid4().hex[:6]}", postgres,
             pg_database.name, admin, Path(kube.kubeconfig),
             coordination=client.CoordinationV1Api(api_client))
    try:
        yield p
    finally:
        live = [op for op in p.replicas.values() if op.proc and op.proc.poll() is None]
        try:
            cluster.remove_all_stores(namespace, operator_running=bool(live))
        finally:
            for op in p.replicas.values():
                op.stop()


def log_offset(pg: Any) -> int:
    return Path(pg.log_file).stat().st_size


def log_since(pg: Any, offset: int) -> str:
    with open(pg.log_file, errors="replace") as f:
        f.seek(offset)
        return f.read()


# --- (a) SIGKILL of the active replica mid-way -------------------------------------------------


def test_sigkill_of_the_leader_mid_way_every_store_ready_each_role_created_once(
        pair: Pair) -> None:
    offset = log_offset(pair.pg)
    a = pair.start("op-a")
    pair.wait_leader("op-a")
    b = pair.start("op-b")
    assert pair.holder().startswith("op-a_"), "the standby must not take a held Lease"
    names = [f"st{i:02d}" for i in range(STORES)]
    first, rest = names[:STORES // 2], names[STORES // 2:]
    pair.create_stores(first)
    eventually(lambda: len(pair.ready(first)) >= 5, READY_TIMEOUT, "op-a to make stores Ready")
    assert len(pair.ready(names)) < STORES  # mid-way
    a.kill()
    pair.create_stores(rest)
    pair.wait_leader("op-b", timeout=60)
    eventually(lambda: len(pair.ready(names)) == STORES, READY_TIMEOUT,
               f"all {STORES} stores Ready after the failover")
    assert "leadership acquired" in b.text(), b.tail()
    assert b.proc is not None and b.proc.poll() is None

    created, passwords = committed_role_statements(log_since(pair.pg, offset))
    users = {pair.cluster.binding(pair.namespace, n)["username"] for n in names}
    assert len(users) == STORES
    for user in users:
        assert created[user] == 1, (user, created[user])
        assert passwords[user] == 1, (user, passwords[user])
    assert all(count == 1 for count in created.values()), created
    assert all(count == 1 for count in passwords.values()), passwords


# --- (b) the webhook answers throughout ---------------------------------------------------------


def test_webhook_mutates_every_pod_while_the_leader_is_killed(pair: Pair) -> None:
    ports = {"op-a": free_port(), "op-b": free_port()}
    service = TcpProxy([("127.0.0.1", p) for p in ports.values()])
    config_name = f"resultstore-injector-failover-{uuid.uuid4().hex[:6]}"
    admission: Any = client.AdmissionregistrationV1Api(pair.cluster.api)
    try:
        def webhook_env(name: str) -> dict[str, str]:
            return {"RESULTSTORE_WEBHOOK_ENABLED": "true", "RESULTSTORE_WEBHOOK_HOST": "127.0.0.1",
                    "RESULTSTORE_WEBHOOK_PORT": str(ports[name]),
                    "RESULTSTORE_WEBHOOK_URL": f"https://127.0.0.1:{service.port}{WEBHOOK_PATH}",
                    "RESULTSTORE_WEBHOOK_CONFIG_NAME": config_name}

        a = pair.start("op-a", args=(), env=webhook_env("op-a"))
        pair.wait_leader("op-a")
        b = pair.start("op-b", args=(), env=webhook_env("op-b"))
        # Both replicas ready = both serve the webhook (readiness is "webhook serving").
        for op in (a, b):
            eventually(lambda: readyz(op) == 200, 60, "the replica to be ready")  # noqa: B023
        pair.create_stores(["web"])
        eventually(lambda: pair.ready(["web"]) == ["web"], 120, "store web Ready")
        core: Any = pair.cluster.core
        eventually(lambda: injected(core, pair.namespace, dry_run=True), 60,
                   "the API server to call the webhook")

        pods: list[str] = []
        deadline = time.monotonic() + 4
        killed = False
        while time.monotonic() < deadline:
            pods.append(create_worker(core, pair.namespace))
            if not killed and len(pods) >= 5:
                a.kill()
                killed = True
                deadline = time.monotonic() + 8  # through the standby's takeover
            time.sleep(0.2)
        assert killed and b.proc is not None and b.proc.poll() is None
        unmutated = [p for p in pods if not is_mutated(core, pair.namespace, p)]
        assert not unmutated, f"{len(unmutated)} of {len(pods)} pods admitted unmutated"
        pair.wait_leader("op-b", timeout=60)
    finally:
        service.close()
        try:
            admission.delete_mutating_webhook_configuration(config_name)
        except ApiException:
            pass


def readyz(op: OperatorProcess) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{op.health_port}/readyz",
                                    timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def worker_body() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "worker-", "labels": {INJECT_LABEL: "web"}},
            "spec": {"containers": [{"name": "worker", "image": "example/worker:1"}]}}


def injected(core: Any, namespace: str, dry_run: bool = False) -> bool:
    created = core.create_namespaced_pod(namespace, worker_body(),
                                         dry_run="All" if dry_run else None)
    return STATUS_ANNOTATION in (created.metadata.annotations or {})


def create_worker(core: Any, namespace: str) -> str:
    return str(core.create_namespaced_pod(namespace, worker_body()).metadata.name)


def is_mutated(core: Any, namespace: str, name: str) -> bool:
    pod = core.read_namespaced_pod(name, namespace)
    return STATUS_ANNOTATION in (pod.metadata.annotations or {})


# --- (c) graceful SIGTERM: handover without a freeze ----------------------------------------------


def test_sigterm_of_the_leader_hands_over_without_waiting_the_lease(pair: Pair) -> None:
    a = pair.start("op-a")
    pair.wait_leader("op-a")
    b = pair.start("op-b")
    pair.create_stores(["one"])
    eventually(lambda: pair.ready(["one"]) == ["one"], 120, "store one Ready")
    a.stop()  # SIGTERM, as the kubelet does in a rolling update
    assert a.proc is not None and a.proc.returncode == 0, a.tail()
    assert "Lease " + pair.lease_name + " released" in a.text(), a.tail()
    # The standby takes a released Lease at its next attempt, not after the lease duration:
    # its acquisition reason says so.
    pair.wait_leader("op-b", timeout=30)
    eventually(lambda: "leadership acquired" in b.text(), 10, "op-b to log its acquisition")
    acquired = next(line for line in b.text().splitlines() if "leadership acquired" in line)
    assert "(released)" in acquired, acquired
    # And it reconciles: a store created now becomes Ready.
    pair.create_stores(["two"])
    eventually(lambda: pair.ready(["two"]) == ["two"], 120, "store two Ready under op-b")


# --- (d) a partitioned leader stops before the other starts ------------------------------------


def test_partitioned_leader_stops_acting_before_the_standby_starts(pair: Pair,
                                                                  tmp_path: Path) -> None:
    config = yaml.safe_load(pair.kubeconfig.read_text())
    server = config["clusters"][0]["cluster"]["server"]
    host, port = server.removeprefix("https://").rsplit(":", 1)
    proxy = TcpProxy([(host, int(port))])
    config["clusters"][0]["cluster"]["server"] = f"https://{host}:{proxy.port}"
    partitioned = tmp_path / "kubeconfig-partitioned"
    partitioned.write_text(yaml.safe_dump(config))
    try:
        a = pair.start("op-a", kubeconfig=partitioned)
        pair.wait_leader("op-a")
        b = pair.start("op-b")
        pair.create_stores(["p1"])
        eventually(lambda: pair.ready(["p1"]) == ["p1"], 120, "store p1 Ready under op-a")
        proxy.cut()  # op-a's renewals (and everything else it sends the API) now fail
        assert a.proc is not None
        eventually(lambda: a.proc is not None and a.proc.poll() is not None, 30,
                   "the partitioned leader to exit")
        exited_before = "leadership acquired" not in b.text()
        assert a.proc.returncode == 3, a.tail()
        assert "leadership lost" in a.text()
        assert exited_before, "op-b acquired while op-a was still running"
        pair.wait_leader("op-b", timeout=30)
        pair.create_stores(["p2"])
        eventually(lambda: pair.ready(["p2"]) == ["p2"], 120, "store p2 Ready under op-b")
    finally:
        proxy.close()
