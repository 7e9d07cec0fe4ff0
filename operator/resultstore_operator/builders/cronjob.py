"""The cleanup CronJob: `resultstore cleanup` against the mounted binding Secret.

The job reads the same Secret as the workers, so it always uses the current login role and
needs no credentials of its own; `concurrencyPolicy: Forbid` keeps two batched deletions
from competing for the same rows when a run outlasts the schedule.

Why the pod spec is restricted (`cleanup_job_problems`): whoever may create a ResultStore
would otherwise run any image, as any ServiceAccount of the namespace, with its token
mounted. The job needs neither the API nor a custom image, so the ServiceAccount token is
never mounted, the image is the operator's own unless the operator's settings allow-list
another, a ServiceAccount is honoured only when the settings allow it, and tolerations are
checked against the Toleration schema (they reach the pod template verbatim).

`hostNetwork` (for a PostgreSQL reachable only from the node's network) is honoured only
when the operator's settings allow it (RESULTSTORE_CLEANUP_ALLOW_HOST_NETWORK): otherwise
anyone allowed to create a ResultStore, but not hostNetwork pods, would get one through the
operator (the node's network namespace: its loopback services, its interfaces, traffic not
subject to the namespace's NetworkPolicies). Allowed, the pod still runs the operator's
command in an allowed image, as a non-root user without capabilities or token; a namespace
enforcing the Pod Security Standard `baseline` still refuses such pods (the Job then
reports FailedCreate).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..settings import image_allowed
from ..spec import CleanupJobSpec, ResultStoreSpec, SpecError
from .names import config_dir, cronjob_name, labels, secret_name
from .reasons import CLEANUP_JOB_REFUSED, CRONJOB_CREATED, CRONJOB_UPDATED

CONTAINER_NAME = "cleanup"
VOLUME_NAME = "resultstore-binding"
NON_ROOT_UID = 65532
STARTING_DEADLINE_SECONDS = 300
BACKOFF_LIMIT = 2
ACTIVE_DEADLINE_SECONDS = 3600


TOLERATION_KEYS = frozenset({"key", "operator", "value", "effect", "tolerationSeconds"})
TOLERATION_OPERATORS = ("Exists", "Equal")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
RESOURCE_KEYS = frozenset({"limits", "requests"})
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_QUALIFIED_NAME = re.compile(
    rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_NAME}$")
_LABEL_VALUE = re.compile(rf"^({_NAME})?$")
_QUANTITY = re.compile(
    r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[KMGTPE]i?|[mkuMGTPEn])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class CleanupJobRefused(SpecError):
    """spec.cleanupJob asks for something the operator's settings do not allow.

    A SpecError (permanent until the spec changes) with its own condition reason, so that
    `kubectl get rstore` says *policy*, not *typo*.
    """

    reason = CLEANUP_JOB_REFUSED


@dataclass(frozen=True)
class CleanupPolicy:
    """What the operator's settings allow in a cleanup pod (from OperatorSettings)."""

    default_image: str
    default_pull_policy: str = "IfNotPresent"
    image_allowlist: tuple[str, ...] = ()
    allow_service_account: bool = False
    allow_host_network: bool = False


def toleration_problems(tolerations: Sequence[Mapping[str, Any]]) -> list[str]:
    """Structural check of core/v1 Tolerations (what the API server would validate, and a
    closed set of fields so nothing unexpected reaches the pod template)."""
    problems: list[str] = []
    for i, tol in enumerate(tolerations):
        where = f"spec.cleanupJob.tolerations[{i}]"
        unknown = sorted(set(tol) - TOLERATION_KEYS)
        if unknown:
            problems.append(f"{where}: unknown field(s) {', '.join(unknown)}")
            continue
        key, op = tol.get("key", ""), tol.get("operator", "Equal")
        value, effect = tol.get("value", ""), tol.get("effect", "")
        if not all(isinstance(v, str) for v in (key, op, value, effect)):
            problems.append(f"{where}: key, operator, value and effect must be strings")
            continue
        if op not in TOLERATION_OPERATORS:
            problems.append(f"{where}.operator must be Exists or Equal")
        if key and not _QUALIFIED_NAME.fullmatch(key):
            problems.append(f"{where}.key is not a valid taint key")
        if not key and op != "Exists":
            problems.append(f"{where}: an empty key needs operator Exists")
        if op == "Exists" and value:
            problems.append(f"{where}.value must be empty with operator Exists")
        if value and not _LABEL_VALUE.fullmatch(value):
            problems.append(f"{where}.value is not a valid taint value")
        if effect and effect not in TAINT_EFFECTS:
            problems.append(f"{where}.effect must be one of {', '.join(TAINT_EFFECTS)}")
        if "tolerationSeconds" in tol:
            seconds = tol["tolerationSeconds"]
            if isinstance(seconds, bool) or not isinstance(seconds, int):
                problems.append(f"{where}.tolerationSeconds must be an integer")
            elif effect != "NoExecute":
                problems.append(f"{where}.tolerationSeconds needs effect NoExecute")
    return problems


def resources_problems(resources: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    unknown = sorted(set(resources) - RESOURCE_KEYS)
    if unknown:
        problems.append(f"spec.cleanupJob.resources: unknown field(s) {', '.join(unknown)}")
    for section in sorted(RESOURCE_KEYS & set(resources)):
        values = resources[section]
        if not isinstance(values, Mapping) or not all(
                isinstance(k, str) and _QUALIFIED_NAME.fullmatch(k)
                and isinstance(v, str | int) and not isinstance(v, bool)
                and _QUANTITY.fullmatch(str(v)) for k, v in values.items()):
            problems.append(f"spec.cleanupJob.resources.{section} must map resource names "
                            f"to quantities")
    return problems


def cleanup_job_problems(job: CleanupJobSpec, policy: CleanupPolicy) -> list[str]:
    """Everything in spec.cleanupJob the policy refuses; empty means the job may be built."""
    problems: list[str] = []
    if job.image and not image_allowed(job.image, policy.default_image,
                                       policy.image_allowlist):
        problems.append(
            f"spec.cleanupJob.image {job.image!r} is not allowed: the operator runs cleanup "
            f"jobs with its own image {policy.default_image!r} or an image of its "
            f"RESULTSTORE_CLEANUP_IMAGE_ALLOWLIST")
    if job.service_account_name:
        if not policy.allow_service_account:
            problems.append(
                "spec.cleanupJob.serviceAccountName is not allowed by the operator's "
                "settings (RESULTSTORE_CLEANUP_ALLOW_SERVICE_ACCOUNT); the cleanup job needs "
                "no API access")
        elif not _DNS_LABEL.fullmatch(job.service_account_name) and not re.fullmatch(
                r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$", job.service_account_name):
            problems.append("spec.cleanupJob.serviceAccountName is not a valid name")
    if job.host_network and not policy.allow_host_network:
        problems.append(
            "spec.cleanupJob.hostNetwork is not allowed by the operator's settings "
            "(RESULTSTORE_CLEANUP_ALLOW_HOST_NETWORK); it would run the cleanup pod in the "
            "node's network namespace")
    problems += toleration_problems(job.tolerations)
    problems += resources_problems(job.resources)
    return problems


def check_cleanup_job(job: CleanupJobSpec, policy: CleanupPolicy) -> None:
    """Raise CleanupJobRefused naming every refused field (never builds half a job)."""
    problems = cleanup_job_problems(job, policy)
    if problems:
        raise CleanupJobRefused("; ".join(problems))


def cleanup_command(store: str, batch_size: int) -> list[str]:
    return ["resultstore", "cleanup", "--config-dir", config_dir(store),
            "--batch-size", str(batch_size)]


def cronjob_manifest(store: str, namespace: str, owner: Mapping[str, Any],
                     spec: ResultStoreSpec, default_image: str,
                     default_pull_policy: str = "IfNotPresent") -> dict[str, Any]:
    job = spec.cleanup_job
    pod_labels = labels(store, "cleanup")
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": job.image or default_image,
        "imagePullPolicy": job.image_pull_policy or default_pull_policy,
        "command": cleanup_command(store, spec.retention.batch_size),
        "volumeMounts": [{
            "name": VOLUME_NAME,
            "mountPath": config_dir(store),
            "readOnly": True,
        }],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if job.resources:
        container["resources"] = dict(job.resources)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # The job talks to PostgreSQL only: no ServiceAccount token in the pod, ever.
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": NON_ROOT_UID,
            "runAsGroup": NON_ROOT_UID,
            "fsGroup": NON_ROOT_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [{
            "name": VOLUME_NAME,
            "secret": {"secretName": secret_name(store), "defaultMode": 0o440},
        }],
    }
    if job.node_selector:
        pod_spec["nodeSelector"] = dict(job.node_selector)
    if job.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in job.tolerations]
    if job.service_account_name:
        pod_spec["serviceAccountName"] = job.service_account_name
    if job.host_network:
        # The pairing Kubernetes recommends: without it a hostNetwork pod resolves names
        # with the node's resolv.conf and cannot see cluster Services.
        pod_spec["hostNetwork"] = True
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {
            "name": cronjob_name(store),
            "namespace": namespace,
            "labels": labels(store, "cleanup"),
            "ownerReferences": [dict(owner)],
        },
        "spec": {
            "schedule": spec.retention.schedule,
            "concurrencyPolicy": "Forbid",
            "suspend": job.suspend,
            "startingDeadlineSeconds": STARTING_DEADLINE_SECONDS,
            "successfulJobsHistoryLimit": job.successful_jobs_history_limit,
            "failedJobsHistoryLimit": job.failed_jobs_history_limit,
            "jobTemplate": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "backoffLimit": BACKOFF_LIMIT,
                    "activeDeadlineSeconds": ACTIVE_DEADLINE_SECONDS,
                    "template": {
                        "metadata": {"labels": pod_labels},
                        "spec": pod_spec,
                    },
                },
            },
        },
    }


def cronjob_event(action: str | None, existed_before: bool, name: str,
                  spec: ResultStoreSpec) -> tuple[str, str, str] | None:
    """The Event (type, reason, message) for what the server-side apply did, or None.

    A CronJob created although the status says one was scheduled before was deleted by
    someone: a Warning, unlike the first creation.
    """
    if action == "created" and existed_before:
        return "Warning", CRONJOB_CREATED, f"CronJob {name} was missing; recreated"
    if action == "created":
        return ("Normal", CRONJOB_CREATED,
                f"created CronJob {name} ({spec.retention.schedule})")
    if action == "updated":
        return ("Normal", CRONJOB_UPDATED,
                f"CronJob {name} brought to the spec (schedule {spec.retention.schedule}, "
                f"batch size {spec.retention.batch_size})")
    return None
