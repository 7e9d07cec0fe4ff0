"""Operator scale measurement: apply-to-Ready latency, time for N stores, RSS, failover.

    .venv/bin/python -m bench.operator_scale [--stores 1000] [--single 15]
        [--unrelated-secrets 5000] [--no-failover]

Starts a private control plane (or uses RESULTSTORE_E2E_KUBECONFIG) and a private
PostgreSQL, installs the CRD, runs two `resultstore-operator` replicas as real processes
(leader election on, one Lease; the first to start leads) watching one namespace, then
measures

* p50/p90 apply-to-Ready for one store (created one after another, each polled at 50 ms),
* the wall time for `--stores` stores created at once to all report Ready,
* the leader's peak RSS (sampled every 100 ms) and its steady RSS after the stores settled,
* with `--unrelated-secrets N`: N Secrets that are not the operator's, created in the
  watched namespace; the leader's steady RSS after them (the Secret watch is selected on
  the server, so the target is "within 10%"),
* failover: SIGKILL of the leader at the moment a new store is created -> that store Ready
  (the standby's first reconcile; the standby waits out the lease duration, 10 s default),
  and the new leader's steady RSS once it has resumed every store.

It prints one JSON document; numbers are for the closing note, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import psycopg
from kubernetes import client, config

from resultstore_devtools.controlplane import cluster_from_environment
from resultstore_devtools.postgres import PostgresServer
from resultstore_devtools.procs import free_port, wait_for
from resultstore_operator.crd import build_crd
from resultstore_operator.spec import GROUP, PLURAL, VERSION

ROOT = Path(__file__).resolve().parents[1]


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.1):
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                return

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=2)


def ready(custom: Any, namespace: str, name: str) -> bool:
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


def store_body(name: str, pg: PostgresServer, database: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ResultStore",
            "metadata": {"name": name},
            "spec": {"database": {"host": pg.host, "port": pg.port, "name": database,
                                  "sslMode": "disable", "adminSecretRef": {"name": "admin"}},
                     "schema": name.replace("-", "_"), "deletionPolicy": "Delete"}}


class Replica:
    """One `resultstore-operator` process of the pair, with its RSS sampler and log."""

    def __init__(self, name: str, env: dict[str, str], namespace: str) -> None:
        self.name = name
        self.port = free_port()
        # A private TMPDIR, removed at stop: the kubernetes client writes the kubeconfig's
        # client key to temporary files it deletes only at a clean exit, and the failover
        # measurement SIGKILLs the leader.
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f"operator-scale-{namespace}-{name}-"))
        self.log_path = self.tmp_dir / "operator.log"
        log = open(self.log_path, "wb")
        # With the rollout (its Secret watch is what unrelated Secrets could cost); the
        # webhook is off (no URL/Service to register here).
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "resultstore-operator")],
            env={**env, "POD_NAME": name, "RESULTSTORE_HEALTH_ADDRESS": f"127.0.0.1:{self.port}",
                 "TMPDIR": str(self.tmp_dir)},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.sampler = RssSampler(self.proc.pid)
        self.sampler.start()

    def healthy(self) -> bool:
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1):
                return True
        except OSError:
            return False

    def leading(self) -> bool:
        return "leadership acquired" in self.log_path.read_text(errors="replace")

    def rss_mib(self) -> float:
        return round(psutil.Process(self.proc.pid).memory_info().rss / 2**20, 1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.sampler.stop()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def remove_files(self) -> None:
        """The log and the client-key copies (called once the run no longer reads the log)."""
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def count_ready(custom: Any, namespace: str, names: set[str]) -> int:
    items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
    return sum(1 for o in items if o["metadata"]["name"] in names and any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (o.get("status") or {}).get("conditions") or []))


def steady_rss(replica: Replica, settle: float = 10.0) -> float:
    """RSS after `settle` seconds of drift ticks at steady state."""
    time.sleep(settle)
    return replica.rss_mib()


def create_unrelated_secrets(core: Any, namespace: str, count: int) -> float:
    """`count` Secrets that are nobody's business of the operator (1 KiB each)."""
    payload = {"blob": "x" * 1024}
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: core.create_namespaced_secret(namespace, {
            "metadata": {"name": f"unrelated-{i:05d}", "labels": {"app": "someone-else"}},
            "stringData": payload}), range(count)))
    return time.monotonic() - t0


def measure_failover(custom: Any, namespace: str, pg: PostgresServer, leader: Replica,
                     standby: Replica) -> dict[str, float]:
    """SIGKILL the leader and create a store at once. Seconds until the standby logs its
    acquisition, and until that store is Ready (the standby started Kopf and reconciled it;
    it resumes every other store at the same time, so this includes queueing behind them)."""
    t0 = time.monotonic()
    leader.stop(signal.SIGKILL)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                           store_body("after-failover", pg, "bench"))
    wait_for(standby.leading, 120, "the standby to acquire the Lease", interval=0.05)
    acquired = time.monotonic() - t0
    wait_for(partial(ready, custom, namespace, "after-failover"), 600,
             "the standby's first reconcile", interval=0.05)
    return {"failover_kill_to_acquired_seconds": round(acquired, 2),
            "failover_kill_to_new_store_ready_seconds": round(time.monotonic() - t0, 2)}


def prepare(cluster: Any, pg: PostgresServer) -> tuple[Any, Any, Any, str, str, str]:
    """Database, admin role, CRD, the watched namespace with its admin Secret, and the
    operator's namespace (for the Lease)."""
    pg.create_database("bench")
    admin_pw = secrets.token_urlsafe(16)
    with psycopg.connect(pg.dsn("bench"), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE bench_admin LOGIN CREATEROLE PASSWORD '{admin_pw}'")
        conn.execute("GRANT CREATE ON DATABASE bench TO bench_admin")
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    ext: Any = client.ApiextensionsV1Api(api)
    core: Any = client.CoreV1Api(api)
    custom: Any = client.CustomObjectsApi(api)
    try:
        ext.create_custom_resource_definition(build_crd())
    except client.exceptions.ApiException as exc:
        if exc.status != 409:
            raise
    namespace = "bench-" + secrets.token_hex(3)
    operator_namespace = namespace + "-op"
    for ns in (namespace, operator_namespace):
        core.create_namespace({"metadata": {"name": ns}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "admin", "labels": {
        "resultstore.dev/admin-credentials": "true"}}, "stringData": {
        "username": "bench_admin", "password": admin_pw}})
    time.sleep(2)  # the CRD becomes served
    return api, core, custom, namespace, operator_namespace, admin_pw


def singles(custom: Any, namespace: str, pg: PostgresServer, count: int) -> list[float]:
    out = []
    for i in range(count):
        name = f"single-{i}"
        t0 = time.monotonic()
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                               store_body(name, pg, "bench"))
        wait_for(partial(ready, custom, namespace, name), 60, name, interval=0.05)
        out.append(time.monotonic() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", type=int, default=1000)
    parser.add_argument("--single", type=int, default=15)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--unrelated-secrets", type=int, default=5000)
    parser.add_argument("--no-failover", dest="failover", action="store_false")
    args = parser.parse_args(argv)

    cluster = cluster_from_environment()
    pg = PostgresServer(durable=False, max_connections=400)
    replicas: list[Replica] = []
    try:
        cluster.start()
        pg.start()
        _api, core, custom, namespace, operator_namespace, _pw = prepare(cluster, pg)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RESULTSTORE_")}
        env.update(KUBECONFIG=str(cluster.kubeconfig), RESULTSTORE_WATCH_NAMESPACES=namespace,
                   RESULTSTORE_WORKERS=str(args.workers), RESULTSTORE_LEADER_ELECTION="true",
                   RESULTSTORE_OPERATOR_NAMESPACE=operator_namespace,
                   RESULTSTORE_WEBHOOK_ENABLED="false")
        leader = Replica("op-a", env, namespace)
        replicas.append(leader)
        wait_for(leader.healthy, 60, "the operator")
        wait_for(leader.leading, 60, "op-a to lead")
        standby = Replica("op-b", env, namespace)
        replicas.append(standby)
        wait_for(standby.healthy, 60, "the standby")
        idle_rss = leader.rss_mib()

        single = singles(custom, namespace, pg, args.single)
        names = [f"s{i:04d}" for i in range(args.stores)]
        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda n: custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, store_body(n, pg, "bench")), names))
        created = time.monotonic() - t0
        wanted = set(names)
        wait_for(lambda: count_ready(custom, namespace, wanted) == len(names), 1800,
                 f"{args.stores} stores Ready", interval=1.0)
        total = time.monotonic() - t0
        rss_steady = steady_rss(leader)
        result: dict[str, Any] = {
            "stores": args.stores,
            "all_ready_seconds": round(total, 1),
            "create_requests_seconds": round(created, 1),
            "single_apply_to_ready_p50_seconds": round(statistics.median(single), 3),
            "single_apply_to_ready_p90_seconds": round(
                sorted(single)[int(0.9 * (len(single) - 1))], 3),
            "operator_idle_rss_mib": idle_rss,
            "operator_peak_rss_mib": round(leader.sampler.peak / 2**20, 1),
            "operator_steady_rss_mib": rss_steady,
            "standby_rss_mib": standby.rss_mib(),
            "operator_workers": args.workers,
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
        if args.unrelated_secrets:
            took = create_unrelated_secrets(core, namespace, args.unrelated_secrets)
            result["unrelated_secrets"] = args.unrelated_secrets
            result["unrelated_secrets_create_seconds"] = round(took, 1)
            result["operator_steady_rss_with_secrets_mib"] = steady_rss(leader)
            result["rss_with_secrets_ratio"] = round(
                result["operator_steady_rss_with_secrets_mib"] / rss_steady, 3)
        if args.failover:
            result.update(measure_failover(custom, namespace, pg, leader, standby))
            wanted.add("after-failover")
            wait_for(lambda: count_ready(custom, namespace, wanted) == len(wanted), 1800,
                     "every store Ready under the new leader", interval=1.0)
            # The new leader listed the namespace with the unrelated Secrets already there.
            result["new_leader_steady_rss_mib"] = steady_rss(standby)
            result["new_leader_peak_rss_mib"] = round(standby.sampler.peak / 2**20, 1)
        print(json.dumps(result, indent=2))
        return 0
    finally:
        for replica in reversed(replicas):
            replica.stop()
            replica.remove_files()
        pg.destroy()
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
