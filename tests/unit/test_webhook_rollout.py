"""Stock-mode rollout: which workloads opt in, what is hashed, and when a patch is needed."""

from __future__ import annotations

import base64
import copy
from collections.abc import Mapping
from typing import Any

import pytest

from resultstore_operator.injection import INJECT_LABEL
from resultstore_operator.rollout import (
    HASH_ANNOTATION,
    ROLLOUT_LABEL,
    ROLLOUT_SELECTOR,
    rollout_patch,
    secret_hash,
    store_of_secret,
    workload_store,
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def workload(rollout: str | None = "true", store: str | None = "orders",
             digest: str | None = None) -> dict[str, Any]:
    labels = {ROLLOUT_LABEL: rollout} if rollout is not None else {}
    template_meta: dict[str, Any] = {"labels": {INJECT_LABEL: store} if store else {}}
    if digest is not None:
        template_meta["annotations"] = {HASH_ANNOTATION: digest}
    return {"metadata": {"name": "w", "namespace": "team", "labels": labels},
            "spec": {"template": {"metadata": template_meta, "spec": {}}}}


def test_hash_covers_only_env_consumed_keys() -> None:
    base = {"result_backend": b64("db+postgresql+psycopg://u:p1@h/d"),
            "engine_options.json": b64("{}")}
    h = secret_hash(base)
    assert h is not None and len(h) == 20
    assert secret_hash({**base, "engine_options.json": b64('{"pool_size": 9}')}) == h
    assert secret_hash({**base, "result_backend": b64("db+postgresql+psycopg://u:p2@h/d")}) != h
    assert secret_hash({"engine_options.json": b64("{}")}) is None
    assert secret_hash(None) is None


def _owned(name: str, owner: str | None = "orders", kind: str = "ResultStore",
           api_version: str = "resultstore.dev/v1alpha1", controller: bool = True,
           secret_type: str = "servicebinding.io/postgresql") -> dict[str, Any]:
    refs = [] if owner is None else [{"apiVersion": api_version, "kind": kind, "name": owner,
                                      "uid": "u-1", "controller": controller}]
    return {"type": secret_type, "metadata": {"name": name, "ownerReferences": refs}}


@pytest.mark.parametrize("secret,store", [
    (_owned("orders-resultstore"), "orders"),
    (_owned("orders-resultstore", secret_type="Opaque"), None),
    (_owned("orders"), None),
    (_owned("-resultstore", owner=""), None),
    # a Secret of the right name and type that the operator did not write is not a store's
    (_owned("orders-resultstore", owner=None), None),
    (_owned("orders-resultstore", owner="billing"), None),
    (_owned("orders-resultstore", kind="Deployment", api_version="apps/v1"), None),
    (_owned("orders-resultstore", api_version="example.com/v1"), None),
    (_owned("orders-resultstore", controller=False), None),
])
def test_store_of_secret(secret: dict[str, Any], store: str | None) -> None:
    assert store_of_secret(secret) == store


@pytest.mark.parametrize("rollout,store,expected", [
    ("true", "orders", "orders"),
    # only what the server-side selector (resultstore.dev/rollout=true) streams
    ("True", "orders", None),
    ("false", "orders", None),
    (None, "orders", None),
    ("true", None, None),
])
def test_workload_store(rollout: str | None, store: str | None, expected: str | None) -> None:
    assert workload_store(workload(rollout, store)) == expected


def test_rollout_patch_only_when_hash_differs() -> None:
    assert rollout_patch(workload(), "abc") == {
        "spec": {"template": {"metadata": {"annotations": {HASH_ANNOTATION: "abc"}}}}}
    assert rollout_patch(workload(digest="abc"), "abc") is None
    assert rollout_patch(workload(digest="old"), "abc") is not None
    assert rollout_patch(workload(rollout=None), "abc") is None
    assert rollout_patch(workload(), None) is None


def test_client_method_names_exist() -> None:
    from kubernetes import client

    from resultstore_operator.rollout import WORKLOAD_CLIENT_NAMES, WORKLOAD_KINDS

    for kind in WORKLOAD_KINDS:
        for verb in ("list", "patch"):
            assert hasattr(client.AppsV1Api, f"{verb}_namespaced_{WORKLOAD_CLIENT_NAMES[kind]}")


class _Gateway:
    """The rollout's calls of the Kubernetes client (rollout.WorkloadClient), in memory:
    one Secret, the workloads it is given, records the listings' selectors and the
    patches."""

    def __init__(self, secret: dict[str, Any] | None,
                 workloads: list[dict[str, Any]] | None = None) -> None:
        self._secret = secret
        self._workloads = workloads or []
        self.selectors: list[str] = []
        self.patches: list[tuple[str, str, str, dict[str, Any]]] = []

    def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._secret

    def list_workloads(self, namespace: str, plural: str,
                       selector: str) -> list[dict[str, Any]]:
        self.selectors.append(selector)
        return self._workloads if plural == "deployments" else []

    def patch_workload(self, plural: str, namespace: str, name: str,
                       patch: Mapping[str, Any]) -> None:
        self.patches.append((plural, namespace, name, dict(patch)))


@pytest.mark.parametrize("owner,patched", [("orders", True), (None, False), ("billing", False)])
def test_sync_workload_hashes_only_the_stores_own_secret(owner: str | None,
                                                         patched: bool) -> None:
    from resultstore_operator.rollout import sync_workload

    secret = _owned("orders-resultstore", owner=owner)
    secret["data"] = {"result_backend": b64("db+postgresql+psycopg://u:p@h/d")}
    gateway = _Gateway(secret)
    assert sync_workload(gateway, "deployments", workload()) is patched
    assert bool(gateway.patches) is patched, (
        f"a Secret controlled by {owner!r} must {'' if patched else 'not '}roll the workload")


@pytest.mark.parametrize("plural,kind", [("deployments", "Deployment"),
                                         ("statefulsets", "StatefulSet"),
                                         ("daemonsets", "DaemonSet")])
def test_workload_watches_select_on_the_server(plural: str, kind: str) -> None:
    """Kopf's watch (and its initial listing) for each workload kind carries the opt-in
    selector once the rollout's startup activity ran: other workloads are never streamed."""
    import kopf
    from kopf._cogs.structs import references

    from resultstore_operator.rollout import register
    from resultstore_operator.settings import OperatorSettings

    registry = kopf.OperatorRegistry()
    register(registry, OperatorSettings())
    settings = kopf.OperatorSettings()
    startup = [h for h in registry._activities.get_all_handlers()
               if h.id == "resultstore-rollout-selectors"]
    assert len(startup) == 1, "the rollout registers no startup activity for its selectors"
    select: Any = startup[0].fn  # called as Kopf would, with the one argument it uses
    select(settings=settings)
    resource = references.Resource(group="apps", version="v1", plural=plural, kind=kind,
                                   singular=kind.lower(), namespaced=True)
    assert settings.watching.label_selectors.collect(resource) == [ROLLOUT_SELECTOR]


def test_a_secret_event_rolls_from_the_index_without_listing() -> None:
    """The workload watches keep the index; a Secret event patches the store's workloads
    whose hash differs, lists nothing, and the index follows deletions and lost opt-ins."""
    from resultstore_operator.rollout import WorkloadIndex, roll_indexed_workloads, secret_hash

    data = {"result_backend": b64("db+postgresql+psycopg://u:p@h/d")}
    index = WorkloadIndex()
    ours, other, gone = workload(), workload(store="billing"), workload()
    other["metadata"]["name"] = "other"
    gone["metadata"]["name"] = "gone"
    for body in (ours, other, gone):
        index.observe("deployments", body, "ADDED")
    index.observe("deployments", gone, "DELETED")
    gateway = _Gateway(None)
    assert roll_indexed_workloads(gateway, index, "team", "orders", data) == ["deployments/w"]
    assert gateway.selectors == [], "a Secret event listed workloads"
    assert [p[2] for p in gateway.patches] == ["w"]
    # the same Secret again: the index knows the hash landed, nothing is patched twice
    assert roll_indexed_workloads(gateway, index, "team", "orders", data) == []
    # up to date per the watch too
    ours["spec"]["template"]["metadata"].setdefault("annotations", {})[HASH_ANNOTATION] = \
        secret_hash(data)
    index.observe("deployments", ours, "MODIFIED")
    assert index.of_store("team", "orders") == [("deployments", "w", secret_hash(data))]
    # the opt-in label removed: the selected watch sends DELETED without it
    unlabelled = copy.deepcopy(ours)
    del unlabelled["metadata"]["labels"][ROLLOUT_LABEL]
    index.observe("deployments", unlabelled, "DELETED")
    assert index.of_store("team", "orders") == []
