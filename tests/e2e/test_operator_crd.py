"""The CRD's validation as the API server enforces it: defaults, ranges, enums, patterns and
the CEL rules (schema shape, immutability of database host/name and schema)."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.e2e.operator_support import Cluster, ensure_crd

BASE: dict[str, Any] = {
    "database": {"host": "db.example", "name": "app", "adminSecretRef": {"name": "admin"}},
    "schema": "orders",
}


@pytest.fixture
def cluster(api_client: Any) -> Cluster:
    ensure_crd(api_client)
    return Cluster(api_client)


def merged(**over: Any) -> dict[str, Any]:
    spec = copy.deepcopy(BASE)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key].update(value)
        else:
            spec[key] = value
    return spec


def test_defaults_are_applied_by_the_server(cluster: Cluster, namespace: str) -> None:
    obj = cluster.create_store(namespace, "defaults", BASE)
    spec = obj["spec"]
    assert spec["database"]["port"] == 5432 and spec["database"]["sslMode"] == "prefer"
    assert spec["engine"]["poolSize"] == 5 and spec["engine"]["poolTimeout"] == "30s"
    assert spec["retention"] == {"expires": "24h", "schedule": "17 * * * *", "batchSize": 1000}
    assert spec["credentials"] == {"drainTimeout": "5m"}
    assert spec["tables"] == {"taskTable": "celery_taskmeta", "groupTable": "celery_tasksetmeta"}
    assert spec["deletionPolicy"] == "Retain"


@pytest.mark.parametrize(
    ("over", "fragment"),
    [({"schema": "Orders"}, "lower-case identifier"),
     ({"schema": "pg_orders"}, "must not be pg_"),
     ({"schema": "public"}, "must not be pg_"),
     ({"deletionPolicy": "Orphan"}, "deletionPolicy"),
     ({"database": {"sslMode": "sometimes"}}, "sslMode"),
     ({"database": {"port": 0}}, "port"),
     ({"engine": {"poolSize": 0}}, "poolSize"),
     ({"engine": {"poolTimeout": "0s"}}, "must be between 1s and 600s"),
     ({"engine": {"poolRecycle": "forever"}}, "poolRecycle"),
     ({"retention": {"batchSize": 0}}, "batchSize"),
     ({"retention": {"schedule": "hourly"}}, "schedule"),
     ({"credentials": {"rotateEvery": "1m", "drainTimeout": "5m"}},
      "rotateEvery must be longer than drainTimeout"),
     ({"tables": {"taskTable": "same", "groupTable": "same"}}, "must differ"),
     ({"database": {"adminSecretRef": None}}, "adminSecretRef")],
)
def test_invalid_specs_are_refused(cluster: Cluster, namespace: str, over: dict[str, Any],
                                   fragment: str) -> None:
    spec = merged(**over)
    if over.get("database", {}).get("adminSecretRef", "") is None:
        del spec["database"]["adminSecretRef"]
    with pytest.raises(ApiException) as err:
        cluster.create_store(namespace, "bad-" + uuid.uuid4().hex[:6], spec)
    assert err.value.status == 422
    assert fragment in str(err.value.body), err.value.body


def test_long_names_are_refused(cluster: Cluster, namespace: str) -> None:
    with pytest.raises(ApiException) as err:
        cluster.create_store(namespace, "n" * 33, BASE)
    assert "at most 32 characters" in str(err.value.body)


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [({"spec": {"schema": "other"}}, "schema is immutable"),
     ({"spec": {"database": {"host": "elsewhere"}}}, "database.host is immutable"),
     ({"spec": {"database": {"name": "otherdb"}}}, "database.name is immutable"),
     ({"spec": {"tables": {"taskTable": "renamed"}}}, "tables are immutable")],
)
def test_identity_fields_are_immutable(cluster: Cluster, namespace: str,
                                       patch: dict[str, Any], fragment: str) -> None:
    name = "imm-" + uuid.uuid4().hex[:6]
    cluster.create_store(namespace, name, BASE)
    with pytest.raises(ApiException) as err:
        cluster.patch_store(namespace, name, patch)
    assert err.value.status == 422
    assert fragment in str(err.value.body), err.value.body
    # mutable fields stay mutable
    cluster.patch_store(namespace, name, {"spec": {"database": {"port": 6432},
                                                   "engine": {"poolSize": 9}}})
