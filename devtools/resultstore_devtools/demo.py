"""The story both targets run; `scripts/demo`.

Usage and the steps: demo_args.py (also what --help prints). The story's shared parts (output,
kubectl, the examples' edits) are in demo_story.py; the targets: this machine with its pods
on the real node (demo_realnode.py, the default), this machine with the Python stand-in
(demo_local.py: only where a real node cannot start, or with RESULTSTORE_NODE=standin;
resultstore_devtools.localnode decides and the demo says which), or an existing cluster
(demo_cluster.py, --kubeconfig).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from .demo_args import parse_args
from .demo_local import LocalTarget, wrapped
from .demo_report import format_table, leave_workdir
from .demo_story import (
    STORE,
    Target,
    condition,
    detail,
    elapsed,
    examples,
    point_examples,
    say,
    step,
)
from .kubelet import SecretMirror, api_fetcher
from .procs import eventually

__all__ = ["local_target", "main", "parse_args", "run"]


def local_target(keep: bool, stack: contextlib.ExitStack, work: Path) -> LocalTarget:
    """This machine's target: the real node unless it cannot start here (said loudly)."""
    from .demo_realnode import RealNodeTarget
    from .localnode import NodeRequest, choose_node
    from .realnode import RealNode

    probe = RealNode(admin_kubeconfig=Path(os.devnull))
    choice = choose_node(NodeRequest.from_env(), probe.problems())
    if choice.real:
        say(f"The demo's {choice.describe()}.")
        return RealNodeTarget(keep, stack, work)
    say(f"\033[33mWARNING: the demo's {choice.describe()}.\033[0m")
    return LocalTarget(keep, stack, work)


# ------------------------------------------------------------------------------ the story


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
            target = local_target(args.keep, stack, work)
        target.start_cluster()
        db, broker = target.start_services()
        target.install_operator()
        kubectl, namespace = target.kubectl, target.namespace

        with step(f"kubectl apply -f manifests/examples/ (namespace {namespace!r})"):
            kubectl("apply", "-f", "-", stdin=yaml.safe_dump(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}))
            docs = point_examples(examples(), db, broker, target.drain_timeout,
                                  target.cleanup_host_network)
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
            detail(wrapped("(the demo's own client reads this machine's kubelet-style mirror "
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
