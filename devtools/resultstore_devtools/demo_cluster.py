"""`scripts/demo --kubeconfig`: the demo in an existing cluster, everything in-cluster.

The operator is installed from manifests/ exactly as a user would (with the image named by
--image), and it is the operator's pod, the worker's pod and the demo's PostgreSQL and Redis
pods that run on the cluster's nodes. This machine only drives: kubectl, a Celery client and
SQL through `kubectl port-forward` to the in-cluster Services (or directly, with --postgres
and --broker-url naming services both sides can reach).

What the demo installs it also removes; what was there before (a CRD, an operator installed
with Helm) it leaves alone and uses.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .demo_services import build_postgres, build_redis, service_host
from .demo_story import (
    ADMIN_USER,
    ALLOW_HOST_NETWORK,
    OPERATOR_NS,
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
from .image import project_version
from .procs import eventually, free_port

CRD = "customresourcedefinition/resultstores.resultstore.dev"
OPERATOR_DEPLOYMENT = "deployment/resultstore-operator"


def render_install(rendered: str, image: str, extra_env: dict[str, str]) -> list[dict[str, Any]]:
    """`kubectl kustomize manifests/` output with the operator image and env set (pure)."""
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    for doc in docs:
        if doc["kind"] != "Deployment" or doc["metadata"]["name"] != "resultstore-operator":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            if container["name"] != "operator":
                continue
            container["image"] = image
            env = container.setdefault("env", [])
            wanted = {"RESULTSTORE_CLEANUP_IMAGE": image, **extra_env}
            for item in env:
                if item["name"] in wanted:
                    item.pop("valueFrom", None)
                    item["value"] = wanted.pop(item["name"])
            env.extend({"name": k, "value": v} for k, v in wanted.items())
    return docs


class PortForward:
    """`kubectl port-forward` to a Service, on a free loopback port of this machine."""

    def __init__(self, kubectl: Kubectl, namespace: str, service: str, port: int) -> None:
        self.proc = subprocess.Popen(
            kubectl.argv("-n", namespace, "port-forward", "--address", "127.0.0.1",
                         f"svc/{service}", f":{port}"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.what = f"port-forward to svc/{service}"
        self.local_port = self._wait_for_port()
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_for_port(self) -> int:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 60
        seen = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            match = re.search(r"Forwarding from 127\.0\.0\.1:(\d+)", line)
            if match:
                return int(match.group(1))
        self.stop()
        raise RuntimeError(f"{self.what} did not start:\n{''.join(seen)}")

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for _line in self.proc.stdout:
            pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class ClusterTarget:
    """The demo against the cluster of ``--kubeconfig``."""

    rotation_timeout = 600.0  # the operator's default rotation grace (120 s) is in there
    # A kubelet with the default sync (1 min) refreshes a Secret volume after 60-90 s; the
    # previous role's sessions must outlive that (and the operator's 120 s grace).
    drain_timeout = "3m"

    def __init__(self, args: argparse.Namespace, stack: contextlib.ExitStack,
                 work: Path) -> None:
        self.args = args
        self.stack = stack
        self.work = work
        self.namespace: str = args.namespace
        # --host-network: the store's cleanup Jobs too (spec.cleanupJob.hostNetwork)
        self.cleanup_host_network: bool = bool(args.host_network)
        version = project_version()
        self.image: str = args.image or f"celery-resultstore:{version}"
        self.worker_image: str = args.worker_image or f"celery-resultstore-worker:{version}"
        self.timeout = f"{int(args.timeout)}s"
        self.installed: list[dict[str, Any]] = []
        self.forwards: list[PortForward] = []

    # kubectl against the user's cluster ---------------------------------------------------

    def start_cluster(self) -> None:
        from .binaries import cached_binaries

        def ensure_kubectl() -> str:
            # The pinned kubectl the manifests are tested with; else the user's own.
            cached = cached_binaries().kubectl
            if cached.exists():
                return str(cached)
            found = shutil.which("kubectl")
            if found:
                return found
            from .binaries import ensure_all

            return str(ensure_all().kubectl)

        with step(f"The cluster of {self.args.kubeconfig}"):
            kubeconfig = Path(self.args.kubeconfig).expanduser().resolve()
            if not kubeconfig.is_file():
                raise RuntimeError(f"no kubeconfig at {kubeconfig}")
            if self.args.context:
                merged = self.work / "kubeconfig"
                shutil.copyfile(kubeconfig, merged)
                merged.chmod(0o600)
                subprocess.run([ensure_kubectl(), "--kubeconfig", str(merged),
                                "config", "use-context", self.args.context], check=True,
                               capture_output=True)
                kubeconfig = merged
            self.kubectl = Kubectl(ensure_kubectl(), kubeconfig)
            self.kubeconfig = kubeconfig
            detail(self.kubectl("version").strip())
            nodes = self.kubectl("get", "nodes", "-o", "name").split()
            detail(f"{len(nodes)} node(s): {', '.join(n.split('/', 1)[1] for n in nodes)}")
            if not nodes:
                raise RuntimeError("the cluster has no nodes: its pods could never run "
                                   "(use `bash scripts/demo` without --kubeconfig instead)")

    def _wait_rollout(self, namespace: str, deployment: str, hint: str) -> None:
        try:
            self.kubectl("-n", namespace, "rollout", "status", deployment,
                         f"--timeout={self.timeout}", timeout=self.args.timeout + 30)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            pods = self.kubectl("-n", namespace, "get", "pods", "-o", "wide", check=False)
            events = self.kubectl("-n", namespace, "get", "events", "--sort-by=.lastTimestamp",
                                  check=False)
            raise RuntimeError(f"{deployment} in {namespace} did not become available "
                               f"({hint}):\n{pods}\n{events[-3000:]}") from exc

    # services -----------------------------------------------------------------------------

    def start_services(self) -> tuple[Database, Broker]:
        args, kubectl, ns = self.args, self.kubectl, self.namespace
        title = ("PostgreSQL and Redis in the cluster (official images)"
                 if not (args.postgres and args.broker_url)
                 else "PostgreSQL and the broker given on the command line")
        with step(title):
            kubectl("apply", "-f", "-", stdin=yaml.safe_dump(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
            # One callback, namespace first: its ResultStore needs the operator (finalizer).
            self.stack.callback(self._cleanup)
            rollouts: list[tuple[str, str]] = []
            superuser_password = secrets.token_urlsafe(18)
            if args.postgres:
                host, _, port = args.postgres.rpartition(":")
                password = os.environ.get("RESULTSTORE_DEMO_ADMIN_PASSWORD")
                if not password:
                    raise RuntimeError("--postgres needs the admin role's password in "
                                       "RESULTSTORE_DEMO_ADMIN_PASSWORD")
                db_parts = (host, int(port), args.postgres_admin_user, password)
            else:
                password = secrets.token_urlsafe(18)
                objs = build_postgres(ns, args.database, superuser_password, password,
                                      args.postgres_image)
                kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(objs))
                rollouts.append(("deployment/postgres", args.postgres_image))
                db_parts = (service_host("postgres", ns), 5432, ADMIN_USER, password)
            if not args.broker_url:
                kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(
                    build_redis(ns, args.redis_image)))
                rollouts.append(("deployment/redis", args.redis_image))
            for deployment, image in rollouts:
                self._wait_rollout(ns, deployment, f"can the nodes pull {image}?")

            if args.postgres:
                host, port = db_parts[0], db_parts[1]
                db = Database(host, port, host, port, args.database, db_parts[2], db_parts[3])
                detail(f"PostgreSQL {host}:{port} database {args.database!r} (given)")
            else:
                fwd = self._forward("postgres", 5432)
                db = Database(db_parts[0], 5432, "127.0.0.1", fwd, args.database,
                              ADMIN_USER, password,
                              superuser_dsn=f"postgresql://postgres:{superuser_password}@"
                                            f"127.0.0.1:{fwd}/{args.database}")
                detail(f"PostgreSQL {db.cluster_host}:5432 database {args.database!r}, "
                       f"reached from here on 127.0.0.1:{fwd}; admin role {ADMIN_USER!r} "
                       "(CREATEROLE, CREATE on the database; not a superuser)")
            if args.broker_url:
                broker = Broker(args.broker_url, args.broker_url)
                detail(f"broker {args.broker_url} (given)")
            else:
                fwd = self._forward("redis", 6379)
                broker = Broker(f"redis://{service_host('redis', ns)}:6379/0",
                                f"redis://127.0.0.1:{fwd}/0")
                detail(f"Redis {broker.cluster_url}, reached from here on 127.0.0.1:{fwd}")
        return db, broker

    def _forward(self, service: str, port: int) -> int:
        forward = PortForward(self.kubectl, self.namespace, service, port)
        self.forwards.append(forward)
        self.stack.callback(forward.stop)
        return forward.local_port

    # the operator -------------------------------------------------------------------------

    def install_operator(self) -> None:
        kubectl = self.kubectl
        had_crd = kubectl.exists(CRD)
        had_operator = kubectl.exists("-n", OPERATOR_NS, OPERATOR_DEPLOYMENT)
        extra = self.operator_env()
        with step(f"Install the operator (image {self.image}): kubectl kustomize manifests/ "
                  "| kubectl apply"):
            if had_operator:
                detail(f"an operator is already installed in {OPERATOR_NS}: using it as is")
                if self.cleanup_host_network:
                    detail("(the store's spec.cleanupJob.hostNetwork is refused unless that "
                           f"operator runs with {ALLOW_HOST_NETWORK}=true)")
            else:
                rendered = kubectl("kustomize", str(ROOT / "manifests"))
                docs = render_install(rendered, self.image, extra)
                if self.args.host_network:
                    docs = self._on_host_network(docs, extra)
                detail(kubectl("apply", "--server-side", "-f", "-",
                               stdin=yaml.safe_dump_all(docs)))
                self.installed = [d for d in docs if
                                  d["kind"] != "CustomResourceDefinition" or not had_crd]
            kubectl("wait", "--for=condition=Established", "--timeout=60s", CRD)

        with step("The operator's pod: running and serving the webhook"):
            self._wait_rollout(OPERATOR_NS, OPERATOR_DEPLOYMENT,
                               f"can the nodes pull {self.image}? With kind: kind load "
                               f"docker-image {self.image}")

            def ca_bundle() -> bool:
                config = kubectl.json("mutatingwebhookconfiguration/resultstore-injector")
                return all((w.get("clientConfig") or {}).get("caBundle")
                           for w in config.get("webhooks") or [{}])

            try:
                eventually(ca_bundle, 120, "the operator to publish its webhook CA")
            except TimeoutError:
                detail(self.operator_logs())
                raise
            detail(kubectl("-n", OPERATOR_NS, "get", "pods", "-o", "wide"))

    def operator_env(self) -> dict[str, str]:
        """The Deployment's extra env: hostNetwork cleanup Jobs allowed when the store asks
        for them (--host-network), then --operator-env (the user's word wins)."""
        given = dict(item.split("=", 1) for item in self.args.operator_env)
        return {**cleanup_policy_env(self.cleanup_host_network), **given}

    def _on_host_network(self, docs: list[dict[str, Any]],
                         extra: dict[str, str]) -> list[dict[str, Any]]:
        """--host-network: the install as a node without a pod network runs it
        (localnode.local_node_install; the API server's own loopback address)."""
        from urllib.parse import urlsplit

        from .localnode import local_node_install

        server = self.kubectl("config", "view", "--minify", "-o",
                              "jsonpath={.clusters[0].cluster.server}").strip()
        parts = urlsplit(server)
        if parts.hostname not in ("127.0.0.1", "localhost") or parts.port is None:
            raise RuntimeError(f"--host-network needs an API server on 127.0.0.1, not {server}")
        detail("--host-network: operator pod on hostNetwork, loopback addresses, one replica, "
               "webhook by URL; the worker and the store's cleanup Jobs on hostNetwork too "
               f"({ALLOW_HOST_NETWORK}=true)")
        return local_node_install(docs, parts.port, free_port(), free_port(), extra_env=extra)

    def operator_logs(self) -> str:
        return self.kubectl("-n", OPERATOR_NS, "logs", OPERATOR_DEPLOYMENT, "--tail=60",
                            check=False)

    def api_client(self) -> Any:
        from .demo_report import kube_client

        return kube_client(self.kubeconfig, self.work)

    # the worker ---------------------------------------------------------------------------

    def run_worker(self, deployment: dict[str, Any], broker: Broker) -> dict[str, Any]:
        kubectl, ns = self.kubectl, self.namespace
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            container["image"] = self.worker_image
        if self.args.host_network:
            deployment["spec"]["template"]["spec"]["hostNetwork"] = True
        with step("The worker Deployment: its pod admitted, mutated and run on a node"):
            detail(kubectl("apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump(deployment)))
            self._wait_rollout(ns, "deployment/orders-worker",
                               f"can the nodes pull {self.worker_image}?")
            pods = kubectl.json("-n", ns, "pods", "-l", WORKER_LABEL)["items"]
            running = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
            pod = running[0]
            detail(f"pod {pod['metadata']['name']} on node {pod['spec'].get('nodeName')}")
            show_pod(pod)
        return dict(pod)

    def worker_ready(self, client: Callable[[], Any]) -> None:
        with step("The worker answers (first task through the broker)"):
            started = time.monotonic()
            client().get(timeout=self.args.timeout)
            detail(f"first result after {time.monotonic() - started:.1f}s")

    def worker_secret_updates(self) -> str:
        return "the worker pod kept running while the kubelet refreshed its Secret volume"

    def keep_message(self, db: Database, broker: Broker) -> str:
        return (f"export KUBECONFIG={self.kubeconfig}\nnamespace: {self.namespace}\n"
                "(port-forwards stop with this process)")

    # teardown -----------------------------------------------------------------------------

    def teardown(self) -> None:
        for forward in self.forwards:
            forward.stop()

    def _cleanup(self) -> None:
        self._delete_namespace()
        self._uninstall()

    def _delete_namespace(self) -> None:
        self.kubectl("delete", "namespace", self.namespace, "--ignore-not-found",
                     "--wait=true", "--timeout=120s", check=False, timeout=180)

    def _uninstall(self) -> None:
        """Remove what install_operator created (objects that existed before are kept)."""
        for doc in reversed(self.installed):
            meta = doc["metadata"]
            # Waiting: the cluster is left as it was found, not with a namespace Terminating.
            args = ["delete", f"{doc['kind'].lower()}/{meta['name']}", "--ignore-not-found",
                    "--wait=true", "--timeout=120s"]
            if meta.get("namespace"):
                args[1:1] = ["-n", meta["namespace"]]
            self.kubectl(*args, check=False, timeout=180)
