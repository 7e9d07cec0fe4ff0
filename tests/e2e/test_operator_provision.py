"""Provisioning: a ResultStore becomes a schema, a least-privilege role, a Secret, a CronJob.

The operator runs as a real process against the control plane and a real PostgreSQL.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from resultstore_backend.config import read_binding_dir
from resultstore_backend.schema import SCHEMA_VERSION
from resultstore_devtools.binaries import Binaries
from tests.e2e.operator_support import (
    OpEnv,
    SecretMirror,
    can_login,
    connect_as,
    eventually,
    make_openv,
)

CONTRACT_KEYS = {"type", "provider", "host", "port", "database", "username", "password",
               "sslmode", "schema", "uri", "result_backend", "engine_options.json",
               "celery.json"}
CLEANUP_JOB = {
    "image": "registry.example/resultstore:1.2",
    "resources": {"requests": {"cpu": "50m", "memory": "64Mi"},
                  "limits": {"memory": "128Mi"}},
    "nodeSelector": {"pool": "batch"},
    "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
    "serviceAccountName": "cleaner",
    "hostNetwork": True,
    "successfulJobsHistoryLimit": 2,
    "failedJobsHistoryLimit": 4,
}


@pytest.fixture
def env(kube: Any, api_client: Any, namespace: str, postgres: Any,
        pg_database: Any) -> Iterator[OpEnv]:
    # The operator's settings allow the custom image, ServiceAccount and hostNetwork
    # CLEANUP_JOB names (by default only the operator's own image, no ServiceAccount, no
    # hostNetwork: issues 14 and 18).
    yield from make_openv(kube, api_client, namespace, postgres, pg_database, extra_env={
        "RESULTSTORE_CLEANUP_IMAGE_ALLOWLIST": "registry.example/resultstore:*",
        "RESULTSTORE_CLEANUP_ALLOW_SERVICE_ACCOUNT": "true",
        "RESULTSTORE_CLEANUP_ALLOW_HOST_NETWORK": "true"})


def test_store_is_provisioned_with_secret_cronjob_status_and_events(
        env: OpEnv, kube_tools: Binaries) -> None:
    env.create("orders", "orders", cleanupJob=CLEANUP_JOB,
               retention={"schedule": "*/10 * * * *", "batchSize": 321, "expires": "2h"})
    store = env.ready("orders")
    uid = store["metadata"]["uid"]

    status = store["status"]
    assert status["observedGeneration"] == store["metadata"]["generation"]
    assert status["phase"] == "Ready"
    assert status["secretName"] == "orders-resultstore"
    assert status["schemaVersion"] == SCHEMA_VERSION
    types = {c["type"]: c for c in status["conditions"]}
    for type_ in ("Ready", "SchemaReady", "CredentialsReady", "CleanupScheduled"):
        cond = types[type_]
        assert cond["status"] == "True", cond
        assert {"reason", "message", "lastTransitionTime", "observedGeneration"} <= set(cond)
    assert status["credentials"]["phase"] == "Stable"

    # the Secret: every contract key, the binding type, owned by the store, readable by the backend
    secret = env.cluster.secret(env.namespace, "orders-resultstore")
    assert secret is not None and secret["type"] == "servicebinding.io/postgresql"
    assert set(secret["data"]) == CONTRACT_KEYS
    owner = secret["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("ResultStore", uid, True)
    assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == \
        "resultstore-operator", secret["metadata"]["labels"]
    binding = env.binding("orders")
    assert binding["username"] == status["credentials"]["activeRole"]
    assert binding["schema"] == "orders" and binding["database"] == env.database
    with tempfile.TemporaryDirectory() as tmp:
        with SecretMirror(env.cluster.fetch, env.namespace, "orders-resultstore", Path(tmp) / "b"):
            config = read_binding_dir(Path(tmp) / "b")
    assert config.names.schema == "orders" and config.expires == 7200
    assert can_login(binding)

    # the CronJob: command, Secret mount, Forbid, history limits and the pod settings
    cj = env.cluster.cronjob(env.namespace, "orders")
    assert cj is not None
    assert cj["metadata"]["ownerReferences"][0]["uid"] == uid
    assert cj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "resultstore-operator"
    assert cj["spec"]["schedule"] == "*/10 * * * *"
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    assert cj["spec"]["successfulJobsHistoryLimit"] == 2
    assert cj["spec"]["failedJobsHistoryLimit"] == 4
    pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["resultstore", "cleanup", "--config-dir",
                                    "/var/run/resultstore/orders", "--batch-size", "321"]
    assert container["image"] == CLEANUP_JOB["image"]
    assert container["resources"] == CLEANUP_JOB["resources"]
    assert container["volumeMounts"][0] == {"name": "resultstore-binding", "readOnly": True,
                                            "mountPath": "/var/run/resultstore/orders"}
    assert pod["volumes"][0]["secret"]["secretName"] == "orders-resultstore"
    assert pod["nodeSelector"] == CLEANUP_JOB["nodeSelector"]
    assert pod["tolerations"] == CLEANUP_JOB["tolerations"]
    assert pod["serviceAccountName"] == "cleaner"
    assert pod["automountServiceAccountToken"] is False
    assert (pod["hostNetwork"], pod["dnsPolicy"]) == (True, "ClusterFirstWithHostNet")

    # an Event for every action
    reasons = env.cluster.reasons(env.namespace, "orders")
    for reason in ("SchemaMigrated", "RoleCreated", "SecretCreated", "CronJobCreated", "Ready"):
        assert reason in reasons, reasons

    # printer columns, through kubectl like a user
    out = subprocess.run(
        [str(kube_tools.kubectl), "--kubeconfig", str(env.kubeconfig), "-n", env.namespace,
         "get", "rstore", "orders"], capture_output=True, text=True, check=True).stdout
    header, row = out.splitlines()[:2]
    assert header.split() == ["NAME", "READY", "REASON", "SCHEMA", "SECRET", "CONNECTIONS",
                              "AGE"]
    assert row.split()[:5] == ["orders", "True", "Ready", "orders", "orders-resultstore"]
    assert row.split()[5].endswith("/-")  # in use / no limit (status.connections.summary)


def test_login_role_is_least_privilege(env: OpEnv) -> None:
    env.create("orders", "orders")
    env.ready("orders")
    binding = env.binding("orders")
    role = binding["username"]
    attrs = env.query("SELECT rolsuper, rolcreaterole, rolcreatedb, rolcanlogin, rolinherit "
                      "FROM pg_roles WHERE rolname = %s", (role,))
    assert attrs == [(False, False, False, True, False)]
    with connect_as(binding) as conn:
        # DML on its tables through the search_path, sequences usable
        conn.execute("INSERT INTO celery_taskmeta (task_id, status) VALUES ('t1', 'SUCCESS')")
        conn.execute("UPDATE celery_taskmeta SET status = 'FAILURE' WHERE task_id = 't1'")
        assert conn.execute("SELECT status FROM orders.celery_taskmeta").fetchall() == [
            ("FAILURE",)]
        conn.execute("DELETE FROM celery_taskmeta")
        # no DDL anywhere, the version table is read-only
        for statement in ("CREATE TABLE orders.evil (x int)", "CREATE TABLE public.evil (x int)",
                          "CREATE SCHEMA evil", "DROP TABLE orders.celery_taskmeta",
                          "TRUNCATE orders.celery_taskmeta",
                          "INSERT INTO orders.resultstore_schema_version VALUES "
                          "(99, 'x', now())"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        assert conn.execute("SELECT max(version) FROM orders.resultstore_schema_version"
                            ).fetchone() == (SCHEMA_VERSION,)


def test_two_stores_in_one_database_cannot_read_each_other(env: OpEnv) -> None:
    env.create("alpha", "alpha")
    env.create("beta", "beta")
    env.ready("alpha")
    env.ready("beta")
    alpha, beta = env.binding("alpha"), env.binding("beta")
    assert alpha["username"] != beta["username"]
    with connect_as(alpha) as conn:
        conn.execute("INSERT INTO celery_taskmeta (task_id, status) VALUES ('a', 'SUCCESS')")
    with connect_as(beta) as conn:
        conn.execute("INSERT INTO celery_taskmeta (task_id, status) VALUES ('b', 'SUCCESS')")
        assert conn.execute("SELECT task_id FROM celery_taskmeta").fetchall() == [("b",)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM alpha.celery_taskmeta")
    with connect_as(alpha) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM beta.celery_taskmeta")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM beta.celery_tasksetmeta")
        assert conn.execute("SELECT has_schema_privilege('beta', 'USAGE')").fetchone() == (
            False,)


def test_an_older_schema_is_upgraded_in_place(env: OpEnv) -> None:
    """A schema written by stock Celery (version 0: no version table) is adopted and migrated,
    its rows kept and readable by the store's role. The admin role created it, as it would
    have for a hand-made store. Taking over tables the store did not create needs the
    explicit spec.schemaPolicy: AdoptExisting (issue 14): without it the store refuses."""
    env.admin_query("CREATE SCHEMA legacy")
    env.admin_query("CREATE SEQUENCE legacy.task_id_sequence")
    env.admin_query("CREATE TABLE legacy.celery_taskmeta (id integer NOT NULL DEFAULT "
              "nextval('legacy.task_id_sequence') PRIMARY KEY, task_id varchar(155) UNIQUE, "
              "status varchar(50), result bytea, date_done timestamp, traceback text)")
    env.admin_query("INSERT INTO legacy.celery_taskmeta (task_id, status, date_done) "
              "VALUES ('old-1', 'SUCCESS', now())")
    env.create("legacy", "legacy")
    cond = env.cluster.wait_condition(env.namespace, "legacy", "Ready", "False",
                                      reason="OwnershipConflict")
    assert "AdoptExisting" in cond["message"], cond["message"]
    assert env.query("SELECT count(*) FROM pg_tables WHERE schemaname = 'legacy'") == [(1,)]
    env.cluster.patch_store(env.namespace, "legacy", {"spec": {"schemaPolicy": "AdoptExisting"}})
    store = env.ready("legacy")
    assert store["status"]["schemaVersion"] == SCHEMA_VERSION
    assert env.query("SELECT max(version) FROM legacy.resultstore_schema_version") == [
        (SCHEMA_VERSION,)]
    assert "SchemaMigrated" in env.cluster.reasons(env.namespace, "legacy")
    with connect_as(env.binding("legacy")) as conn:
        assert conn.execute("SELECT task_id, status FROM celery_taskmeta").fetchall() == [
            ("old-1", "SUCCESS")]


def test_cleanup_runs_are_reported_in_status(env: OpEnv, tmp_path: Path) -> None:
    env.create("orders", "orders", retention={"expires": "1h", "batchSize": 10})
    env.ready("orders")
    binding = env.binding("orders")
    old = datetime.now(UTC) - timedelta(hours=3)
    with connect_as(binding) as conn:
        for i in range(25):
            conn.execute("INSERT INTO celery_taskmeta (task_id, status, date_done) "
                         "VALUES (%s, 'SUCCESS', %s)", (f"old-{i}", old))
        conn.execute("INSERT INTO celery_taskmeta (task_id, status, date_done) "
                     "VALUES ('fresh', 'SUCCESS', now())")
    # run exactly what the CronJob's pod runs, against the Secret as the kubelet mounts it
    with SecretMirror(env.cluster.fetch, env.namespace, "orders-resultstore", tmp_path / "cfg"):
        cj = env.cluster.cronjob(env.namespace, "orders")
        assert cj is not None
        command = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0][
            "command"]
        command = [str(Path(sys.executable).parent / command[0]), *command[1:]]
        command[command.index("--config-dir") + 1] = str(tmp_path / "cfg")
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    def reported() -> dict[str, Any] | None:
        store = env.cluster.store(env.namespace, "orders") or {}
        last = (store.get("status") or {}).get("lastCleanup")
        return last if last and last.get("deleted", 0) >= 25 else None

    last = eventually(reported, 30, "the cleanup run in status.lastCleanup")
    assert last["succeeded"] is True and "startedAt" in last
    with connect_as(binding) as conn:
        assert conn.execute("SELECT task_id FROM celery_taskmeta").fetchall() == [("fresh",)]
