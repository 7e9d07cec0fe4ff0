"""Kubernetes ownership and policy (issue 14), pure parts: who owns a Secret/CronJob, which
admin Secrets may be read, which CA content may be copied, which cleanup pods may be built."""

from __future__ import annotations

from typing import Any

import pytest

from resultstore_operator.builders import reasons as r
from resultstore_operator.builders.cronjob import (
    CleanupJobRefused,
    CleanupPolicy,
    check_cleanup_job,
    cleanup_job_problems,
    cronjob_manifest,
    toleration_problems,
)
from resultstore_operator.builders.ownership import (
    ADMIN_CREDENTIALS_LABEL,
    admin_secret_opted_in,
    certificates_only,
    foreign_owner,
    is_owned_by,
    owner_reference,
    same_object,
)
from resultstore_operator.settings import (
    OperatorSettings,
    SettingsError,
    image_allowed,
    parse_image_allowlist,
)
from resultstore_operator.spec import SpecError, parse_spec
from resultstore_operator.webhook_tls import generate_ca

UID = "6f1c2c9e-0000-4000-8000-000000000001"
OWNER = owner_reference("orders", UID)
DEFAULT_IMAGE = "registry.example/celery-resultstore:0.1.0"
POLICY = CleanupPolicy(DEFAULT_IMAGE)


def spec(**job: Any) -> Any:
    return parse_spec({
        "database": {"host": "db.example", "name": "app",
                     "adminSecretRef": {"name": "pg-admin"}},
        "schema": "orders", "cleanupJob": job})


def obj(kind: str = "Secret", refs: list[dict[str, Any]] | None = None,
        labels: dict[str, str] | None = None, uid: str = "obj-uid") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "orders-resultstore", "uid": uid}
    if refs is not None:
        meta["ownerReferences"] = refs
    if labels is not None:
        meta["labels"] = labels
    return {"kind": kind, "metadata": meta}


# --- ownership ------------------------------------------------------------------------------

def test_owner_reference_is_a_blocking_controller_reference() -> None:
    assert OWNER == {"apiVersion": "resultstore.dev/v1alpha1", "kind": "ResultStore",
                     "name": "orders", "uid": UID, "controller": True,
                     "blockOwnerDeletion": True}


@pytest.mark.parametrize(("refs", "labels", "owned", "words"), [
    ([OWNER], None, True, ""),
    ([{"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u"}, OWNER], None, True,
     ""),
    (None, None, False, "has no controller ownerReference"),
    # A copied label proves nothing.
    (None, {"app.kubernetes.io/managed-by": "resultstore-operator"}, False,
     "only a copied managed-by label"),
    # The same name and kind but another uid: a store of the same name, deleted and
    # re-created, or another store entirely.
    ([{**OWNER, "uid": "other-uid"}], None, False, "another ResultStore 'orders'"),
    # A non-controller reference to us is not control.
    ([{**OWNER, "controller": False}], None, False, "has no controller ownerReference"),
    ([{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": UID,
       "controller": True}], None, False, "controlled by Deployment 'web'"),
    ([{**OWNER, "apiVersion": "evil.example/v1alpha1"}], None, False, "controlled by"),
])
def test_ownership_is_decided_by_the_controller_uid(
        refs: list[dict[str, Any]] | None, labels: dict[str, str] | None, owned: bool,
        words: str) -> None:
    live = obj(refs=refs, labels=labels)
    assert is_owned_by(live, UID) is owned
    problem = foreign_owner(live, UID)
    if owned:
        assert problem is None
    else:
        assert problem is not None and words in problem, problem
        assert "Secret 'orders-resultstore' already exists" in problem
        assert "left unchanged" in problem


def test_unknown_uid_owns_nothing() -> None:
    assert not is_owned_by(obj(refs=[{**OWNER, "uid": ""}]), "")


# --- admin Secret opt-in ----------------------------------------------------------------------

@pytest.mark.parametrize(("labels", "opted_in"), [
    ({ADMIN_CREDENTIALS_LABEL: "true"}, True),
    ({ADMIN_CREDENTIALS_LABEL: "True"}, True),
    ({ADMIN_CREDENTIALS_LABEL: "false"}, False),
    ({ADMIN_CREDENTIALS_LABEL: ""}, False),
    ({"resultstore.dev/admin": "true"}, False),
    (None, False),
])
def test_admin_secret_opt_in_label(labels: dict[str, str] | None, opted_in: bool) -> None:
    assert ADMIN_CREDENTIALS_LABEL == "resultstore.dev/admin-credentials"
    assert admin_secret_opted_in(obj(labels=labels)) is opted_in


def test_same_object_needs_equal_known_uids() -> None:
    assert same_object(obj(uid="a"), obj(uid="a"))
    assert not same_object(obj(uid="a"), obj(uid="b"))
    assert not same_object({"metadata": {}}, {"metadata": {}})


def test_only_certificates_leave_a_ca_secret() -> None:
    cert_pem, key_pem = generate_ca("test-ca")
    cert, key = cert_pem.decode(), key_pem.decode()
    assert certificates_only(cert) == cert
    # A certificate with a private key appended: only the certificate is kept.
    kept = certificates_only(cert + key)
    assert kept == cert and "PRIVATE KEY" not in kept
    for value in ("hunter2-the-admin-password", key, "", "-----BEGIN CERTIFICATE-----\nxx"):
        assert certificates_only(value) is None


# --- settings: allow-list, service accounts, hostNetwork ---------------------------------------

def test_settings_defaults_allow_only_the_default_image_and_no_service_account() -> None:
    s = OperatorSettings.from_env({})
    assert s.cleanup_image_allowlist == ()
    assert s.cleanup_allow_service_account is False
    s = OperatorSettings.from_env({
        "RESULTSTORE_CLEANUP_IMAGE_ALLOWLIST": "reg.example/a:1, reg.example/b:* reg.example/a:1",
        "RESULTSTORE_CLEANUP_ALLOW_SERVICE_ACCOUNT": "true"})
    assert s.cleanup_image_allowlist == ("reg.example/a:1", "reg.example/b:*")
    assert s.cleanup_allow_service_account is True


@pytest.mark.parametrize("raw", ["*", "reg.example/*", "reg.example/team*:1", "reg:", ":*"])
def test_allowlist_refuses_prefix_wildcards(raw: str) -> None:
    with pytest.raises(SettingsError, match="RESULTSTORE_CLEANUP_IMAGE_ALLOWLIST"):
        parse_image_allowlist("RESULTSTORE_CLEANUP_IMAGE_ALLOWLIST", raw)


def test_service_account_flag_must_be_boolean() -> None:
    with pytest.raises(SettingsError, match="ALLOW_SERVICE_ACCOUNT"):
        OperatorSettings.from_env({"RESULTSTORE_CLEANUP_ALLOW_SERVICE_ACCOUNT": "maybe"})


@pytest.mark.parametrize(("raw", "allowed"), [
    (None, False), ("", False), ("  ", False), ("false", False), ("0", False), ("no", False),
    ("off", False), ("true", True), ("TRUE", True), (" 1 ", True), ("yes", True), ("on", True),
])
def test_host_network_setting(raw: str | None, allowed: bool) -> None:
    env = {} if raw is None else {"RESULTSTORE_CLEANUP_ALLOW_HOST_NETWORK": raw}
    s = OperatorSettings.from_env(env)
    assert s.cleanup_allow_host_network is allowed
    # one setting, one field: the ServiceAccount gate does not move with it
    assert s.cleanup_allow_service_account is False


@pytest.mark.parametrize("raw", ["maybe", "2", "enabled", "true!"])
def test_host_network_flag_must_be_boolean(raw: str) -> None:
    with pytest.raises(SettingsError, match="RESULTSTORE_CLEANUP_ALLOW_HOST_NETWORK"):
        OperatorSettings.from_env({"RESULTSTORE_CLEANUP_ALLOW_HOST_NETWORK": raw})


ALLOW = ("reg.example/tools/cleanup:2.0", "reg.example:5000/team/img:*")


@pytest.mark.parametrize(("image", "allowed"), [
    (DEFAULT_IMAGE, True),
    ("reg.example/tools/cleanup:2.0", True),
    ("reg.example/tools/cleanup:2.1", False),
    ("reg.example/tools/cleanup", False),
    ("reg.example:5000/team/img:1.2.3", True),
    ("reg.example:5000/team/img@sha256:" + "a" * 64, True),
    ("reg.example:5000/team/img", False),
    ("reg.example:5000/team/img:", False),
    ("reg.example:5000/team/img-evil:1", False),
    ("reg.example:5000/team/img/sub:1", False),
    ("reg.example:5000/team/img:1@sha256:" + "a" * 64, False),
    ("docker.io/library/alpine:3", False),
])
def test_image_allowed(image: str, allowed: bool) -> None:
    assert image_allowed(image, DEFAULT_IMAGE, ALLOW) is allowed


# --- the cleanup job's pod ----------------------------------------------------------------------

def test_cleanup_pod_never_mounts_a_service_account_token() -> None:
    cj = cronjob_manifest("orders", "ns", OWNER, spec(), DEFAULT_IMAGE)
    pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod
    assert pod["containers"][0]["image"] == DEFAULT_IMAGE
    assert cj["metadata"]["ownerReferences"] == [OWNER]
    assert cj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "resultstore-operator"


@pytest.mark.parametrize(("job", "policy", "words"), [
    ({"image": "docker.io/attacker/miner:latest"}, POLICY, "spec.cleanupJob.image"),
    ({"image": "reg.example/other:1"}, CleanupPolicy(DEFAULT_IMAGE, image_allowlist=(
        "reg.example/other:2",)), "is not allowed"),
    ({"serviceAccountName": "admin"}, POLICY, "serviceAccountName is not allowed"),
    ({"serviceAccountName": "Bad_Name"}, CleanupPolicy(DEFAULT_IMAGE,
                                                       allow_service_account=True),
     "not a valid name"),
    ({"tolerations": [{"key": "k", "operator": "Sometimes"}]}, POLICY, "Exists or Equal"),
    ({"resources": {"limits": {"cpu": "lots"}}}, POLICY, "quantities"),
    ({"resources": {"claims": [{"name": "gpu"}]}}, POLICY, "unknown field(s) claims"),
    ({"hostNetwork": True}, POLICY, "spec.cleanupJob.hostNetwork is not allowed by the "
                                    "operator's settings (RESULTSTORE_CLEANUP_ALLOW_HOST_NETWORK)"),
    # each gate opens only its own field
    ({"hostNetwork": True}, CleanupPolicy(DEFAULT_IMAGE, allow_service_account=True),
     "hostNetwork is not allowed"),
    ({"serviceAccountName": "cleaner"}, CleanupPolicy(DEFAULT_IMAGE, allow_host_network=True),
     "serviceAccountName is not allowed"),
])
def test_refused_cleanup_jobs(job: dict[str, Any], policy: CleanupPolicy, words: str) -> None:
    problems = cleanup_job_problems(spec(**job).cleanup_job, policy)
    assert any(words in p for p in problems), problems
    with pytest.raises(CleanupJobRefused) as info:
        check_cleanup_job(spec(**job).cleanup_job, policy)
    assert isinstance(info.value, SpecError)  # permanent until the spec changes
    assert info.value.reason == r.CLEANUP_JOB_REFUSED == "CleanupJobNotAllowed"


@pytest.mark.parametrize(("job", "policy"), [
    ({}, POLICY),
    ({"image": DEFAULT_IMAGE}, POLICY),
    ({"image": "reg.example/other:2"}, CleanupPolicy(DEFAULT_IMAGE, image_allowlist=(
        "reg.example/other:2",))),
    ({"serviceAccountName": "cleaner"}, CleanupPolicy(DEFAULT_IMAGE,
                                                      allow_service_account=True)),
    ({"hostNetwork": False}, POLICY),
    ({"hostNetwork": True}, CleanupPolicy(DEFAULT_IMAGE, allow_host_network=True)),
    ({"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "batch",
                       "effect": "NoSchedule"},
                      {"operator": "Exists"},
                      {"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                       "effect": "NoExecute", "tolerationSeconds": 30}],
      "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": 1}}},
     POLICY),
])
def test_allowed_cleanup_jobs(job: dict[str, Any], policy: CleanupPolicy) -> None:
    s = spec(**job)
    check_cleanup_job(s.cleanup_job, policy)
    cj = cronjob_manifest("orders", "ns", OWNER, s, policy.default_image)
    pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == (job.get("image") or DEFAULT_IMAGE)
    assert pod["automountServiceAccountToken"] is False
    assert pod.get("hostNetwork", False) is job.get("hostNetwork", False)


def test_refusal_names_every_refused_field_at_once() -> None:
    job = spec(hostNetwork=True, serviceAccountName="admin").cleanup_job
    with pytest.raises(CleanupJobRefused) as info:
        check_cleanup_job(job, POLICY)
    message = str(info.value)
    assert "RESULTSTORE_CLEANUP_ALLOW_HOST_NETWORK" in message
    assert "RESULTSTORE_CLEANUP_ALLOW_SERVICE_ACCOUNT" in message
    check_cleanup_job(job, CleanupPolicy(DEFAULT_IMAGE, allow_service_account=True,
                                         allow_host_network=True))


@pytest.mark.parametrize(("toleration", "words"), [
    ({"key": "k", "operator": "Exists", "value": "v"}, "must be empty with operator Exists"),
    ({"key": "", "operator": "Equal", "value": "v"}, "empty key needs operator Exists"),
    ({"key": "bad key!", "operator": "Exists"}, "not a valid taint key"),
    ({"key": "k", "value": "not valid!"}, "not a valid taint value"),
    ({"key": "k", "effect": "NoRun"}, "effect must be one of"),
    ({"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5}, "needs effect NoExecute"),
    ({"key": "k", "effect": "NoExecute", "tolerationSeconds": "5"}, "must be an integer"),
    ({"key": "k", "nodeName": "x"}, "unknown field(s) nodeName"),
    ({"key": 3}, "must be strings"),
])
def test_toleration_structure(toleration: dict[str, Any], words: str) -> None:
    problems = toleration_problems([toleration])
    assert problems and words in problems[0], problems


# --- the write guard in kube/client.py (refuses before any API call is made) ---------------------

def test_put_secret_refuses_a_live_secret_it_does_not_own() -> None:
    from resultstore_operator.builders.secret import secret_manifest
    from resultstore_operator.kube import Kube, NotOwnedError

    kube = Kube.__new__(Kube)  # no API client: the refusal happens before any request
    desired = secret_manifest("orders", "ns", OWNER, {"username": "u", "password": "p"})
    for refs in (None, [{**OWNER, "uid": "other"}]):
        live = obj(refs=refs)
        with pytest.raises(NotOwnedError) as info:
            kube.put_secret(desired, live)
        assert info.value.transient is False
        assert "left unchanged" in str(info.value) and "p" not in str(info.value).split()
