"""The one Kubernetes client's seams without an API server: the error family an
ApiException becomes, the typed views of the objects it reads, and the client calls it
makes existing in the kubernetes package (tests/e2e runs the client against a real API)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from resultstore_operator.kube import (
    WORKLOAD_CLIENT_NAMES,
    Conflict,
    Forbidden,
    KubeError,
    NotFound,
    NotOwnedError,
    Unavailable,
    api_errors,
    condition,
    conditions,
    from_api_exception,
    meta,
    pod_template,
    section,
)


def api_exception(status: int | None, message: str = "") -> ApiException:
    exc = ApiException(status=status, reason="Reason")
    if message:
        exc.body = json.dumps({"kind": "Status", "message": message})
    return exc


@pytest.mark.parametrize(("status", "family", "transient"), [
    (404, NotFound, False),
    (409, Conflict, True),
    (401, Forbidden, False),
    (403, Forbidden, False),
    (429, Unavailable, True),
    (500, Unavailable, True),
    (503, Unavailable, True),
    (None, Unavailable, True),
    (400, KubeError, False),
    (422, KubeError, False),
])
def test_an_api_exception_becomes_its_family_member(status: int | None,
                                                    family: type[KubeError],
                                                    transient: bool) -> None:
    err = from_api_exception(api_exception(status, "secrets \"x\" is forbidden"), "read Secret x")
    assert type(err) is family, f"{status} became {type(err).__name__}, not {family.__name__}"
    assert err.status == status and err.transient is transient
    assert str(err).startswith(f"read Secret x: API answered {status} Reason")
    assert "is forbidden" in str(err)


def test_api_errors_translates_and_hides_the_client_exception() -> None:
    with pytest.raises(NotFound) as caught, api_errors("read ResultStore orders"):
        raise api_exception(404)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert str(caught.value) == "read ResultStore orders: API answered 404 Reason"
    # Anything that is not the client's API error passes through untouched.
    with pytest.raises(ValueError), api_errors("x"):
        raise ValueError("not an API answer")


def test_a_body_that_is_not_a_status_still_gives_a_message() -> None:
    exc = api_exception(500)
    exc.body = "<html>bad gateway</html>"
    assert str(from_api_exception(exc, "list deployments")) == \
        "list deployments: API answered 500 Reason"


def test_not_owned_is_a_kube_error_that_waiting_does_not_fix() -> None:
    err = NotOwnedError("Secret 'x' already exists and has no controller ownerReference")
    assert isinstance(err, KubeError) and not err.transient and err.status is None


SECRET: dict[str, Any] = {
    "metadata": {"name": "orders-resultstore", "namespace": "team", "uid": "u-1",
                 "resourceVersion": "42", "labels": {"a": "b"},
                 "ownerReferences": [{"kind": "Other", "name": "o"},
                                     {"kind": "ResultStore", "name": "orders",
                                      "controller": True}, "garbage"]},
    "status": {"conditions": [{"type": "Synced", "status": "True"}, "garbage",
                              {"type": "Ready", "status": "False", "reason": "Waiting"}]},
}


def test_meta_reads_every_field_once() -> None:
    m = meta(SECRET)
    assert (m.name, m.namespace, m.uid, m.resource_version) == \
        ("orders-resultstore", "team", "u-1", "42")
    assert m.labels == {"a": "b"} and m.annotations == {}
    assert len(m.owner_references) == 2  # the malformed entry is dropped
    assert m.controller is not None and m.controller["name"] == "orders"
    assert m.deletion_timestamp is None and m.generate_name == ""


@pytest.mark.parametrize("obj", [None, {}, {"metadata": None}, {"metadata": "x"},
                                 {"metadata": {"labels": None, "ownerReferences": None}}])
def test_meta_of_missing_or_null_sections_is_empty(obj: Any) -> None:
    m = meta(obj)
    assert (m.name, m.namespace, m.uid, m.resource_version) == ("", "", None, None)
    assert m.labels == {} and m.owner_references == () and m.controller is None


def test_conditions_and_sections() -> None:
    assert [c["type"] for c in conditions(SECRET)] == ["Synced", "Ready"]
    ready = condition(SECRET, "Ready")
    assert ready is not None and ready["reason"] == "Waiting"
    assert condition(SECRET, "Missing") is None and condition(None, "Ready") is None
    assert section({"spec": [1]}, "spec") == {} and section(None, "spec") == {}
    workload = {"spec": {"template": {"metadata": {"labels": {"app": "w"}}}}}
    assert meta(pod_template(workload)).labels == {"app": "w"}
    assert pod_template({"spec": None}) == {}


@pytest.mark.parametrize(("api", "method"), [
    (client.CoreV1Api, "read_namespaced_secret"),
    (client.CoreV1Api, "create_namespaced_secret"),
    (client.CoreV1Api, "replace_namespaced_secret"),
    (client.CoreV1Api, "delete_namespaced_secret"),
    (client.CoreV1Api, "create_namespaced_event"),
    (client.CoreV1Api, "patch_namespaced_event"),
    (client.BatchV1Api, "read_namespaced_cron_job"),
    (client.BatchV1Api, "patch_namespaced_cron_job"),
    (client.CustomObjectsApi, "get_namespaced_custom_object"),
    (client.CustomObjectsApi, "patch_namespaced_custom_object_status"),
    (client.AdmissionregistrationV1Api, "read_mutating_webhook_configuration"),
    (client.AdmissionregistrationV1Api, "create_mutating_webhook_configuration"),
    (client.AdmissionregistrationV1Api, "patch_mutating_webhook_configuration"),
    *[(client.AppsV1Api, f"{verb}_namespaced_{suffix}")
      for suffix in WORKLOAD_CLIENT_NAMES.values() for verb in ("list", "patch")],
])
def test_the_client_calls_exist(api: type, method: str) -> None:
    assert callable(getattr(api, method, None)), f"{api.__name__}.{method} does not exist"


def test_new_api_client_keeps_a_connection_per_thread(tmp_path: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's default pool is 5 connections per CPU; 16 reconcile threads sharing
    one opened and dropped a TLS connection per request beyond that."""
    from resultstore_operator.kube import new_api_client

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    from kubernetes.config import kube_config

    # read at import time from KUBECONFIG; load_kube_config falls back to it
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    api = new_api_client(pool_size=20)
    try:
        assert api.configuration.connection_pool_maxsize >= 20
        assert api.rest_client.pool_manager.connection_pool_kw["maxsize"] >= 20
        default = new_api_client()
        assert default.rest_client.pool_manager.connection_pool_kw["maxsize"] >= 32
        default.close()
    finally:
        api.close()
