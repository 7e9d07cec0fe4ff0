"""The celery-resultstore demo: the whole story, then everything torn down.

    bash scripts/demo                          # local control plane, PostgreSQL, Redis
    bash scripts/demo --keep                   # leave it all running and say how to reach it
    bash scripts/demo --kubeconfig ~/.kube/config [--image celery-resultstore:0.1.0]
                                               # an existing cluster that has the image

Steps: a cluster, PostgreSQL and Redis; CRD, RBAC, operator and webhook installed from
manifests/; `kubectl apply -f manifests/examples/`; the ResultStore Ready; the example worker
Deployment's pod admitted and mutated by the webhook and run with its injected volume and env;
tasks, a group and a failing task; results queried with SQL as the store's own role;
`kubectl get rstore`; a credential rotation while tasks keep flowing, with no failed task;
teardown.

Locally (the default) the control plane has no nodes, so the operator runs as a local process
with its ServiceAccount's token (RBAC constrains it exactly as in-cluster) and the worker
pod's container runs here through kubelet.py. With --kubeconfig everything runs in the
cluster: the operator from its Deployment (the image must be pullable by, or loaded into,
the nodes), a PostgreSQL and a Redis from the official images (or yours: --postgres,
--broker-url), and the worker pod on a node; this machine reaches the in-cluster services
through `kubectl port-forward`. See demo_cluster.py.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from .kubelet import Fetch, KubeletDir, PodRunner, api_fetcher
from .procs import eventually, free_port, http_ok

ROOT = Path(__file__).resolve().parents[2]
STORE = "orders"
DATABASE = "celery"
ADMIN_USER = "resultstore_admin"
OPERATOR_NS = "resultstore-system"
OPERATOR_SA = "resultstore-operator"
WORKER_LABEL = "app.kubernetes.io/name=orders-worker"

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

    def argv(self, *args: str) -> list[str]:
        return [self.binary, "--kubeconfig", str(self.kubeconfig), *args]

    def __call__(self, *args: str, stdin: str | None = None, check: bool = True,
                 timeout: float = 300) -> str:
        result = subprocess.run(self.argv(*args), input=stdin, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self("get", *args, "-o", "json"))

    def exists(self, *args: str) -> bool:
        return bool(self("get", *args, "--ignore-not-found", "-o", "name").strip())


@dataclass(frozen=True)
class Database:
    """The demo's PostgreSQL as the cluster sees it and as this machine reaches it."""

    cluster_host: str
    cluster_port: int
    local_host: str
    local_port: int
    name: str
    admin_user: str
    admin_password: str
    # A host-side DSN that may read every schema (for the retained-rows count at teardown).
    superuser_dsn: str | None = None

    def localize(self, data: dict[str, str]) -> dict[str, str]:
        """A Secret's keys with the cluster's address replaced by the one reachable here."""
        if (self.cluster_host, self.cluster_port) == (self.local_host, self.local_port):
            return dict(data)
        out = dict(data)
        out["host"], out["port"] = self.local_host, str(self.local_port)
        old = f"@{self.cluster_host}:{self.cluster_port}/"
        new = f"@{self.local_host}:{self.local_port}/"
        for key in ("uri", "result_backend"):
            if key in out:
                out[key] = out[key].replace(old, new)
        return out


@dataclass(frozen=True)
class Broker:
    cluster_url: str
    local_url: str


class SecretMirror:
    """The store's Secret published here the way the kubelet publishes a Secret volume.

    The demo's own Celery client uses ``resultstore:///<dir>`` on this directory, so it
    follows a credential rotation exactly as a worker does (the backend reloads on the
    ``..data`` swap); the database address is rewritten to the one reachable from here.
    """

    def __init__(self, fetch: Fetch, namespace: str, name: str, path: Path,
                 db: Database) -> None:
        self.fetch, self.namespace, self.name, self.db = fetch, namespace, name, db
        self.dir = KubeletDir(path, mode=0o600)
        self.data: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self.dir.path

    def sync(self) -> None:
        raw = self.fetch("secret", self.namespace, self.name)
        if raw is None:
            return
        data = self.db.localize(raw)
        if data != self.data:
            self.dir.write(data)
            self.data = data

    def start(self) -> None:
        self.sync()
        if not self.data:
            raise RuntimeError(f"Secret {self.namespace}/{self.name} does not exist")

        def loop() -> None:
            while not self._stop.wait(1.0):
                with contextlib.suppress(Exception):
                    self.sync()

        self._thread = threading.Thread(target=loop, daemon=True, name="secret-mirror")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class Target(Protocol):
    """Where the demo runs: this machine (LocalTarget) or an existing cluster."""

    kubectl: Kubectl
    namespace: str
    rotation_timeout: float

    def start_cluster(self) -> None: ...
    def start_services(self) -> tuple[Database, Broker]: ...
    def install_operator(self) -> None: ...
    def operator_logs(self) -> str: ...
    def run_worker(self, deployment: dict[str, Any], broker: Broker) -> dict[str, Any]: ...
    def worker_ready(self, client: Callable[[], Any]) -> None: ...
    def worker_secret_updates(self) -> str: ...
    def api_client(self) -> Any: ...
    def keep_message(self, db: Database, broker: Broker) -> str: ...
    def teardown(self) -> None: ...


def examples() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((ROOT / "manifests" / "examples").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def point_examples(docs: list[dict[str, Any]], db: Database,
                   broker: Broker) -> list[dict[str, Any]]:
    """manifests/examples/, pointed at the demo's PostgreSQL and broker (pure)."""
    out = json.loads(json.dumps(docs))
    for doc in out:
        kind = doc["kind"]
        if kind == "Secret":
            doc["stringData"] = {"username": db.admin_user, "password": db.admin_password}
        elif kind == "ResultStore":
            spec = doc["spec"]
            spec["database"].update(host=db.cluster_host, port=db.cluster_port, name=db.name,
                                    sslMode="disable")
            # A demo-sized drain: the previous role goes as soon as its sessions are gone.
            spec["credentials"]["drainTimeout"] = "20s"
            # The teardown retains the schema; a rerun against the same PostgreSQL
            # (--postgres) is a new ResultStore (new uid) and re-attaches to it explicitly.
            spec["schemaPolicy"] = "AdoptExisting"
        elif kind == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                for env in container.get("env") or []:
                    if env["name"] == "CELERY_BROKER_URL":
                        env["value"] = broker.cluster_url
    return out


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def show_pod(pod: dict[str, Any]) -> None:
    container = pod["spec"]["containers"][0]
    for vol in pod["spec"].get("volumes") or []:
        if "secret" in vol:
            detail(f"  volume {vol['name']}: secret {vol['secret']['secretName']}")
    for mount in container.get("volumeMounts") or []:
        detail(f"  mount  {mount['mountPath']} (readOnly={mount.get('readOnly')})")
    backend_env = [e for e in container.get("env") or [] if e["name"] == "CELERY_RESULT_BACKEND"]
    if not backend_env:
        raise RuntimeError("the webhook did not inject CELERY_RESULT_BACKEND into pod "
                           f"{pod['metadata']['name']}")
    detail(f"  env    CELERY_RESULT_BACKEND={backend_env[0].get('value')}")


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
        from kubernetes import config as kconfig

        return kconfig.new_client_from_config(config_file=str(self.cluster.kubeconfig))

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
            self.runner = PodRunner(worker_pod, api_fetcher(self.api_client()),
                                    resync_period=1.0, extra_env={"PATH": image_path})
            self.worker_log = self.work / "worker.log"
            self.runner.start(log=self.worker_log)
            self.stack.callback(self.runner.stop)
            detail(f"command: {' '.join(self.runner.command())}")
            detail(f"CELERY_RESULT_BACKEND={self.runner.environment()['CELERY_RESULT_BACKEND']}")
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


def run(args: argparse.Namespace) -> None:
    stack = contextlib.ExitStack()
    work = Path(tempfile.mkdtemp(prefix="resultstore-demo-"))
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
                cond = _condition(store, "Ready")
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
                              f"{STORE}-resultstore", work / "client-binding", db)
        mirror.start()
        stack.callback(mirror.stop)
        client_app = Celery("demo-client", broker=broker.local_url,
                            backend=f"resultstore://{mirror.path}")
        client_app.conf.update(result_extended=True, task_serializer="json",
                               result_serializer="json", accept_content=["json"])
        add = client_app.signature("tasks.add")
        target.worker_ready(lambda: add.clone((0, 0)).delay())

        with step("Tasks, a group and a failing task through the injected backend"):
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
            _say("\nLeft running.\n" + target.keep_message(db, broker))
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
    _say(f"\nDemo finished in {time.monotonic() - _T0:.0f}s.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from .demo_services import POSTGRES_IMAGE, REDIS_IMAGE

    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true",
                        help="leave everything running at the end")
    cluster = parser.add_argument_group(
        "an existing cluster (--kubeconfig): everything runs in it")
    cluster.add_argument("--kubeconfig", type=Path, default=None,
                         help="run in the cluster of this kubeconfig (current context)")
    cluster.add_argument("--context", default=None, help="kubeconfig context to use")
    cluster.add_argument("--image", default=None,
                         help="operator image the nodes can pull (default "
                              "celery-resultstore:<version>)")
    cluster.add_argument("--worker-image", default=None,
                         help="worker image (default celery-resultstore-worker:<version>)")
    cluster.add_argument("--namespace", default="demo",
                         help="namespace for the example objects and the demo's services")
    cluster.add_argument("--postgres", metavar="HOST:PORT", default=None,
                         help="use this PostgreSQL (reachable from the cluster and from here) "
                              "instead of deploying one; the admin role's password comes "
                              "from RESULTSTORE_DEMO_ADMIN_PASSWORD")
    cluster.add_argument("--database", default=DATABASE, help="database name")
    cluster.add_argument("--postgres-admin-user", default=ADMIN_USER,
                         help="role with CREATEROLE and CREATE on the database")
    cluster.add_argument("--broker-url", default=None,
                         help="use this Celery broker (reachable from the cluster and from "
                              "here) instead of deploying Redis")
    cluster.add_argument("--postgres-image", default=POSTGRES_IMAGE)
    cluster.add_argument("--redis-image", default=REDIS_IMAGE)
    cluster.add_argument("--operator-env", action="append", default=[], metavar="KEY=VALUE",
                         help="extra environment for the operator Deployment (repeatable), "
                              "e.g. RESULTSTORE_ROTATION_GRACE=30")
    cluster.add_argument("--timeout", type=float, default=300.0,
                         help="seconds to wait for each rollout (image pulls included)")
    args = parser.parse_args(argv)
    if args.kubeconfig is None:
        # The local story runs its own services; a cluster option there would be ignored
        # silently, which reads as "it worked" while doing something else.
        given = sorted(f"--{a.dest.replace('_', '-')}" for a in cluster._group_actions
                       if a.dest != "kubeconfig" and getattr(args, a.dest) != a.default)
        if given:
            parser.error(f"{', '.join(given)} only apply with --kubeconfig (an existing "
                         "cluster); the local demo starts its own services")
    for item in args.operator_env:
        if "=" not in item or not item.split("=", 1)[0]:
            parser.error(f"--operator-env expects KEY=VALUE, got {item!r}")
    if args.postgres and ":" not in args.postgres:
        parser.error("--postgres expects HOST:PORT")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except Exception as exc:  # noqa: BLE001 - one readable line, details in the logs
        _say(f"\n\033[31mdemo failed:\033[0m {exc}")
        return 1
    return 0


if __name__ == "__main__":
    # Run the importable module, not this __main__ copy, so that demo_cluster (which imports
    # resultstore_devtools.demo) shares the step counter and the start time.
    from resultstore_devtools import demo as _demo

    sys.exit(_demo.main())
