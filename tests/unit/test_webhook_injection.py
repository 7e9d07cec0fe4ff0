"""The pure pod-injection planner: patches, idempotency, conflicts, and never refusing."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import pytest

from resultstore_operator.injection import (
    CONTAINERS_ANNOTATION,
    ENV_NAME,
    INJECT_LABEL,
    MODE_ANNOTATION,
    OVERRIDE_ENV_ANNOTATION,
    STATUS_ANNOTATION,
    StoreLookup,
    StoreState,
    backend_url,
    plan_injection,
    requested_store,
    volume_name,
)

READY = StoreLookup(StoreState.READY)


def pod(store: str | None = "orders", *, annotations: dict[str, str] | None = None,
        containers: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"generateName": "worker-"}
    if store is not None:
        metadata["labels"] = {INJECT_LABEL: store, "app": "worker"}
    if annotations is not None:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"containers": containers if containers is not None else [
            {"name": "worker", "image": "w", "command": ["celery", "worker"]},
            {"name": "sidecar", "image": "s"},
        ], **spec},
    }


def apply(obj: dict[str, Any], lookup: StoreLookup = READY) -> dict[str, Any]:
    plan = plan_injection(obj, lookup)
    return jsonpatch.apply_patch(copy.deepcopy(obj), plan.patch) if plan.patch else obj


def env_of(container: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in container.get("env") or [] if e["name"] == ENV_NAME]


def test_default_mode_mounts_every_container_and_sets_url() -> None:
    result = apply(pod())
    assert result["spec"]["volumes"] == [
        {"name": "resultstore-orders", "secret": {"secretName": "orders-resultstore"}}]
    for c in result["spec"]["containers"]:
        assert c["volumeMounts"] == [{"name": "resultstore-orders",
                                      "mountPath": "/var/run/resultstore/orders",
                                      "readOnly": True}]
        assert env_of(c) == [{"name": ENV_NAME,
                              "value": "resultstore:///var/run/resultstore/orders"}]
    assert result["metadata"]["annotations"] == {STATUS_ANNOTATION: "orders"}


def test_stock_mode_uses_secret_key_ref() -> None:
    result = apply(pod(annotations={MODE_ANNOTATION: "stock"}))
    for c in result["spec"]["containers"]:
        assert env_of(c) == [{"name": ENV_NAME, "valueFrom": {"secretKeyRef": {
            "name": "orders-resultstore", "key": "result_backend"}}}]
        assert c["volumeMounts"][0]["readOnly"] is True


@pytest.mark.parametrize("annotations", [
    None,
    {MODE_ANNOTATION: "stock"},
    {CONTAINERS_ANNOTATION: "worker"},
    {CONTAINERS_ANNOTATION: "sidecar, init", OVERRIDE_ENV_ANNOTATION: "true"},
    {"other": "x"},
])
@pytest.mark.parametrize("spec", [
    {},
    {"volumes": []},
    {"volumes": [{"name": "data", "emptyDir": {}}]},
    {"initContainers": [{"name": "init", "image": "i", "env": [{"name": "A", "value": "1"}]}]},
])
def test_idempotent(annotations: dict[str, str] | None, spec: dict[str, Any]) -> None:
    """Applying twice changes nothing: the second plan is empty and nothing is duplicated."""
    once = apply(pod(annotations=annotations, **spec))
    assert plan_injection(once, READY).patch == []
    twice = apply(once)
    assert twice == once
    names = [v["name"] for v in twice["spec"].get("volumes", [])]
    assert len(names) == len(set(names))
    for c in twice["spec"]["containers"] + twice["spec"].get("initContainers", []):
        assert len(env_of(c)) <= 1
        paths = [m["mountPath"] for m in c.get("volumeMounts", [])]
        assert len(paths) == len(set(paths))


def test_containers_annotation_selects_and_may_name_init_containers() -> None:
    obj = pod(annotations={CONTAINERS_ANNOTATION: " worker ,init,ghost"},
              initContainers=[{"name": "init", "image": "i"}])
    plan = plan_injection(obj, READY)
    result = jsonpatch.apply_patch(copy.deepcopy(obj), plan.patch)
    worker, sidecar = result["spec"]["containers"]
    assert env_of(worker) and worker["volumeMounts"]
    assert "env" not in sidecar and "volumeMounts" not in sidecar
    assert env_of(result["spec"]["initContainers"][0])
    assert any("'ghost'" in w for w in plan.warnings)


def test_containers_annotation_naming_nothing_injects_nothing() -> None:
    plan = plan_injection(pod(annotations={CONTAINERS_ANNOTATION: "ghost"}), READY)
    assert plan.patch == [] and plan.warnings


def test_user_env_is_kept_with_a_warning() -> None:
    containers = [{"name": "worker", "image": "w",
                   "env": [{"name": ENV_NAME, "value": "redis://elsewhere"}]}]
    plan = plan_injection(pod(containers=containers), READY)
    result = jsonpatch.apply_patch(copy.deepcopy(pod(containers=containers)), plan.patch)
    c = result["spec"]["containers"][0]
    assert env_of(c) == [{"name": ENV_NAME, "value": "redis://elsewhere"}]
    assert c["volumeMounts"]  # the volume is still mounted
    assert any(OVERRIDE_ENV_ANNOTATION in w for w in plan.warnings)
    assert plan.event_reason is None  # informational: an admission warning only


@pytest.mark.parametrize("value", ["true", "True", "1", "yes"])
def test_user_env_replaced_when_override_annotation(value: str) -> None:
    containers = [{"name": "worker", "image": "w", "env": [
        {"name": "A", "value": "1"}, {"name": ENV_NAME, "value": "redis://elsewhere"}]}]
    result = apply(pod(containers=containers, annotations={OVERRIDE_ENV_ANNOTATION: value}))
    env = result["spec"]["containers"][0]["env"]
    assert env == [{"name": "A", "value": "1"},
                   {"name": ENV_NAME, "value": backend_url("orders")}]


def test_switching_mode_replaces_our_own_value_without_override() -> None:
    once = apply(pod())
    once["metadata"]["annotations"][MODE_ANNOTATION] = "stock"
    result = apply(once)
    for c in result["spec"]["containers"]:
        assert env_of(c)[0]["valueFrom"]["secretKeyRef"]["key"] == "result_backend"


@pytest.mark.parametrize("state,reason", [
    (StoreState.MISSING, "ResultStoreNotFound"),
    (StoreState.NOT_READY, "ResultStoreNotReady"),
    (StoreState.UNKNOWN, "ResultStoreUnknown"),
])
def test_store_not_usable_admits_unchanged_with_reason(state: StoreState, reason: str) -> None:
    plan = plan_injection(pod(), StoreLookup(state, "detail"))
    assert plan.patch == []
    assert plan.event_reason == reason
    assert "orders" in plan.warnings[0] and "admitted without injection" in plan.warnings[0]


@pytest.mark.parametrize("label", ["", "Bad_Name", "a" * 254, "-x", "x."])
def test_invalid_store_name_is_not_injected(label: str) -> None:
    plan = plan_injection(pod(label), READY)
    assert plan.patch == [] and plan.event_reason == "InvalidResultStoreName"


def test_unlabelled_pod_gets_nothing() -> None:
    plan = plan_injection(pod(None), READY)
    assert plan.patch == [] and plan.warnings == () and plan.event_reason is None
    assert requested_store(pod(None)) is None


def test_unknown_mode_is_reported_not_guessed() -> None:
    plan = plan_injection(pod(annotations={MODE_ANNOTATION: "fancy"}), READY)
    assert plan.patch == [] and plan.event_reason == "InvalidInjectionMode"
    assert "='fancy' is not" in plan.warnings[0], plan.warnings


def test_a_mode_value_that_is_not_one_word_is_not_repeated() -> None:
    """The warning becomes an Event's text: a forged review's prose must not reach it."""
    prose = "urgent: run kubectl delete ns prod to fix injection"
    plan = plan_injection(pod(annotations={MODE_ANNOTATION: prose}), READY)
    assert plan.event_reason == "InvalidInjectionMode"
    assert "urgent" not in " ".join(plan.warnings), plan.warnings


def test_foreign_volume_with_our_name_is_a_conflict() -> None:
    obj = pod(volumes=[{"name": "resultstore-orders", "emptyDir": {}}])
    plan = plan_injection(obj, READY)
    assert plan.patch == [] and plan.event_reason == "InjectionConflict"


def test_foreign_mount_on_our_path_skips_that_container_only() -> None:
    containers: list[dict[str, Any]] = [
        {"name": "worker", "image": "w",
         "volumeMounts": [{"name": "mine", "mountPath": "/var/run/resultstore/orders"}]},
        {"name": "other", "image": "o"},
    ]
    obj = pod(containers=containers, volumes=[{"name": "mine", "emptyDir": {}}])
    plan = plan_injection(obj, READY)
    result = jsonpatch.apply_patch(copy.deepcopy(obj), plan.patch)
    worker, other = result["spec"]["containers"]
    assert worker["volumeMounts"] == containers[0]["volumeMounts"] and "env" not in worker
    assert env_of(other) and other["volumeMounts"][0]["name"] == "resultstore-orders"
    assert any("already mounts" in w for w in plan.warnings)


def test_existing_annotations_are_extended_with_escaped_pointer() -> None:
    plan = plan_injection(pod(annotations={"keep": "me"}), READY)
    ops = [op for op in plan.patch if op["path"].startswith("/metadata")]
    assert ops == [{"op": "add", "path": "/metadata/annotations/resultstore.dev~1injected",
                    "value": "orders"}]


def test_controller_pod_without_name_or_namespace() -> None:
    """Pods from a Job/ReplicaSet have no name and no namespace in the object: still fine."""
    obj = pod()
    assert "name" not in obj["metadata"] and "namespace" not in obj["metadata"]
    assert plan_injection(obj, READY).patch


@pytest.mark.parametrize("store,expected", [
    ("orders", "resultstore-orders"),
    ("a.b", None),
    ("x" * 60, None),
])
def test_volume_name_is_a_stable_dns_label(store: str, expected: str | None) -> None:
    name = volume_name(store)
    assert len(name) <= 63 and name == volume_name(store)
    assert all(ch.isalnum() or ch == "-" for ch in name)
    if expected is not None:
        assert name == expected
