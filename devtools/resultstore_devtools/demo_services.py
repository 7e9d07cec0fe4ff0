"""In-cluster PostgreSQL and Redis for `scripts/demo --kubeconfig` (pure builders).

A cluster the demo is pointed at usually has neither a PostgreSQL the operator may administer
nor a Celery broker, so the demo brings small, disposable ones: single-replica Deployments on
``emptyDir`` storage from the official images, with Services named ``postgres`` and
``redis`` in the demo namespace. PostgreSQL's first start creates the operator's admin role
exactly as the examples expect it (``CREATEROLE`` and ``CREATE`` on the database, not a
superuser), through the image's ``/docker-entrypoint-initdb.d`` hook.
"""

from __future__ import annotations

from typing import Any

POSTGRES_IMAGE = "postgres:16-bookworm"
REDIS_IMAGE = "redis:7-bookworm"
LABEL = "app.kubernetes.io/part-of"
PART_OF = "celery-resultstore-demo"

_INIT_SCRIPT = """#!/bin/sh
# Runs once, on the first start of an empty data directory (the official image's hook).
set -eu
psql -v ON_ERROR_STOP=1 -v admin_password="$RESULTSTORE_ADMIN_PASSWORD" \\
     --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE resultstore_admin LOGIN CREATEROLE PASSWORD :'admin_password';
SELECT format('GRANT CREATE ON DATABASE %I TO resultstore_admin', current_database()) \\gexec
SQL
"""


def _meta(name: str, namespace: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace,
            "labels": {LABEL: PART_OF, "app.kubernetes.io/name": name}}


def _deployment(name: str, namespace: str, container: dict[str, Any],
                volumes: list[dict[str, Any]]) -> dict[str, Any]:
    selector = {"app.kubernetes.io/name": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, namespace),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": {**selector, LABEL: PART_OF}},
                         "spec": {"containers": [container], "volumes": volumes}},
        },
    }


def _service(name: str, namespace: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(name, namespace),
        "spec": {"selector": {"app.kubernetes.io/name": name},
                 "ports": [{"name": name, "port": port, "targetPort": port}]},
    }


def build_postgres(namespace: str, database: str, superuser_password: str,
                   admin_password: str, image: str = POSTGRES_IMAGE) -> list[dict[str, Any]]:
    """Secret, init ConfigMap, Deployment and Service of the demo's PostgreSQL."""
    secret = {
        "apiVersion": "v1", "kind": "Secret", "metadata": _meta("postgres", namespace),
        "type": "Opaque",
        "stringData": {"superuser-password": superuser_password,
                       "admin-password": admin_password},
    }
    init = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("postgres-init", namespace),
        "data": {"10-resultstore-admin.sh": _INIT_SCRIPT},
    }

    def secret_env(name: str, key: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"secretKeyRef": {"name": "postgres", "key": key}}}

    container = {
        "name": "postgres",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": [
            {"name": "POSTGRES_DB", "value": database},
            secret_env("POSTGRES_PASSWORD", "superuser-password"),
            secret_env("RESULTSTORE_ADMIN_PASSWORD", "admin-password"),
            {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"},
        ],
        "ports": [{"name": "postgres", "containerPort": 5432}],
        # -h 127.0.0.1: the image's first-start server listens on the socket only, so this
        # turns Ready only once the real server (after the init scripts) accepts TCP.
        "readinessProbe": {"exec": {"command": ["pg_isready", "-h", "127.0.0.1", "-U",
                                                "postgres"]},
                           "periodSeconds": 2, "failureThreshold": 60},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                      "limits": {"memory": "512Mi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"},
                         {"name": "init", "mountPath": "/docker-entrypoint-initdb.d",
                          "readOnly": True}],
    }
    volumes = [{"name": "data", "emptyDir": {}},
               {"name": "init", "configMap": {"name": "postgres-init", "defaultMode": 0o755}}]
    return [secret, init, _deployment("postgres", namespace, container, volumes),
            _service("postgres", namespace, 5432)]


def build_redis(namespace: str, image: str = REDIS_IMAGE) -> list[dict[str, Any]]:
    """Deployment and Service of the demo's Celery broker."""
    container = {
        "name": "redis",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["--save", "", "--appendonly", "no"],
        "ports": [{"name": "redis", "containerPort": 6379}],
        "readinessProbe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 2},
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"},
                      "limits": {"memory": "256Mi"}},
    }
    return [_deployment("redis", namespace, container, []), _service("redis", namespace, 6379)]


def service_host(name: str, namespace: str) -> str:
    return f"{name}.{namespace}.svc.cluster.local"
