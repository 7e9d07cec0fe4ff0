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
teardown. The demo's temporary directory (copies of the store's Secret, the operator's token,
the logs) is removed at the end, also on failure or Ctrl-C; --keep keeps it and names it.

Locally (the default) the control plane has no nodes, so the operator runs as a local process
with its ServiceAccount's token (RBAC constrains it exactly as in-cluster) and the worker
pod's container runs here through kubelet.py. With --kubeconfig everything runs in the
cluster: the operator from its Deployment (the image must be pullable by, or loaded into,
the nodes), a PostgreSQL and a Redis from the official images (or yours: --postgres,
--broker-url), and the worker pod on a node; this machine reaches the in-cluster services
through `kubectl port-forward`. See demo_cluster.py.
"""

# Standard library only (and demo_services' constants, also standard library only):
# `scripts/demo --help` runs this module with the system python3 on a fresh clone, before the
# bootstrap has made a virtualenv (tests/unit/test_demo_help.py).

from __future__ import annotations

import argparse
from pathlib import Path

from .demo_services import POSTGRES_IMAGE, REDIS_IMAGE

DATABASE = "celery"
ADMIN_USER = "resultstore_admin"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true",
                        help="leave everything running at the end, and the temporary "
                             "directory (its path and contents are printed last)")
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
    cluster.add_argument("--host-network", action="store_true",
                         help="run the operator and worker pods with hostNetwork on loopback "
                              "addresses, and the store's cleanup Jobs with "
                              "spec.cleanupJob.hostNetwork (the operator it installs gets "
                              "RESULTSTORE_CLEANUP_ALLOW_HOST_NETWORK=true): for a "
                              "one-machine cluster without a pod network (resultstore-dev "
                              "node), with --postgres and --broker-url on 127.0.0.1")
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




if __name__ == "__main__":
    parse_args()
