"""A stand-in node: runs the pods of chosen namespaces on this host, as a kubelet would.

The local control plane has no nodes, so Deployments never become Available and nothing that
is installed the in-cluster way (the operator's own Deployment, a worker Deployment) ever
runs. This is enough of a kubelet to run those pods for tests of the in-cluster install path
(`scripts/demo --kubeconfig`): it registers a Node, binds each pending pod of the watched
namespaces to it, runs the pod's first container with :class:`~.kubelet.PodRunner` (volumes
published kubelet-style and kept in sync, env resolved, including ``fieldRef``), reports the
pod Running and Ready with the host's loopback address, restarts a container that exits
(``restartPolicy: Always``) and confirms deletions.

What it does not do, and why: images are not pulled (the container's command runs from this
virtualenv, which holds the same entry points as the image), probes are not run (a started
process counts as Ready), and the pod's ServiceAccount reaches the API server through a
kubeconfig holding a TokenRequest token for that account instead of the in-cluster token
mount, so RBAC constrains the pod exactly as in a cluster. Pod IPs are 127.0.0.1, which the
API server refuses in Endpoints, so Services do not route to these pods.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .kubelet import PodRunner, api_fetcher

__all__ = ["StandInNode"]

log = logging.getLogger(__name__)

KubeconfigFor = Callable[[str, str], Path]  # (namespace, service account) -> kubeconfig


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_status(pod: Mapping[str, Any], ready: bool, restarts: int = 0) -> dict[str, Any]:
    """The status a kubelet reports for a running pod (pure; unit-testable)."""
    now = _now()
    flag = "True" if ready else "False"
    containers = pod["spec"]["containers"]
    return {
        "phase": "Running",
        "hostIP": "127.0.0.1",
        "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}],
        "startTime": (pod.get("status") or {}).get("startTime") or now,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
            {"type": "Ready", "status": flag, "lastTransitionTime": now},
        ],
        "containerStatuses": [{
            "name": c["name"],
            "image": c.get("image", ""),
            "imageID": "",
            "ready": ready and i == 0,
            "started": ready and i == 0,
            "restartCount": restarts if i == 0 else 0,
            "state": ({"running": {"startedAt": now}} if ready and i == 0
                      else {"waiting": {"reason": "CrashLoopBackOff" if restarts
                                        else "ContainerCreating"}}),
        } for i, c in enumerate(containers)],
    }


class StandInNode:
    """Run the pods of ``namespaces`` here until :meth:`stop` (see the module docstring)."""

    def __init__(self, api_client: Any, namespaces: Collection[str],
                 kubeconfig_for: KubeconfigFor, log_dir: Path,
                 name: str = "resultstore-standin", poll: float = 0.5,
                 extra_env: Mapping[str, str] | None = None,
                 images: Callable[[str], str] | None = None,
                 api_server: tuple[str, int] | None = None) -> None:
        """``images`` maps a pod's image name to a local image (resultstore_devtools.image)
        and switches to running containers in their images; those get the in-cluster
        credentials a kubelet gives (the projected token volume and KUBERNETES_SERVICE_*
        pointing at ``api_server``) instead of a kubeconfig."""
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.fetch = api_fetcher(api_client)
        self.namespaces = tuple(namespaces)
        self.kubeconfig_for = kubeconfig_for
        self.log_dir = log_dir
        self.name = name
        self.poll = poll
        self.extra_env = dict(extra_env or {})
        self.images = images
        self.api_server = api_server
        if images is not None and api_server is None:
            raise ValueError("running pods in their images needs the API server's address")
        self.runners: dict[str, PodRunner] = {}  # pod uid -> runner
        self.restarts: dict[str, int] = {}
        self.restart_at: dict[str, float] = {}  # pod uid -> monotonic time of the next start
        self.ran: list[tuple[str, str, str]] = []  # (namespace, pod, image) in start order
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        from kubernetes.client.exceptions import ApiException

        self.log_dir.mkdir(parents=True, exist_ok=True)
        node: Any = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.name,
                             "labels": {"kubernetes.io/hostname": self.name,
                                        "kubernetes.io/os": "linux"}}}
        try:
            self.core.create_node(node)
        except ApiException as exc:
            if exc.status != 409:
                raise
        self.core.patch_node_status(self.name, {"status": {"conditions": [{
            "type": "Ready", "status": "True", "reason": "StandInNodeReady",
            "message": "pods run as local processes", "lastHeartbeatTime": _now(),
            "lastTransitionTime": _now()}]}})
        self._thread = threading.Thread(target=self._loop, daemon=True, name="standin-node")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for runner in list(self.runners.values()):
            runner.stop()
        self.runners.clear()
        try:
            self.core.delete_node(self.name)
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass

    def __enter__(self) -> StandInNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # the sync loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - a kubelet keeps going through API errors
                log.exception("stand-in node sync failed")
            self._stop.wait(self.poll)

    def sync(self) -> None:
        seen: set[str] = set()
        for namespace in self.namespaces:
            pods: Any = self.core.list_namespaced_pod(namespace, _preload_content=False)
            for pod in json.loads(pods.data)["items"]:
                uid = pod["metadata"]["uid"]
                seen.add(uid)
                self._sync_pod(pod)
        for uid in set(self.runners) - seen:  # deleted behind our back
            self.runners.pop(uid).stop()

    def _sync_pod(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid, ns, name = meta["uid"], meta["namespace"], meta["name"]
        node = spec.get("nodeName")
        if meta.get("deletionTimestamp"):
            if node == self.name:
                runner = self.runners.pop(uid, None)
                if runner is not None:
                    runner.stop()
                self.core.delete_namespaced_pod(name, ns, grace_period_seconds=0)
            return
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return
        if not node:
            binding: Any = {
                "apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": name, "namespace": ns},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.name},
            }
            # Raw response: the client's model rejects the Binding the API returns.
            self.core.create_namespaced_pod_binding(name, ns, binding, _preload_content=False)
            return
        if node != self.name:
            return
        runner = self.runners.get(uid)
        if runner is None:
            if time.monotonic() >= self.restart_at.get(uid, 0.0):
                self._run(pod)
            return
        if runner.proc is not None and runner.proc.poll() is not None:
            code = runner.proc.returncode
            log.warning("pod %s/%s exited with %s; restarting", ns, name, code)
            runner.stop()
            self.runners.pop(uid)
            self.restarts[uid] = self.restarts.get(uid, 0) + 1
            self._report(pod, ready=False)
            # Back off like CrashLoopBackOff, without holding up the other pods' sync.
            self.restart_at[uid] = time.monotonic() + min(10.0, 0.5 * 2 ** self.restarts[uid])

    def _run(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        account = pod["spec"].get("serviceAccountName") or "default"
        workdir = self.log_dir / f"{meta['namespace']}_{meta['name']}"
        workdir.mkdir(parents=True, exist_ok=True)
        image = None
        if self.images is not None and self.api_server is not None:
            image = self.images(pod["spec"]["containers"][0].get("image", ""))
            host, port = self.api_server
            env = {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": str(port),
                   **self.extra_env}
        else:
            env = {
                # The image's entry points: this virtualenv's bin/ first on PATH.
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
                        f"{os.environ.get('PATH', '')}",
                # Instead of the in-cluster token mount: the pod's own ServiceAccount.
                "KUBECONFIG": str(self.kubeconfig_for(meta["namespace"], account)),
                **self.extra_env,
            }
        runner = PodRunner(pod, self.fetch, resync_period=1.0, extra_env=env,
                           root=workdir / "root", token=self._token)
        runner.start(log=workdir / "container.log", image=image)
        self.runners[uid] = runner
        self.ran.append((meta["namespace"], meta["name"], runner.spec.get("image", "")))
        self._report(pod, ready=True)

    def _token(self, namespace: str, account: str, expiration: int) -> str:
        body: Any = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                     "spec": {"audiences": [], "expirationSeconds": max(600, expiration)}}
        response: Any = self.core.create_namespaced_service_account_token(
            account, namespace, body, _preload_content=False)
        return str(json.loads(response.data)["status"]["token"])

    def _report(self, pod: dict[str, Any], ready: bool) -> None:
        meta = pod["metadata"]
        status = pod_status(pod, ready, self.restarts.get(meta["uid"], 0))
        self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"],
                                              {"status": status})

    def logs(self, namespace: str, name: str) -> str:
        path = self.log_dir / f"{namespace}_{name}" / "container.log"
        return path.read_text(errors="replace") if path.exists() else ""
