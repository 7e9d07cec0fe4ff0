"""The demo's local target (this machine) and the story both targets run; `scripts/demo`.

Usage and the steps: demo_args.py (also what --help prints). The story's shared parts (output,
kubectl, the examples' edits) are in demo_story.py; the cluster target in demo_cluster.py.

Locally (the default) the control plane has no nodes, so the operator runs as a local process
with its ServiceAccount's token (RBAC constrains it exactly as in-cluster) and the worker
pod's container runs here through kubelet.py.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .demo_args import parse_args
from .demo_report import format_table, kube_client, leave_workdir
from .demo_story import (
    ADMIN_USER,
    DATABASE,
    OPERATOR_NS,
    OPERATOR_SA,
    ROOT,
    STORE,
    WORKER_LABEL,
    Broker,
    Database,
    Kubectl,
    Target,
    condition,
    detail,
    elapsed,
    examples,
    point_examples,
    say,
    show_pod,
    step,
)
from .kubelet import PodRunner, SecretMirror, api_fetcher
from .procs import eventually, free_port, http_ok

__all__ = ["LocalTarget", "main", "parse_args", "run"]


# ------------------------------------------------------------------------------ local target


@dataclass
class LocalTarget:
    """Control plane, PostgreSQL and Redis on this machine; operator and worker as processes."""

    keep: bool
    stack: contextlib.ExitStack
    work: Path
    namespace: str = "demo"
    rotation_timeout: float = 180.0
    kubectl: Kubectl = field(init=False)

    def start_cluster(self) -> None:
        from .binaries import ensure_all
        from .controlplane import ControlPlane

        with step("Local control plane (etcd, kube-apiserver, kube-controller-manager)"):
            tools = ensure_all()
            self.cluster = ControlPlane()
            self.cluster.start()
            if not self.keep:
                self.stack.callback(self.cluster.stop)
            self.kubectl = Kubectl(str(tools.kubectl), self.cluster.kubeconfig)
            detail(self.kubectl("version").strip())

    def start_services(self) -> tuple[Database, Broker]:
        import psycopg

        from .postgres import PostgresServer
        from .redis import RedisServer

        with step("PostgreSQL and Redis on 127.0.0.1"):
            pg = PostgresServer(durable=True)
            pg.start()
            if not self.keep:
                self.stack.callback(pg.destroy)
            redis = RedisServer()
            redis.start()
            if not self.keep:
                self.stack.callback(redis.destroy)
            pg.create_database(DATABASE)
            password = secrets.token_urlsafe(18)
            with psycopg.connect(pg.dsn(DATABASE), autocommit=True) as conn:
                conn.execute(f"CREATE ROLE {ADMIN_USER} LOGIN CREATEROLE "
                             f"PASSWORD '{password}'")
                conn.execute(f"GRANT CREATE ON DATABASE {DATABASE} TO {ADMIN_USER}")
            detail(f"PostgreSQL {pg.host}:{pg.port} database {DATABASE!r}; admin role "
                   f"{ADMIN_USER!r} (CREATEROLE, CREATE on the database; not a superuser)")
            detail(f"Redis {redis.url} (the Celery broker)")
        self.pg_url = pg.url(DATABASE)
        db = Database(pg.host, pg.port, pg.host, pg.port, DATABASE, ADMIN_USER, password,
                      superuser_dsn=pg.dsn(DATABASE))
        return db, Broker(redis.url, redis.url)

    def install_operator(self) -> None:
        kubectl = self.kubectl
        with step("Install the CRD, RBAC and webhook: kubectl apply -k manifests/"):
            detail(kubectl("apply", "--server-side", "-k", str(ROOT / "manifests")))
            kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/resultstores.resultstore.dev")
            # No nodes here: the Deployment's pod cannot run, so the operator runs locally
            # with the same ServiceAccount identity (RBAC applies to every call it makes).
            kubectl("-n", OPERATOR_NS, "scale", "deployment/resultstore-operator",
                    "--replicas=0")
            sa_kubeconfig = self.cluster.service_account_kubeconfig(
                OPERATOR_NS, OPERATOR_SA, self.work / "operator.kubeconfig", duration="2h")

        with step("Start the operator as system:serviceaccount:resultstore-system:"
                  "resultstore-operator"):
            self.op_log = self.work / "operator.log"
            webhook_port, health_port = free_port(), free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("RESULTSTORE_")}
            env.update({
                "KUBECONFIG": str(sa_kubeconfig),
                "RESULTSTORE_OPERATOR_NAMESPACE": OPERATOR_NS,
                "RESULTSTORE_HEALTH_ADDRESS": f"127.0.0.1:{health_port}",
                "RESULTSTORE_WEBHOOK_HOST": "127.0.0.1",
                "RESULTSTORE_WEBHOOK_PORT": str(webhook_port),
                "RESULTSTORE_WEBHOOK_URL": f"https://127.0.0.1:{webhook_port}/mutate-pods",
                "RESULTSTORE_ROTATION_GRACE": "5",
                "RESULTSTORE_TICK_INTERVAL": "1",
                "RESULTSTORE_CLEANUP_IMAGE": "celery-resultstore:0.1.0",
            })
            log = open(self.op_log, "ab")  # noqa: SIM115 - owned by the child
            operator = subprocess.Popen(
                [str(Path(sys.executable).parent / "resultstore-operator"), "--all-namespaces"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()

            def stop_operator() -> None:
                from .procs import kill_group

                kill_group(operator, timeout=20)

            self.stack.callback(stop_operator)

            def healthy() -> bool:
                if operator.poll() is not None:
                    raise RuntimeError("operator exited:\n" + self.operator_logs())
                return http_ok(f"http://127.0.0.1:{health_port}/healthz")

            eventually(healthy, 60, "the operator's health endpoint")

            def webhook_registered() -> bool:
                hooks = kubectl.json("mutatingwebhookconfigurations")["items"]
                return any(
                    (w.get("clientConfig") or {}).get("url", "").startswith(
                        f"https://127.0.0.1:{webhook_port}")
                    for h in hooks for w in h.get("webhooks") or [])

            eventually(webhook_registered, 60, "the operator to register its webhook")
            detail(f"operator healthy; webhook served on https://127.0.0.1:{webhook_port} "
                   "(self-signed CA kept in a Secret)")

    def operator_logs(self) -> str:
        return self.op_log.read_text(errors="replace")[-4000:]

    def api_client(self) -> Any:
        return kube_client(self.cluster.kubeconfig, self.work)

    def run_worker(self, deployment: dict[str, Any], broker: Broker) -> dict[str, Any]:
        kubectl = self.kubectl
        with step("The worker Deployment: its pod admitted and mutated by the webhook"):
            detail(kubectl("apply", "-n", self.namespace, "-f", "-",
                           stdin=yaml.safe_dump(deployment)))

            def pod() -> dict[str, Any] | None:
                items = kubectl.json("-n", self.namespace, "pods", "-l", WORKER_LABEL)["items"]
                return items[0] if items else None

            worker_pod = eventually(pod, 60, "the replicaset controller to create the pod")
            detail(f"pod {worker_pod['metadata']['name']} (Pending: this control plane "
                   "has no nodes)")
            show_pod(worker_pod)

        with step("Run that pod's container here, as the kubelet would"):
            # The "image" is this virtualenv: its bin/ first on PATH, like the image's.
            image_path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
            pod_root = self.work / "worker-pod"  # with the demo's other files (removed)
            pod_root.mkdir(mode=0o700)
            self.runner = PodRunner(worker_pod, api_fetcher(self.api_client()), root=pod_root,
                                    resync_period=1.0, extra_env={"PATH": image_path})
            self.worker_log = self.work / "worker.log"
            self.runner.start(log=self.worker_log)
            self.stack.callback(self.runner.stop)
            detail(f"command: {' '.join(self.runner.command())}")
            detail(f"CELERY_RESULT_BACKEND={self.runner.environment()['CELERY_RESULT_BACKEND']}")
            asked = self.runner.environment(translate=False)["CELERY_RESULT_BACKEND"]
            detail(_wrapped(f"(the pod asks for {asked}: its container runs here as a plain "
                            "process, so this stand-in kubelet publishes the Secret volume "
                            f"under {pod_root} and rewrites the path; on a node the "
                            "container reads the Secret mounted at that path itself)"))
            eventually(lambda: "ready." in self.worker_log.read_text(errors="replace"), 90,
                       "the Celery worker to be ready")
        return worker_pod

    def worker_ready(self, client: Callable[[], Any]) -> None:
        return None

    def worker_secret_updates(self) -> str:
        return (f"the worker reloaded its mounted Secret {self.runner.secret_updates} "
                "time(s) without a restart")

    def keep_message(self, db: Database, broker: Broker) -> str:
        return (f"export KUBECONFIG={self.cluster.kubeconfig}\nPostgreSQL: {self.pg_url}\n"
                f"Redis: {broker.local_url}\nLogs: {self.work}")

    def teardown(self) -> None:
        self.runner.stop()


# ------------------------------------------------------------------------------ the story


def _wrapped(text: str) -> str:
    """An explanation under a detail line, wrapped (paths are never broken)."""
    return textwrap.fill(text, 88, initial_indent="  ", subsequent_indent="  ",
                         break_long_words=False, break_on_hyphens=False)


def run(args: argparse.Namespace) -> None:
    """The story, then the work directory (Secret copies, a token) removed or named."""
    work = Path(tempfile.mkdtemp(prefix="resultstore-demo-"))
    failed = True
    try:
        _story(args, work)
        failed = False
    finally:  # also on failure and Ctrl-C (main turns SIGTERM into one)
        say("\n" + "\n".join(leave_workdir(work, keep=args.keep, failed=failed)))


def _story(args: argparse.Namespace, work: Path) -> None:
    stack = contextlib.ExitStack()
    with stack:
        target: Target
        if args.kubeconfig:
            from .demo_cluster import ClusterTarget

            target = ClusterTarget(args, stack, work)
        else:
            target = LocalTarget(args.keep, stack, work)
        target.start_cluster()
        db, broker = target.start_services()
        target.install_operator()
        kubectl, namespace = target.kubectl, target.namespace

        with step(f"kubectl apply -f manifests/examples/ (namespace {namespace!r})"):
            kubectl("apply", "-f", "-", stdin=yaml.safe_dump(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}))
            docs = point_examples(examples(), db, broker)
            # Store first, worker after it is Ready: the webhook injects only Ready stores.
            workers = [d for d in docs if d["kind"] == "Deployment"]
            first = [d for d in docs if d["kind"] != "Deployment"]
            detail(kubectl("apply", "-n", namespace, "-f", "-",
                           stdin=yaml.safe_dump_all(first)))
            applied = time.monotonic()

            def ready() -> dict[str, Any] | None:
                store = kubectl.json("-n", namespace, f"rstore/{STORE}")
                cond = condition(store, "Ready")
                return store if cond and cond.get("status") == "True" else None

            try:
                store = eventually(ready, 120, f"ResultStore {STORE} to become Ready")
            except TimeoutError:
                detail(kubectl("-n", namespace, "describe", f"rstore/{STORE}", check=False))
                detail(target.operator_logs())
                raise
            detail(f"ResultStore Ready {time.monotonic() - applied:.1f}s after apply")
            detail(kubectl("-n", namespace, "get", "rstore"))
            for cond in store["status"]["conditions"]:
                detail(f"  {cond['type']:<18} {cond['status']:<5} {cond.get('reason', '')}")

        target.run_worker(workers[0], broker)

        from celery import Celery, group

        mirror = SecretMirror(api_fetcher(target.api_client()), namespace,
                              f"{STORE}-resultstore", work / "client-binding", mode=0o600,
                              transform=db.localize)
        mirror.start()
        if not mirror.data:
            raise RuntimeError(f"Secret {namespace}/{STORE}-resultstore does not exist")
        stack.callback(mirror.stop)
        client_app = Celery("demo-client", broker=broker.local_url,
                            backend=f"resultstore://{mirror.path}")
        client_app.conf.update(result_extended=True, task_serializer="json",
                               result_serializer="json", accept_content=["json"])
        add = client_app.signature("tasks.add")
        target.worker_ready(lambda: add.clone((0, 0)).delay())

        with step("Tasks, a group and a failing task through the injected backend"):
            detail(f"client backend resultstore://{mirror.path}")
            detail(_wrapped("(the demo's own client reads this machine's kubelet-style mirror "
                            "of the same Secret, the database address rewritten to the one "
                            "reachable from here, so it follows a rotation as the worker "
                            "does)"))
            result = add.clone((2, 3)).delay()
            detail(f"add(2, 3) -> {result.get(timeout=120)}   (task {result.id})")
            started = time.monotonic()
            grp = group(add.clone((i, i)) for i in range(100)).apply_async()
            values = grp.get(timeout=120)
            detail(f"group of 100 adds -> sum {sum(values)} in "
                   f"{time.monotonic() - started:.2f}s")
            failing = add.clone((1, "one")).delay()
            failing.get(timeout=60, propagate=False)
            detail(f"add(1, 'one') -> {failing.state}: {failing.result!r}")

        import psycopg

        with step("Results queried with SQL, as the store's own least-privilege role"):
            binding = dict(mirror.data)
            with psycopg.connect(binding["uri"]) as conn:
                rows = conn.execute(
                    "SELECT status, count(*) FROM celery_taskmeta GROUP BY status "
                    "ORDER BY status").fetchall()
                detail(f"$ psql \"$(kubectl -n {namespace} get secret {STORE}-resultstore -o "
                       "jsonpath='{.data.uri}' | base64 -d)\"")
                detail("=> SELECT status, count(*) FROM celery_taskmeta GROUP BY status;")
                detail("\n".join(format_table(["status", "count"], rows)))
                columns = ["task_id", "name", "status", "date_done", "worker"]
                failed_rows = conn.execute(
                    f"SELECT {', '.join(columns)} FROM celery_taskmeta "
                    "WHERE task_id = %s", (failing.id,)).fetchall()
                detail(f"=> SELECT {', '.join(columns)} FROM celery_taskmeta "
                       "WHERE task_id = '<the failing task>';")
                detail("\n".join(format_table(columns, failed_rows)))
                who = conn.execute("SELECT current_user, current_schema()").fetchone()
                assert who is not None
                detail(f"   connected as {who[0]!r}, schema {who[1]!r} "
                       f"(Secret keys: {', '.join(sorted(binding))})")

        with step("Credential rotation while tasks keep flowing"):
            old = dict(mirror.data)
            stop = threading.Event()
            counts = {"ok": 0, "failed": 0}
            errors: list[str] = []

            def traffic() -> None:
                while not stop.is_set():
                    try:
                        assert add.clone((1, 1)).delay().get(timeout=60) == 2
                        counts["ok"] += 1
                    except Exception as exc:  # noqa: BLE001 - counted and shown
                        counts["failed"] += 1
                        errors.append(repr(exc)[:200])

            thread = threading.Thread(target=traffic, daemon=True)
            thread.start()
            time.sleep(2)
            kubectl("-n", namespace, "annotate", "--overwrite", f"rstore/{STORE}",
                    f"resultstore.dev/rotate={int(time.time())}")

            def rotated() -> bool:
                store = kubectl.json("-n", namespace, f"rstore/{STORE}")
                creds = (store.get("status") or {}).get("credentials") or {}
                return bool(creds.get("phase") == "Stable"
                            and creds.get("activeRole") != old["username"])

            try:
                eventually(rotated, target.rotation_timeout, "the rotation to complete")
            except TimeoutError:
                store = kubectl.json("-n", namespace, f"rstore/{STORE}")
                detail(json.dumps(store.get("status"), indent=1, default=str))
                detail(target.operator_logs())
                raise
            time.sleep(2)
            stop.set()
            thread.join(timeout=90)
            secret = kubectl.json("-n", namespace, f"secret/{STORE}-resultstore")
            new_user = base64.b64decode(secret["data"]["username"]).decode()
            detail(f"role {old['username']} -> {new_user}; {target.worker_secret_updates()}")
            detail(f"tasks during the rotation: {counts['ok']} ok, {counts['failed']} failed")
            try:
                psycopg.connect(old["uri"], connect_timeout=5).close()
                old_login = "STILL WORKS"
            except psycopg.OperationalError:
                old_login = "refused"
            detail(f"login with the previous password: {old_login}")
            events = kubectl("-n", namespace, "get", "events", "--field-selector",
                             f"involvedObject.name={STORE}", "--sort-by=.lastTimestamp")
            detail("\n".join(events.splitlines()[-8:]))
            if counts["failed"] or old_login != "refused":
                raise RuntimeError(f"rotation was not clean: {errors[:3]}")

        with step("kubectl get rstore"):
            detail(kubectl("-n", namespace, "get", "rstore", "-o", "wide"))

        if args.keep:
            say("\nLeft running.\n" + target.keep_message(db, broker))
            stack.pop_all()
            return

        with step("Tear down (deletionPolicy Retain keeps the schema and data)"):
            mirror.stop()
            kept = "the"  # counted only where the demo has a superuser connection
            if db.superuser_dsn:
                with psycopg.connect(db.superuser_dsn) as conn:
                    row = conn.execute(
                        f"SELECT count(*) FROM {STORE}_results.celery_taskmeta").fetchone()
                    kept = str(row[0] if row else 0)
            kubectl("-n", namespace, "delete", f"rstore/{STORE}", "--timeout=60s")
            target.teardown()
            detail(f"ResultStore deleted; {kept} results retained in the schema")
    say(f"\nDemo finished in {elapsed():.0f}s.")


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: the teardown and the work directory's removal still run."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run(args)
    except KeyboardInterrupt:
        say("\n\033[31mdemo interrupted\033[0m (torn down)")
        return 130
    except Exception as exc:  # noqa: BLE001 - one readable line, details in the logs
        say(f"\n\033[31mdemo failed:\033[0m {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
