"""The celery-resultstore demo: the whole story on this machine, then everything torn down.

    bash scripts/demo                  # local control plane, PostgreSQL, Redis (default)
    bash scripts/demo --keep           # leave it all running and print how to reach it

Steps: control plane, PostgreSQL and Redis up; CRD, RBAC and webhook installed from
manifests/; the operator running with its ServiceAccount's identity (the local control plane
has no nodes, so it runs as a local process with that account's token, exactly as RBAC
would constrain it in-cluster); `kubectl apply -f manifests/examples/`; the ResultStore
Ready; the example worker Deployment's pod admitted and mutated by the webhook; that pod's
container run here with its injected volume and env (see kubelet.py); tasks, a group and a
failing task; results queried with SQL as the store's own role; `kubectl get rstore`; a
credential rotation while tasks keep flowing, with no failed task; teardown.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .kubelet import PodRunner, api_fetcher
from .postgres import PostgresServer
from .procs import eventually, free_port
from .redis import RedisServer

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "demo"
STORE = "orders"
DATABASE = "celery"
OPERATOR_NS = "resultstore-system"
OPERATOR_SA = "resultstore-operator"

_T0 = time.monotonic()
_step = 0


def _say(text: str) -> None:
    print(text, flush=True)


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    global _step
    _step += 1
    started = time.monotonic()
    _say(f"\n\033[1m[{_step:2d}] {title}\033[0m")
    yield
    _say(f"     done in {time.monotonic() - started:.1f}s "
         f"(total {time.monotonic() - _T0:.0f}s)")


def detail(text: str) -> None:
    for line in text.rstrip().splitlines():
        _say(f"     {line}")


class Kubectl:
    def __init__(self, binary: str, kubeconfig: Path) -> None:
        self.binary = binary
        self.kubeconfig = kubeconfig

    def __call__(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        result = subprocess.run([self.binary, "--kubeconfig", str(self.kubeconfig), *args],
                                input=stdin, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self("get", *args, "-o", "json"))


def _examples(pg: PostgresServer, redis_url: str, admin_user: str,
              admin_password: str) -> list[dict[str, Any]]:
    """manifests/examples/, pointed at this machine's PostgreSQL and Redis."""
    docs: list[dict[str, Any]] = []
    for path in sorted((ROOT / "manifests" / "examples").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for doc in docs:
        kind = doc["kind"]
        if kind == "Secret":
            doc["stringData"] = {"username": admin_user, "password": admin_password}
        elif kind == "ResultStore":
            db = doc["spec"]["database"]
            db.update(host=pg.host, port=pg.port, name=DATABASE, sslMode="disable")
            # A demo-sized drain: the previous role goes as soon as its sessions are gone.
            doc["spec"]["credentials"]["drainTimeout"] = "20s"
        elif kind == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                for env in container.get("env") or []:
                    if env["name"] == "CELERY_BROKER_URL":
                        env["value"] = redis_url
    return docs


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def run(args: argparse.Namespace) -> None:
    from kubernetes import config as kconfig

    from .binaries import ensure_all
    from .controlplane import ControlPlane

    stack = contextlib.ExitStack()
    work = Path(tempfile.mkdtemp(prefix="resultstore-demo-"))
    with stack:
        with step("Local control plane (etcd, kube-apiserver, kube-controller-manager)"):
            tools = ensure_all()
            cluster = ControlPlane()
            cluster.start()
            if not args.keep:
                stack.callback(cluster.stop)
            kubectl = Kubectl(str(tools.kubectl), cluster.kubeconfig)
            detail(kubectl("version").strip())

        with step("PostgreSQL and Redis on 127.0.0.1"):
            pg = PostgresServer(durable=True)
            pg.start()
            if not args.keep:
                stack.callback(pg.destroy)
            redis = RedisServer()
            redis.start()
            if not args.keep:
                stack.callback(redis.destroy)
            pg.create_database(DATABASE)
            admin_user, admin_password = "resultstore_admin", secrets.token_urlsafe(18)
            import psycopg

            with psycopg.connect(pg.dsn(DATABASE), autocommit=True) as conn:
                conn.execute(f"CREATE ROLE {admin_user} LOGIN CREATEROLE "
                             f"PASSWORD '{admin_password}'")
                conn.execute(f"GRANT CREATE ON DATABASE {DATABASE} TO {admin_user}")
            detail(f"PostgreSQL {pg.host}:{pg.port} database {DATABASE!r}; admin role "
                   f"{admin_user!r} (CREATEROLE, CREATE on the database; not a superuser)")
            detail(f"Redis {redis.url} (the Celery broker)")

        with step("Install the CRD, RBAC and webhook: kubectl apply -k manifests/"):
            detail(kubectl("apply", "--server-side", "-k", str(ROOT / "manifests")))
            kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/resultstores.resultstore.dev")
            # No nodes here: the Deployment's pod cannot run, so the operator runs locally
            # with the same ServiceAccount identity (RBAC applies to every call it makes).
            kubectl("-n", OPERATOR_NS, "scale", "deployment/resultstore-operator",
                    "--replicas=0")
            sa_kubeconfig = cluster.service_account_kubeconfig(
                OPERATOR_NS, OPERATOR_SA, work / "operator.kubeconfig", duration="2h")

        with step("Start the operator as system:serviceaccount:resultstore-system:"
                  "resultstore-operator"):
            op_log = work / "operator.log"
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
            log = open(op_log, "ab")  # noqa: SIM115 - owned by the child
            operator = subprocess.Popen(
                [str(Path(sys.executable).parent / "resultstore-operator"), "--all-namespaces"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()

            def stop_operator() -> None:
                from .procs import kill_group

                kill_group(operator, timeout=20)

            stack.callback(stop_operator)

            def healthy() -> bool:
                import urllib.request

                if operator.poll() is not None:
                    raise RuntimeError("operator exited:\n" + op_log.read_text()[-3000:])
                try:
                    with urllib.request.urlopen(
                            f"http://127.0.0.1:{health_port}/healthz", timeout=1) as rsp:
                        return bool(rsp.status == 200)
                except OSError:
                    return False

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

        with step(f"kubectl apply -f manifests/examples/ (namespace {NAMESPACE!r})"):
            kubectl("create", "namespace", NAMESPACE)
            docs = _examples(pg, redis.url, admin_user, admin_password)
            # Store first, worker after it is Ready: the webhook injects only Ready stores.
            workers = [d for d in docs if d["kind"] == "Deployment"]
            first = [d for d in docs if d["kind"] != "Deployment"]
            detail(kubectl("apply", "-n", NAMESPACE, "-f", "-",
                           stdin=yaml.safe_dump_all(first)))
            applied = time.monotonic()

            def ready() -> dict[str, Any] | None:
                store = kubectl.json("-n", NAMESPACE, f"rstore/{STORE}")
                cond = _condition(store, "Ready")
                return store if cond and cond.get("status") == "True" else None

            store = eventually(ready, 120, f"ResultStore {STORE} to become Ready")
            detail(f"ResultStore Ready {time.monotonic() - applied:.1f}s after apply")
            detail(kubectl("-n", NAMESPACE, "get", "rstore"))
            for cond in store["status"]["conditions"]:
                detail(f"  {cond['type']:<18} {cond['status']:<5} {cond.get('reason', '')}")

        with step("The worker Deployment: its pod admitted and mutated by the webhook"):
            detail(kubectl("apply", "-n", NAMESPACE, "-f", "-",
                           stdin=yaml.safe_dump_all(workers)))

            def pod() -> dict[str, Any] | None:
                items = kubectl.json("-n", NAMESPACE, "pods", "-l",
                                     "app.kubernetes.io/name=orders-worker")["items"]
                return items[0] if items else None

            worker_pod = eventually(pod, 60, "the replicaset controller to create the pod")
            container = worker_pod["spec"]["containers"][0]
            detail(f"pod {worker_pod['metadata']['name']} (Pending: this control plane "
                   "has no nodes)")
            for vol in worker_pod["spec"].get("volumes") or []:
                if "secret" in vol:
                    detail(f"  volume {vol['name']}: secret {vol['secret']['secretName']}")
            for mount in container.get("volumeMounts") or []:
                detail(f"  mount  {mount['mountPath']} (readOnly={mount.get('readOnly')})")
            backend_env = [e for e in container.get("env") or []
                           if e["name"] == "CELERY_RESULT_BACKEND"]
            if not backend_env:
                raise RuntimeError("the webhook did not inject CELERY_RESULT_BACKEND:\n"
                                   + op_log.read_text()[-3000:])
            detail(f"  env    CELERY_RESULT_BACKEND={backend_env[0].get('value')}")

        with step("Run that pod's container here, as the kubelet would"):
            kconfig.load_kube_config(config_file=str(cluster.kubeconfig))
            from kubernetes import client as kclient

            api = kclient.ApiClient()
            # The "image" is this virtualenv: its bin/ first on PATH, like the image's.
            image_path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
            runner = PodRunner(worker_pod, api_fetcher(api), resync_period=1.0,
                               extra_env={"PATH": image_path})
            worker_log = work / "worker.log"
            runner.start(log=worker_log)
            stack.callback(runner.stop)
            env = runner.environment()
            detail(f"command: {' '.join(runner.command())}")
            detail(f"CELERY_RESULT_BACKEND={env['CELERY_RESULT_BACKEND']}")
            eventually(lambda: "ready." in worker_log.read_text(errors="replace"), 90,
                       "the Celery worker to be ready")

        from celery import Celery, group

        client_app = Celery("demo-client", broker=redis.url,
                            backend=env["CELERY_RESULT_BACKEND"])
        client_app.conf.update(result_extended=True, task_serializer="json",
                               result_serializer="json", accept_content=["json"])
        add = client_app.signature("tasks.add")

        with step("Tasks, a group and a failing task through the injected backend"):
            result = add.clone((2, 3)).delay()
            detail(f"add(2, 3) -> {result.get(timeout=30)}   (task {result.id})")
            started = time.monotonic()
            grp = group(add.clone((i, i)) for i in range(100)).apply_async()
            values = grp.get(timeout=60)
            detail(f"group of 100 adds -> sum {sum(values)} in "
                   f"{time.monotonic() - started:.2f}s")
            failing = add.clone((1, "one")).delay()
            failing.get(timeout=30, propagate=False)
            detail(f"add(1, 'one') -> {failing.state}: {failing.result!r}")

        with step("Results queried with SQL, as the store's own least-privilege role"):
            secret = kubectl.json("-n", NAMESPACE, f"secret/{STORE}-resultstore")
            binding = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
            with psycopg.connect(binding["uri"]) as conn:
                rows = conn.execute(
                    "SELECT status, count(*) FROM celery_taskmeta GROUP BY status "
                    "ORDER BY status").fetchall()
                detail(f"$ psql \"$(kubectl get secret {STORE}-resultstore -o "
                       "jsonpath='{.data.uri}' | base64 -d)\"")
                detail("=> SELECT status, count(*) FROM celery_taskmeta GROUP BY status;")
                for status, count in rows:
                    detail(f"   {status:<10} {count}")
                row = conn.execute(
                    "SELECT task_id, name, status, date_done, worker FROM celery_taskmeta "
                    "WHERE task_id = %s", (failing.id,)).fetchone()
                detail(f"=> the failing task: {row}")
                who = conn.execute("SELECT current_user, current_schema()").fetchone()
                assert who is not None
                detail(f"   connected as {who[0]!r}, schema {who[1]!r} "
                       f"(Secret keys: {', '.join(sorted(binding))})")

        with step("Credential rotation while tasks keep flowing"):
            old = dict(binding)
            stop = threading.Event()
            counts = {"ok": 0, "failed": 0}
            errors: list[str] = []

            def traffic() -> None:
                while not stop.is_set():
                    try:
                        assert add.clone((1, 1)).delay().get(timeout=30) == 2
                        counts["ok"] += 1
                    except Exception as exc:  # noqa: BLE001 - counted and shown
                        counts["failed"] += 1
                        errors.append(repr(exc)[:200])

            thread = threading.Thread(target=traffic, daemon=True)
            thread.start()
            time.sleep(2)
            kubectl("-n", NAMESPACE, "annotate", "--overwrite", f"rstore/{STORE}",
                    f"resultstore.dev/rotate={int(time.time())}")

            def rotated() -> bool:
                store = kubectl.json("-n", NAMESPACE, f"rstore/{STORE}")
                creds = (store.get("status") or {}).get("credentials") or {}
                return bool(creds.get("phase") == "Stable"
                            and creds.get("activeRole") != old["username"])

            try:
                eventually(rotated, 180, "the rotation to complete")
            except TimeoutError:
                store = kubectl.json("-n", NAMESPACE, f"rstore/{STORE}")
                detail(json.dumps(store.get("status"), indent=1, default=str))
                detail(op_log.read_text(errors="replace")[-4000:])
                raise
            time.sleep(2)
            stop.set()
            thread.join(timeout=60)
            secret = kubectl.json("-n", NAMESPACE, f"secret/{STORE}-resultstore")
            new_user = base64.b64decode(secret["data"]["username"]).decode()
            detail(f"role {old['username']} -> {new_user}; worker reloaded the mounted "
                   f"Secret {runner.secret_updates} time(s) without a restart")
            detail(f"tasks during the rotation: {counts['ok']} ok, {counts['failed']} failed")
            try:
                psycopg.connect(old["uri"], connect_timeout=5).close()
                old_login = "STILL WORKS"
            except psycopg.OperationalError:
                old_login = "refused"
            detail(f"login with the previous password: {old_login}")
            events = kubectl("-n", NAMESPACE, "get", "events", "--field-selector",
                             f"involvedObject.name={STORE}", "--sort-by=.lastTimestamp")
            detail("\n".join(events.splitlines()[-8:]))
            if counts["failed"] or old_login != "refused":
                raise RuntimeError(f"rotation was not clean: {errors[:3]}")

        with step("kubectl get rstore"):
            detail(kubectl("-n", NAMESPACE, "get", "rstore", "-o", "wide"))

        if args.keep:
            _say(f"\nLeft running. export KUBECONFIG={cluster.kubeconfig}\n"
                 f"PostgreSQL: {pg.url(DATABASE)}\nRedis: {redis.url}\n"
                 f"Logs: {work}")
            stack.pop_all()
            return

        with step("Tear down (deletionPolicy Retain keeps the schema and data)"):
            runner.stop()
            kubectl("-n", NAMESPACE, "delete", f"rstore/{STORE}", "--timeout=60s")
            with psycopg.connect(pg.dsn(DATABASE)) as conn:
                kept = conn.execute(
                    f"SELECT count(*) FROM {STORE}_results.celery_taskmeta").fetchone()
            detail(f"ResultStore deleted; {kept[0] if kept else 0} results retained in "
                   "the schema; stopping the operator, control plane, Redis and PostgreSQL")
    _say(f"\nDemo finished in {time.monotonic() - _T0:.0f}s.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true",
                        help="leave everything running at the end")
    args = parser.parse_args(argv)
    try:
        run(args)
    except Exception as exc:  # noqa: BLE001 - one readable line, details in the logs
        _say(f"\n\033[31mdemo failed:\033[0m {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
