"""Kubernetes ownership and policy (issue 14), on the local control plane with the real
operator process: what the operator did not create it leaves exactly as it was, it runs only
the cleanup pods its settings allow, and it never receives the data of an admin Secret that
has not opted in."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.operator_support import (
    OpEnv,
    OperatorProcess,
    eventually,
    make_openv,
    no_secret_in,
)
from tests.helpers.api_recorder import RecordingApiProxy

ALLOWED = "registry.example/cleanup"


@pytest.fixture
def env(kube: Any, api_client: Any, namespace: str, postgres: Any,
        pg_database: Any) -> Iterator[OpEnv]:
    yield from make_openv(kube, api_client, namespace, postgres, pg_database, extra_env={
        "RESULTSTORE_CLEANUP_IMAGE_ALLOWLIST": f"{ALLOWED}:*"})


def schema_exists(env: OpEnv, schema: str) -> bool:
    return bool(env.query("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)))


def warnings(env: OpEnv, store: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in env.cluster.events(env.namespace, store)
            if e.get("type") == "Warning" and e.get("reason") == reason]


def reconciles_pass(env: OpEnv, store: str, count: int = 2) -> None:
    """Wait until the operator has looked at `store` again `count` times (its status'
    lastCheckTime or failed-retry log lines move), so "left alone" is not just "not yet"."""
    marks: set[str] = set()

    def moved() -> bool:
        obj = env.cluster.store(env.namespace, store) or {}
        stamp = ((obj.get("status") or {}).get("database") or {}).get("lastCheckTime")
        retries = env.operator.text().count(f"{store}: reconcile failed")
        marks.add(f"{stamp}/{retries}")
        return len(marks) > count

    eventually(moved, 60, f"{count} more reconciles of {store}")


def test_foreign_secret_is_left_as_it_was_and_survives_the_store(env: OpEnv) -> None:
    core, ns = env.cluster.core, env.namespace
    for store in ("orders", "billing"):
        # Someone else's Secret of the store's name; a copied managed-by label proves nothing.
        core.create_namespaced_secret(ns, {
            "metadata": {"name": f"{store}-resultstore",
                         "labels": {"app.kubernetes.io/managed-by": "resultstore-operator"}},
            "type": "Opaque", "stringData": {"uri": f"postgresql://someone-else/{store}"}})
    before: dict[str, dict[str, Any]] = {}
    for store in ("orders", "billing"):
        found = env.cluster.secret(ns, f"{store}-resultstore")
        assert found is not None, f"{store}'s foreign Secret was not created"
        before[store] = found
    env.create("orders", "s_orders")
    env.create("billing", "s_billing", deletionPolicy="Delete")
    for store in ("orders", "billing"):
        cond = env.cluster.wait_condition(ns, store, "Ready", "False", reason="SecretNotOwned",
                                          timeout=45)
        assert "has no controller ownerReference" in cond["message"], cond
        assert f"Secret '{store}-resultstore' already exists" in cond["message"], cond
        eventually(partial(warnings, env, store, "SecretNotOwned"), 30,
                   f"a Warning Event SecretNotOwned on {store}")
    reconciles_pass(env, "orders")
    for store in ("orders", "billing"):
        after = env.cluster.secret(ns, f"{store}-resultstore")
        assert after is not None
        assert after["metadata"]["resourceVersion"] == \
            before[store]["metadata"]["resourceVersion"], f"{store}'s foreign Secret was written"
        assert after["data"] == before[store]["data"] and after["type"] == "Opaque"
        assert not after["metadata"].get("ownerReferences")
        # Nothing was provisioned for a Secret that cannot be written: no schema, no
        # password, and no CronJob (its pods would mount the foreign Secret and run cleanup
        # against whatever database it names).
        assert not schema_exists(env, f"s_{store}")
        assert env.cluster.cronjob(ns, store) is None, f"{store}: a CronJob mounts it"
    assert len(warnings(env, "orders", "SecretNotOwned")) == 1, "one Event, not one per retry"

    # Deleting the store deletes nothing it does not own.
    env.cluster.delete_store(ns, "billing")
    eventually(lambda: env.cluster.store(ns, "billing") is None, 60, "billing to be deleted")
    survivor = env.cluster.secret(ns, "billing-resultstore")
    assert survivor is not None and survivor["metadata"]["resourceVersion"] == \
        before["billing"]["metadata"]["resourceVersion"]

    # Removing the foreign Secret is all it takes for the store to create its own.
    core.delete_namespaced_secret("orders-resultstore", ns)
    env.ready("orders", timeout=60)
    own = env.cluster.secret(ns, "orders-resultstore")
    assert own is not None and own["type"] == "servicebinding.io/postgresql"
    assert [r["uid"] for r in own["metadata"]["ownerReferences"]] == [
        (env.cluster.store(ns, "orders") or {})["metadata"]["uid"]]


def test_foreign_cronjob_is_left_as_it_was(env: OpEnv) -> None:
    ns = env.namespace
    foreign = {"metadata": {"name": "jobs-resultstore-cleanup"},
               "spec": {"schedule": "0 3 * * *", "suspend": True, "jobTemplate": {"spec": {
                   "template": {"spec": {"restartPolicy": "Never", "containers": [
                       {"name": "theirs", "image": "example/their-job:1"}]}}}}}}
    env.cluster.batch.create_namespaced_cron_job(ns, foreign)
    before = env.cluster.cronjob(ns, "jobs")
    assert before is not None
    env.create("jobs", "s_jobs")
    cond = env.cluster.wait_condition(ns, "jobs", "CleanupScheduled", "False",
                                      reason="CronJobNotOwned", timeout=45)
    assert "CronJob 'jobs-resultstore-cleanup' already exists" in cond["message"]
    ready = env.cluster.wait_condition(ns, "jobs", "Ready", "False", reason="CronJobNotOwned")
    assert ready["message"] == cond["message"]
    reconciles_pass(env, "jobs")
    after = env.cluster.cronjob(ns, "jobs")
    assert after is not None
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert after["spec"] == before["spec"]
    assert not after["metadata"].get("ownerReferences")
    assert len(warnings(env, "jobs", "CronJobNotOwned")) == 1

    env.cluster.batch.delete_namespaced_cron_job("jobs-resultstore-cleanup", ns)
    env.ready("jobs", timeout=60)
    own = env.cluster.cronjob(ns, "jobs")
    assert own is not None and own["metadata"]["ownerReferences"][0]["kind"] == "ResultStore"


def test_cleanup_pods_run_only_what_the_settings_allow(env: OpEnv) -> None:
    ns = env.namespace
    env.create("miner", "s_miner", cleanupJob={"image": "docker.io/attacker/miner:latest"})
    env.create("account", "s_account", cleanupJob={"serviceAccountName": "default"})
    env.create("hostnet", "s_hostnet", cleanupJob={"hostNetwork": True})
    env.create("allowed", "s_allowed", cleanupJob={"image": f"{ALLOWED}:2.0"})
    env.create("plain", "s_plain")
    expected = {"miner": "spec.cleanupJob.image 'docker.io/attacker/miner:latest' is not "
                         "allowed",
                "account": "spec.cleanupJob.serviceAccountName is not allowed",
                "hostnet": "spec.cleanupJob.hostNetwork is not allowed by the operator's "
                           "settings (RESULTSTORE_CLEANUP_ALLOW_HOST_NETWORK)"}
    for store, words in expected.items():
        cond = env.cluster.wait_condition(ns, store, "Ready", "False",
                                          reason="CleanupJobNotAllowed", timeout=45)
        assert words in cond["message"], cond
        assert warnings(env, store, "CleanupJobNotAllowed")
    for store in ("allowed", "plain"):
        env.ready(store)
    for store in expected:  # refused before anything was touched
        assert env.cluster.cronjob(ns, store) is None
        assert env.cluster.secret(ns, f"{store}-resultstore") is None
        assert not schema_exists(env, f"s_{store}")
    images = {}
    for store in ("allowed", "plain"):
        cj = env.cluster.cronjob(ns, store)
        assert cj is not None
        pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, "cleanup pod mounts an SA token"
        assert "serviceAccountName" not in pod
        assert "hostNetwork" not in pod
        images[store] = pod["containers"][0]["image"]
    assert images == {"allowed": f"{ALLOWED}:2.0", "plain": "celery-resultstore:e2e"}

    # A permanent refusal until the spec changes; fixing the spec is enough.
    env.cluster.patch_store(ns, "miner", {"spec": {"cleanupJob": {"image": None}}})
    env.ready("miner", timeout=60)
    cj = env.cluster.cronjob(ns, "miner")
    assert cj is not None
    assert cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0][
        "image"] == "celery-resultstore:e2e"


def test_admin_secret_without_opt_in_is_never_read(env: OpEnv) -> None:
    """The API server never sends the operator that Secret's data: every request for it asks
    for metadata only (PartialObjectMetadata), and the Secret watch is label-selected."""
    ns = env.namespace
    # The real admin credentials, but not labelled: nobody said the operator may use them.
    env.cluster.admin_secret(ns, env.admin, "plain-admin", opt_in=False)
    env.operator.stop()
    proxy = RecordingApiProxy(env.kubeconfig).start()
    kubeconfig = proxy.write_kubeconfig(Path(tempfile.mkstemp(
        prefix="recorded-", suffix=".kubeconfig")[1]))
    # With its plugins (the rollout watches Secrets; the webhook stays off by env).
    recorded = OperatorProcess(kubeconfig, (ns,), env.operator.extra_env,
                               env.operator.log_path, args=())
    try:
        recorded.start()
        env.operator = recorded
        env.create("shy", "s_shy", database={**env.spec("x")["database"],
                                              "adminSecretRef": {"name": "plain-admin"}})
        env.create("open", "s_open")  # the opted-in pg-admin: works as before
        cond = env.cluster.wait_condition(ns, "shy", "Ready", "False",
                                          reason="AdminSecretNotOptedIn", timeout=45)
        assert "resultstore.dev/admin-credentials" in cond["message"], cond
        assert warnings(env, "shy", "AdminSecretNotOptedIn")
        env.ready("open")
        reconciles_pass(env, "shy")
        assert not schema_exists(env, "s_shy")
        assert env.cluster.cronjob(ns, "shy") is None, "a refused store got a CronJob"

        requests = proxy.seen()
        for_it = [r for r in requests if r.path.split("?")[0].endswith(
            f"/namespaces/{ns}/secrets/plain-admin")]
        assert for_it, "the operator never even looked at the Secret's metadata"
        data_reads = [r for r in for_it if "as=PartialObjectMetadata" not in r.accept]
        assert not data_reads, f"the Secret's data was requested: {data_reads}"
        # Collection reads of Secrets (the rollout's watch) carry the managed-by selector.
        lists = [r for r in requests if r.method == "GET" and r.path.split("?")[0].endswith(
            "/secrets")]
        assert lists, "no Secret watch seen: the check below would prove nothing"
        unselected = [r for r in lists if "labelSelector=app.kubernetes.io" not in
                      r.path.replace("%2F", "/")]
        assert not unselected, f"Secrets listed or watched without a selector: {unselected}"

        # Labelling the Secret is the opt-in; the store then provisions with it.
        env.cluster.core.patch_namespaced_secret("plain-admin", ns, {"metadata": {"labels": {
            "resultstore.dev/admin-credentials": "true"}}})
        env.ready("shy", timeout=60)
        everything = json.dumps(env.cluster.store(ns, "shy")) + json.dumps(
            env.cluster.events(ns)) + env.operator.text()
        no_secret_in(everything, env.admin.password)
    finally:
        env.operator.stop()
        proxy.stop()
        kubeconfig.unlink(missing_ok=True)


def test_apply_carries_a_uid_precondition(env: OpEnv) -> None:
    """The CronJob apply names the uid it inspected: the API server refuses to apply
    over an object that replaced ours between the read and the write, instead of the forced
    apply adopting it. Shown on the API itself, with the operator's own Kube helper."""
    from kubernetes.client.exceptions import ApiException

    from resultstore_operator.builders.cronjob import cronjob_manifest
    from resultstore_operator.builders.ownership import owner_reference
    from resultstore_operator.kube import FIELD_MANAGER, Kube
    from resultstore_operator.spec import parse_spec

    ns = env.namespace
    env.create("race", "s_race")
    uid = (env.cluster.store(ns, "race") or {})["metadata"]["uid"]
    kube = Kube(env.cluster.api)
    desired = cronjob_manifest("racer", ns, owner_reference("race", uid),
                               parse_spec(env.spec("s_racer")), "celery-resultstore:e2e")
    assert kube.apply_cronjob(desired)[0] == "created"
    assert kube.apply_cronjob(desired)[0] is None  # unchanged: a no-op, precondition met
    stale = json.loads(json.dumps(desired))
    stale["metadata"]["uid"] = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(ApiException) as info:
        env.cluster.batch.patch_namespaced_cron_job(
            "racer-resultstore-cleanup", ns, stale, field_manager=FIELD_MANAGER, force=True,
            _content_type="application/apply-patch+yaml")
    # 422 "metadata.uid: ... field is immutable" (or 409 on other versions): refused either way.
    assert info.value.status in (409, 422), info.value
    assert "uid" in str(info.value.body), info.value.body
    after = env.cluster.cronjob(ns, "racer")
    assert after is not None and after["metadata"]["uid"] != stale["metadata"]["uid"]
