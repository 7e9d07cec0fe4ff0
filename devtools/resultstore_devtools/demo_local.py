"""The demo's local target on the Python stand-in: the operator as a local process with its
ServiceAccount's token (RBAC constrains it exactly as in-cluster) and the worker pod's
container run here through kubelet.py. demo_realnode.py runs the same story's pods on the
real node instead; this one is the fallback where a real node cannot start (not root, no
containerd), or chosen with RESULTSTORE_NODE=standin (resultstore_devtools.localnode).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .demo_report import kube_client
from .demo_story import (
    ADMIN_USER,
    DATABASE,
    OPERATOR_NS,
    OPERATOR_SA,
    ROOT,
    WORKER_LABEL,
    Broker,
    Database,
    Kubectl,
    cleanup_policy_env,
    detail,
    show_pod,
    step,
)
from .kubelet import PodRunner, api_fetcher
from .procs import eventually, free_port, http_ok

__all__ = ["LocalTarget", "wrapped"]


def wrapped(text: str) -> str:
    """An explanation under a detail line, wrapped (paths are never broken)."""
    return textwrap.fill(text, 88, initial_indent="  ", subsequent_indent="  ",
                         break_long_words=False, break_on_hyphens=False)



# ------------------------------------------------------------------------------ local target


@dataclass
class LocalTarget:
    """Control plane, PostgreSQL and Redis on this machine; operator and worker as processes."""

    keep: bool
    stack: contextlib.ExitStack
    work: Path
    namespace: str = "demo"
    rotation_timeout: float = 180.0
    # The stand-in kubelet republishes a Secret within a second.
    drain_timeout: str = "20s"
    # The stand-in runs a pod's containers as host processes: no network of their own.
    cleanup_host_network: bool = False
    kubectl: Kubectl = field(init=False)

    def operator_env(self) -> dict[str, str]:
        """The operator's settings for this target (addresses and ports aside): hostNetwork
        cleanup Jobs allowed exactly when the store will ask for them."""
        return {"RESULTSTORE_ROTATION_GRACE": "5", "RESULTSTORE_TICK_INTERVAL": "1",
                "RESULTSTORE_CLEANUP_IMAGE": "celery-resultstore:0.1.0",
                **cleanup_policy_env(self.cleanup_host_network)}

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
                **self.operator_env(),
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
            detail(wrapped(f"(the pod asks for {asked}: its container runs here as a plain "
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
