"""Operator scale measurement: apply-to-Ready latency, time for N stores, peak RSS.

    .venv/bin/python -m bench.operator_scale [--stores 200] [--single 15]

Starts a private control plane (or uses RESULTSTORE_E2E_KUBECONFIG) and a private
PostgreSQL, installs the CRD, runs `resultstore-operator` as a real process watching one
namespace, then measures

* p50/p90 apply-to-Ready for one store (created one after another, each polled at 50 ms),
* the wall time for `--stores` stores created at once to all report Ready,
* the operator process's peak RSS (sampled every 100 ms for the whole run).

It prints one JSON document; numbers are for the closing note, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", type=int, default=200)
    parser.add_argument("--single", type=int, default=15)
    parser.add_argument("--workers", type=int, default=16)
    args = parser.parse_args(argv)

    cluster = cluster_from_environment()
    pg = PostgresServer(durable=False, max_connections=400)
    op: subprocess.Popen[bytes] | None = None
    sampler: RssSampler | None = None
    try:
        cluster.start()
        pg.start()
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
        core.create_namespace({"metadata": {"name": namespace}})
        core.create_namespaced_secret(namespace, {"metadata": {"name": "admin", "labels": {
            "resultstore.dev/admin-credentials": "true"}}, "stringData": {
            "username": "bench_admin", "password": admin_pw}})
        time.sleep(2)  # the CRD becomes served

        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RESULTSTORE_")}
        env.update(KUBECONFIG=str(cluster.kubeconfig), RESULTSTORE_WATCH_NAMESPACES=namespace,
                   RESULTSTORE_HEALTH_ADDRESS=f"127.0.0.1:{port}",
                   RESULTSTORE_WORKERS=str(args.workers))
        log = open(Path("/tmp") / f"operator-scale-{namespace}.log", "wb")
        op = subprocess.Popen([str(Path(sys.executable).parent / "resultstore-operator"),
                               "--no-plugins"], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
        sampler = RssSampler(op.pid)
        sampler.start()

        def healthy() -> bool:
            import urllib.request
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    return True
            except OSError:
                return False

        wait_for(healthy, 60, "the operator")
        idle_rss = psutil.Process(op.pid).memory_info().rss

        singles = []
        for i in range(args.single):
            name = f"single-{i}"
            t0 = time.monotonic()
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                   store_body(name, pg, "bench"))
            wait_for(partial(ready, custom, namespace, name), 60, name, interval=0.05)
            singles.append(time.monotonic() - t0)

        names = [f"s{i:03d}" for i in range(args.stores)]
        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda n: custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, store_body(n, pg, "bench")), names))
        created = time.monotonic() - t0

        def all_ready() -> bool:
            items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace,
                                                         PLURAL)["items"]
            count = sum(1 for o in items if o["metadata"]["name"] in set(names) and any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in (o.get("status") or {}).get("conditions") or []))
            return count == len(names)

        wait_for(all_ready, 900, f"{args.stores} stores Ready", interval=0.5)
        total = time.monotonic() - t0
        time.sleep(5)  # a few drift ticks at steady state
        result = {
            "stores": args.stores,
            "all_ready_seconds": round(total, 1),
            "create_requests_seconds": round(created, 1),
            "single_apply_to_ready_p50_seconds": round(statistics.median(singles), 3),
            "single_apply_to_ready_p90_seconds": round(
                sorted(singles)[int(0.9 * (len(singles) - 1))], 3),
            "operator_idle_rss_mib": round(idle_rss / 2**20, 1),
            "operator_peak_rss_mib": round(sampler.peak / 2**20, 1),
            "operator_workers": args.workers,
            "cpus": os.cpu_count(),
        }
        print(json.dumps(result, indent=2))
        return 0
    finally:
        if sampler is not None:
            sampler.stop()
        if op is not None and op.poll() is None:
            op.send_signal(signal.SIGTERM)
            try:
                op.wait(timeout=20)
            except subprocess.TimeoutExpired:
                op.kill()
        pg.destroy()
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
