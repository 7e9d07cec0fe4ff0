"""The demo's story parts shared by both targets (demo.py: local, demo_cluster.py: a cluster).

Output (numbered steps with their timing, indented details), kubectl, the demo's database and
broker as both sides reach them, the Target protocol and the pure edits of manifests/examples/.
Both demo.py and demo_cluster.py import this module and neither imports the other at import
time, so there is no import cycle (the import-linter contracts in pyproject.toml check it).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from .demo_args import ADMIN_USER, DATABASE

__all__ = ["ADMIN_USER", "ALLOW_HOST_NETWORK", "DATABASE", "OPERATOR_NS", "OPERATOR_SA", "ROOT",
           "STORE", "WORKER_LABEL", "Broker", "Database", "Kubectl", "Target",
           "cleanup_policy_env", "condition", "detail", "elapsed", "examples",
           "point_examples", "say", "show_pod", "step"]

ROOT = Path(__file__).resolve().parents[2]
STORE = "orders"
OPERATOR_NS = "resultstore-system"
OPERATOR_SA = "resultstore-operator"
WORKER_LABEL = "app.kubernetes.io/name=orders-worker"

_T0 = time.monotonic()
_step = 0


def say(text: str) -> None:
    print(text, flush=True)


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    global _step
    _step += 1
    started = time.monotonic()
    say(f"\n\033[1m[{_step:2d}] {title}\033[0m")
    yield
    say(f"     done in {time.monotonic() - started:.1f}s "
        f"(total {time.monotonic() - _T0:.0f}s)")


def detail(text: str) -> None:
    for line in text.rstrip().splitlines():
        say(f"     {line}")


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



def elapsed() -> float:
    """Seconds since the demo started (this module's import)."""
    return time.monotonic() - _T0


class Target(Protocol):
    """Where the demo runs: this machine (LocalTarget) or an existing cluster."""

    kubectl: Kubectl
    namespace: str
    rotation_timeout: float
    drain_timeout: str
    #: the store's cleanup Jobs on the host network (spec.cleanupJob.hostNetwork)
    cleanup_host_network: bool

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


#: The operator setting without which a store's spec.cleanupJob.hostNetwork is refused.
ALLOW_HOST_NETWORK = "RESULTSTORE_CLEANUP_ALLOW_HOST_NETWORK"


def cleanup_policy_env(cleanup_host_network: bool) -> dict[str, str]:
    """The operator environment the demo's store needs (pure): a target whose store gets
    ``spec.cleanupJob.hostNetwork`` runs its operator with that allowed (off by default:
    a ResultStore must not grant its author a pod on the node's network)."""
    return {ALLOW_HOST_NETWORK: "true"} if cleanup_host_network else {}


def point_examples(docs: list[dict[str, Any]], db: Database, broker: Broker,
                   drain_timeout: str = "20s",
                   cleanup_host_network: bool = False) -> list[dict[str, Any]]:
    """manifests/examples/, pointed at the demo's PostgreSQL and broker (pure).

    ``cleanup_host_network``: the store's cleanup Jobs get ``spec.cleanupJob.hostNetwork``,
    for a node whose pods reach PostgreSQL only on the host's loopback address.
    """
    out = json.loads(json.dumps(docs))
    for doc in out:
        kind = doc["kind"]
        if kind == "Secret":
            doc["stringData"] = {"username": db.admin_user, "password": db.admin_password}
        elif kind == "ResultStore":
            spec = doc["spec"]
            spec["database"].update(host=db.cluster_host, port=db.cluster_port, name=db.name,
                                    sslMode="disable")
            # A demo-sized drain (the target's: a pod's kubelet must refresh its Secret
            # volume within it, since the previous role's sessions are ended at its end).
            spec["credentials"]["drainTimeout"] = drain_timeout
            # The teardown retains the schema; a rerun against the same PostgreSQL
            # (--postgres) is a new ResultStore (new uid) and re-attaches to it explicitly.
            spec["schemaPolicy"] = "AdoptExisting"
            if cleanup_host_network:
                spec.setdefault("cleanupJob", {})["hostNetwork"] = True
        elif kind == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                for env in container.get("env") or []:
                    if env["name"] == "CELERY_BROKER_URL":
                        env["value"] = broker.cluster_url
    return out


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
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
