"""The cleanup CronJob: `resultstore cleanup` against the mounted binding Secret.

The job reads the same Secret as the workers, so it always uses the current login role and
needs no credentials of its own; `concurrencyPolicy: Forbid` keeps two batched deletions
from competing for the same rows when a run outlasts the schedule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..spec import ResultStoreSpec
from .names import config_dir, cronjob_name, labels, secret_name

CONTAINER_NAME = "cleanup"
VOLUME_NAME = "resultstore-binding"
NON_ROOT_UID = 65532
STARTING_DEADLINE_SECONDS = 300
BACKOFF_LIMIT = 2
ACTIVE_DEADLINE_SECONDS = 3600


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
