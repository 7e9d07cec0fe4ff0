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
  watched namespace; the leader's RSS after them compared with its RSS before them, both
  taken at the same phase: right after a full round of drift checks (every store checked
  once more, counted by the leader's timer reconciles), so that what the checks resuming
  after the burst add (kept admin sessions, compiled statements, the deferred checks) is in
  both figures, not in the second only. Rounds 1 and 2 run before the Secrets (round 2 vs
  1 is the control: what a round adds by itself), round 3 after them; the ratio is round 3
  vs round 2 (target "within 10%"). The Secret watch events the API server sent while the
  Secrets were created (`apiserver_watch_events_total`, resource secrets) and the open
  Secret watches by scope are recorded too: events = N x the cluster-wide (unselected,
  the controller-manager's) watches means the operator's namespaced, label-selected watch
  received none of them,
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
        self.metrics_port = free_port()
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
                 "RESULTSTORE_METRICS_ADDRESS": f"127.0.0.1:{self.metrics_port}",
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


def is_ready(obj: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


class ReadyWatch(threading.Thread):
    """The names of the namespace's stores that report Ready, from one watch stream.

    A watch, not a LIST every second: listing 1000 stores with their status once a second
    costs the API server (and this process) about as much CPU as a good part of the
    operator's work, on the same two cores, and would slow what it measures.
    """

    def __init__(self, custom: Any, namespace: str) -> None:
        super().__init__(daemon=True)
        self.custom = custom
        self.namespace = namespace
        self.ready: set[str] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        from kubernetes import watch

        version = ""
        while not self._halt.is_set():
            try:
                if not version:
                    listing = self.custom.list_namespaced_custom_object(
                        GROUP, VERSION, self.namespace, PLURAL)
                    self.ready = {o["metadata"]["name"] for o in listing["items"]
                                  if is_ready(o)}
                    version = listing["metadata"]["resourceVersion"]
                stream = watch.Watch().stream(
                    self.custom.list_namespaced_custom_object, GROUP, VERSION,
                    self.namespace, PLURAL, resource_version=version, timeout_seconds=60,
                    allow_watch_bookmarks=True)
                for event in stream:
                    obj = event["object"]
                    version = obj["metadata"]["resourceVersion"]
                    name = obj["metadata"]["name"]
                    if event["type"] != "DELETED" and is_ready(obj):
                        self.ready.add(name)
                    else:
                        self.ready.discard(name)
                    if self._halt.is_set():
                        return
            except client.exceptions.ApiException as exc:
                if exc.status != 410:  # 410 Gone: resume from a fresh listing
                    time.sleep(0.5)
                version = ""
            except Exception:  # noqa: BLE001 - a broken stream is re-listed
                time.sleep(0.5)
                version = ""

    def count(self, names: set[str]) -> int:
        return len(self.ready & names)

    def stop(self) -> None:
        self._halt.set()


def scrape(api: Any, path: str, port: int | None = None) -> str:
    """A Prometheus text exposition: the API server's (`path` on it) or a replica's."""
    if port is not None:
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return str(r.read().decode())
    method, url, headers, body, post = api.param_serialize(
        "GET", path, header_params={"Accept": "text/plain"}, auth_settings=["BearerToken"])
    response = api.call_api(method, url, headers, body, post, _request_timeout=30)
    response.read()
    return str(response.data.decode())


def counters(text: str, metric: str, labels: tuple[str, ...]) -> dict[str, float]:
    """`metric`'s samples summed by `labels` (joined with '/'), from an exposition."""
    import re

    out: dict[str, float] = {}
    pattern = re.compile(r'(\w+)="([^"]*)"')
    for line in text.splitlines():
        if not line.startswith(metric + "{"):
            continue
        head, _, value = line.rpartition(" ")
        found = dict(pattern.findall(head))
        key = "/".join(found.get(label, "") for label in labels).strip("/")
        out[key] = out.get(key, 0.0) + float(value)
    return out


def delta(after: dict[str, float], before: dict[str, float], top: int = 15) -> dict[str, int]:
    diff = {k: int(v - before.get(k, 0.0)) for k, v in after.items()}
    return dict(sorted(((k, v) for k, v in diff.items() if v > 0),
                       key=lambda kv: -kv[1])[:top])


API_REQUESTS = ("apiserver_request_total", ("verb", "resource", "subresource"))


def steady_rss(replica: Replica, settle: float = 10.0) -> float:
    """RSS after `settle` seconds of drift ticks at steady state."""
    time.sleep(settle)
    return replica.rss_mib()


def timer_reconciles(replica: Replica) -> int:
    """The replica's periodic-check reconciles so far (its metrics endpoint)."""
    found = counters(scrape(None, "/metrics", replica.metrics_port),
                     "resultstore_reconciliations_total", ("handler",))
    return int(found.get("timer", 0))


def rss_after_drift_round(replica: Replica, stores: int, timeout: float = 900) -> float:
    """RSS once the replica has checked every store once more (`stores` timer reconciles
    from now): the same phase before and after the unrelated Secrets."""
    start = timer_reconciles(replica)
    wait_for(lambda: timer_reconciles(replica) - start >= stores, timeout,
             "a round of drift checks", interval=1.0)
    return steady_rss(replica, settle=5.0)


WATCH_EVENTS = ("apiserver_watch_events_total", ("resource",))
WATCHERS = ("apiserver_longrunning_requests", ("verb", "resource", "scope"))


def secret_watchers(api: Any) -> dict[str, int]:
    """Open Secret watches by scope: the controller-manager's two are cluster-wide and
    unselected (garbage collector, service-account tokens); the operator's is namespaced."""
    found = counters(scrape(api, "/metrics"), *WATCHERS)
    return {scope: int(found.get(f"WATCH/secrets/{scope}", 0))
            for scope in ("cluster", "namespace")}


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
    parser.add_argument("--keep-logs", type=Path, default=None, metavar="DIR",
                        help="copy each replica's log into DIR before it is removed")
    args = parser.parse_args(argv)

    cluster = cluster_from_environment()
    pg = PostgresServer(durable=False, max_connections=400)
    replicas: list[Replica] = []
    watcher: ReadyWatch | None = None
    try:
        cluster.start()
        pg.start()
        api, core, custom, namespace, operator_namespace, _pw = prepare(cluster, pg)
        watcher = ReadyWatch(custom, namespace)
        watcher.start()
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
        requests_before = counters(scrape(api, "/metrics"), *API_REQUESTS)
        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda n: custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, store_body(n, pg, "bench")), names))
        created = time.monotonic() - t0
        wanted = set(names)
        wait_for(lambda: watcher.count(wanted) == len(names), 1800,
                 f"{args.stores} stores Ready", interval=0.2)
        total = time.monotonic() - t0
        # What the burst cost the API server, and what the leader did meanwhile (drift
        # checks of the stores already Ready compete with the provisioning of the others).
        requests = delta(counters(scrape(api, "/metrics"), *API_REQUESTS), requests_before)
        reconciles: dict[str, float] = {}
        current = leader if leader.proc.poll() is None else standby
        if current.proc.poll() is None:
            reconciles = counters(scrape(api, "/metrics", current.metrics_port),
                                  "resultstore_reconciliations_total", ("handler", "outcome"))
        # A leader that lost its Lease under load exits (the standby finished the work):
        # its RSS figures would then be those of a dead process, so say so.
        leader_exit = leader.proc.poll()
        if leader_exit is not None:
            # the standby took over mid-burst: it is the leader whose figures follow
            leader, standby = standby, leader
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
            "standby_rss_mib": standby.rss_mib() if standby.proc.poll() is None else None,
            "leader_exit_code_at_ready": leader_exit,
            "leader_at_ready": leader.name,
            "leader_reconciles_at_ready": {k: int(v) for k, v in reconciles.items() if v},
            "api_requests_during_burst": requests,
            "operator_workers": args.workers,
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
        if args.unrelated_secrets:
            every = args.stores + args.single
            # Two rounds without the Secrets: the second is the control (what a round
            # adds by itself), and the baseline of the ratio.
            result["operator_rss_after_drift_round_1_mib"] = rss_after_drift_round(
                leader, every)
            before = rss_after_drift_round(leader, every)
            result["operator_rss_after_drift_round_2_mib"] = before
            result["secret_watchers"] = secret_watchers(api)
            events_before = counters(scrape(api, "/metrics"), *WATCH_EVENTS)
            took = create_unrelated_secrets(core, namespace, args.unrelated_secrets)
            result["unrelated_secrets"] = args.unrelated_secrets
            result["unrelated_secrets_create_seconds"] = round(took, 1)
            time.sleep(2)  # the last events reach the watchers
            result["secret_watch_events_sent_during_creation"] = delta(
                counters(scrape(api, "/metrics"), *WATCH_EVENTS), events_before
            ).get("secrets", 0)
            # the old figure (10 s after the Secrets, against 10 s after Ready), kept for
            # comparison with earlier runs: it also holds the drift checks' first round
            result["operator_steady_rss_with_secrets_mib"] = steady_rss(leader)
            result["rss_with_secrets_ratio_vs_ready"] = round(
                result["operator_steady_rss_with_secrets_mib"] / rss_steady, 3)
            after = rss_after_drift_round(leader, every)
            result["operator_rss_after_drift_round_3_with_secrets_mib"] = after
            # round 3 (with the Secrets) against round 2 (without), same phase
            result["rss_with_secrets_ratio"] = round(after / before, 3)
            result["rss_round_2_vs_round_1_ratio"] = round(
                before / result["operator_rss_after_drift_round_1_mib"], 3)
        if args.failover and leader_exit is not None:
            # the SIGKILLed replica is not restarted here: no standby is left to measure
            result["failover"] = "not measured: the leader already changed during the burst"
        elif args.failover:
            result.update(measure_failover(custom, namespace, pg, leader, standby))
            wanted.add("after-failover")
            wait_for(lambda: watcher.count(wanted) == len(wanted), 1800,
                     "every store Ready under the new leader", interval=0.2)
            # The new leader listed the namespace with the unrelated Secrets already there.
            result["new_leader_steady_rss_mib"] = steady_rss(standby)
            result["new_leader_peak_rss_mib"] = round(standby.sampler.peak / 2**20, 1)
        print(json.dumps(result, indent=2))
        return 0
    finally:
        if watcher is not None:
            watcher.stop()
        for replica in reversed(replicas):
            replica.stop()
            if args.keep_logs is not None and replica.log_path.exists():
                args.keep_logs.mkdir(parents=True, exist_ok=True)
                shutil.copy(replica.log_path, args.keep_logs / f"{replica.name}.log")
            replica.remove_files()
        pg.destroy()
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
