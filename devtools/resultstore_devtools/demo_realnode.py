"""The demo's local target on the real node: the operator's pod from manifests/ and the
worker's pod from manifests/examples/ run on containerd + kubelet (resultstore_devtools.
realnode), in the project's images, with the kubelet's Secret volumes, projected token and
probes.

Control plane, PostgreSQL and Redis are LocalTarget's (demo_local.py); what differs is where
the pods run. The manifests are changed only as this machine's node needs
(localnode.local_node_install: hostNetwork and loopback addresses, since all traffic stays
on this machine; the ResultStore's spec.cleanupJob.hostNetwork, so that the CronJob's own
Jobs run here too), and the demo's operator gets a short rotation grace. For the same reason
of length the demo's kubelet resyncs pods every 10 s instead of the default minute, so a
rotation takes seconds: the e2e tests keep the default (docs/CONTROLPLANE.md).
"""

from __future__ import annotations

import json
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import image
from .demo_local import LocalTarget
from .demo_story import (
    OPERATOR_NS,
    ROOT,
    STORE,
    WORKER_LABEL,
    Broker,
    Database,
    cleanup_policy_env,
    detail,
    show_pod,
    step,
)
from .localnode import local_node_install
from .procs import eventually, free_port
from .realnode import RealNode

__all__ = ["DEMO_OPERATOR_ENV", "DEMO_SYNC_FREQUENCY", "RealNodeTarget", "worker_on_node"]

OPERATOR_DEPLOYMENT = "deployment/resultstore-operator"
# The kubelet refreshes a mounted Secret on its pod resync (syncFrequency plus up to 50 %
# jitter): 10 s here, so 30 s of grace leave room; the operator's default is 120 s for the
# kubelet's default minute.
DEMO_SYNC_FREQUENCY = "10s"
DEMO_OPERATOR_ENV = {"RESULTSTORE_ROTATION_GRACE": "30", "RESULTSTORE_TICK_INTERVAL": "1"}
# Another session's node (one per machine) is waited for, as the e2e tests do.
CLAIM_WAIT = 480.0


def worker_on_node(deployment: dict[str, Any]) -> dict[str, Any]:
    """The example worker Deployment as this machine's node runs it (pure): hostNetwork, so
    it reaches Redis and PostgreSQL on 127.0.0.1; image, user and volumes as shipped."""
    out = json.loads(json.dumps(deployment))
    out["spec"]["template"]["spec"]["hostNetwork"] = True
    return out


@dataclass
class RealNodeTarget(LocalTarget):
    """LocalTarget whose operator and worker are pods on the real node."""

    # The kubelet (syncFrequency 10 s) refreshes the worker's Secret volume within ~15 s;
    # the previous role's sessions are ended only after this, and the grace (30 s) passes.
    drain_timeout: str = "60s"
    # The CronJob's own Jobs reach PostgreSQL on 127.0.0.1 (loopback-only CNI).
    cleanup_host_network: bool = True
    node: RealNode | None = None

    def operator_env(self) -> dict[str, str]:
        """The Deployment's extra env: the demo's timings, and hostNetwork cleanup Jobs
        allowed (the store asks for them: RESULTSTORE_CLEANUP_ALLOW_HOST_NETWORK)."""
        return {**DEMO_OPERATOR_ENV, **cleanup_policy_env(self.cleanup_host_network)}

    def install_operator(self) -> None:
        kubectl = self.kubectl
        with step("The real node: containerd + kubelet + kube-scheduler (pods really run)"):
            built = image.build(progress=detail)
            node = RealNode(admin_kubeconfig=self.cluster.kubeconfig, state_dir=self.work / "node",
                            images=[built.operator, built.worker], watchdog=not self.keep,
                            claim_wait=CLAIM_WAIT, progress=detail,
                            sync_frequency=DEMO_SYNC_FREQUENCY)
            node.start()
            self.node = node
            if not self.keep:
                self.stack.callback(self._stop_node)
            detail(f"node {node.node_name} Ready; images {built.operator}, {built.worker}; "
                   f"kubelet syncFrequency {DEMO_SYNC_FREQUENCY} (the demo's; the default "
                   "is 1m)")
            detail(kubectl("get", "nodes", "-o", "wide"))

        with step("Install the operator: kubectl kustomize manifests/ | kubectl apply"):
            rendered = kubectl("kustomize", str(ROOT / "manifests"))
            docs = [d for d in yaml.safe_load_all(rendered) if d]
            port = urllib.parse.urlsplit(self.cluster.server).port
            assert port is not None
            self.webhook_port = free_port()
            extra_env = self.operator_env()
            install = local_node_install(docs, port, free_port(), self.webhook_port,
                                         extra_env=extra_env)
            detail(kubectl("apply", "--server-side", "-f", "-",
                           stdin=yaml.safe_dump_all(install)))
            kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/resultstores.resultstore.dev")
            detail("(the Deployment changed only as this machine's node needs: hostNetwork, "
                   "one replica, loopback addresses, the webhook by URL; "
                   + ", ".join(f"{k}={v}" for k, v in extra_env.items()) + ")")
            detail("(the ResultStore will get spec.cleanupJob.hostNetwork: true, so that its "
                   "CronJob's Jobs reach PostgreSQL on 127.0.0.1 here; the operator refuses "
                   "that unless RESULTSTORE_CLEANUP_ALLOW_HOST_NETWORK=true, set above)")

        with step("The operator's pod: Ready through its readiness probe, serving the webhook"):
            try:
                kubectl("-n", OPERATOR_NS, "rollout", "status", OPERATOR_DEPLOYMENT,
                        "--timeout=180s", timeout=200)
            except RuntimeError:
                detail(kubectl("-n", OPERATOR_NS, "describe", "pods", check=False)[-3000:])
                detail(self.operator_logs())
                raise

            def webhook_registered() -> bool:
                hooks = kubectl.json("mutatingwebhookconfigurations")["items"]
                return any(
                    (w.get("clientConfig") or {}).get("url", "").startswith(
                        f"https://127.0.0.1:{self.webhook_port}") and
                    (w.get("clientConfig") or {}).get("caBundle")
                    for h in hooks for w in h.get("webhooks") or [])

            eventually(webhook_registered, 90, "the operator to register its webhook")
            detail(kubectl("-n", OPERATOR_NS, "get", "pods", "-o", "wide"))

    def _stop_node(self) -> None:
        if self.node is None:
            return
        leftovers = self.node.stop()
        self.node = None
        if leftovers:
            detail(f"node stop could NOT undo: {'; '.join(leftovers)}")
            raise RuntimeError("the real node's stop did not restore the host")

    def operator_logs(self) -> str:
        return self.kubectl("-n", OPERATOR_NS, "logs", OPERATOR_DEPLOYMENT, "--tail=60",
                            check=False)

    def run_worker(self, deployment: dict[str, Any], broker: Broker) -> dict[str, Any]:
        kubectl, ns = self.kubectl, self.namespace
        with step("The worker Deployment: its pod admitted, mutated and run on the node"):
            detail(kubectl("apply", "-n", ns, "-f", "-",
                           stdin=yaml.safe_dump(worker_on_node(deployment))))
            try:
                kubectl("-n", ns, "rollout", "status", "deployment/orders-worker",
                        "--timeout=180s", timeout=200)
            except RuntimeError:
                detail(kubectl("-n", ns, "describe", "pods", check=False)[-3000:])
                raise
            pods = kubectl.json("-n", ns, "pods", "-l", WORKER_LABEL)["items"]
            pod = next(p for p in pods if not p["metadata"].get("deletionTimestamp"))
            self.worker_pod = pod
            detail(f"pod {pod['metadata']['name']} Running on node {pod['spec'].get('nodeName')}"
                   f" (image {pod['spec']['containers'][0]['image']})")
            show_pod(pod)
        return dict(pod)

    def worker_ready(self, client: Any) -> None:
        with step("The worker answers (first task through the broker)"):
            started = time.monotonic()
            client().get(timeout=120)
            detail(f"first result after {time.monotonic() - started:.1f}s")

    def _mounted_username(self) -> Path:
        assert self.node is not None
        uid = self.worker_pod["metadata"]["uid"]
        volume = next(v["name"] for v in self.worker_pod["spec"].get("volumes") or []
                      if (v.get("secret") or {}).get("secretName") == f"{STORE}-resultstore")
        return (self.node.layout.kubelet_root / "pods" / uid / "volumes" /
                "kubernetes.io~secret" / volume / "username")

    def worker_secret_updates(self) -> str:
        ns, name = self.namespace, self.worker_pod["metadata"]["name"]
        pod = self.kubectl.json("-n", ns, f"pod/{name}")
        restarts = sum(c.get("restartCount", 0)
                       for c in (pod.get("status") or {}).get("containerStatuses") or [])
        try:
            mounted = self._mounted_username().read_text()
        except OSError as exc:
            mounted = f"unreadable ({exc.strerror})"
        return (f"the kubelet refreshed the worker pod's Secret volume (username there: "
                f"{mounted}); the pod restarted {restarts} time(s)")

    def keep_message(self, db: Database, broker: Broker) -> str:
        return (super().keep_message(db, broker) +
                f"\nNode: resultstore-dev node stop --state-dir {self.work / 'node'}")

    def teardown(self) -> None:
        return None
