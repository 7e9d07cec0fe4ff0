"""The typed spec: defaults, ranges, enums and identifier rules, from plain dicts."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from resultstore_operator.settings import OperatorSettings, SettingsError
from resultstore_operator.spec import (
    SpecError,
    format_duration,
    parse_duration,
    parse_spec,
)


def minimal(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "database": {"host": "db.example", "name": "app",
                     "adminSecretRef": {"name": "pg-admin"}},
        "schema": "team_a",
    }
    spec.update(over)
    return spec


def test_defaults_are_applied() -> None:
    spec = parse_spec(minimal())
    assert spec.database.port == 5432
    assert spec.database.ssl_mode == "prefer"
    assert spec.database.admin_secret.username_key == "username"
    assert spec.tables.task_table == "celery_taskmeta"
    assert spec.tables.group_table == "celery_tasksetmeta"
    assert spec.engine.pool_size == 5 and spec.engine.max_overflow == 10
    assert spec.engine.pool_timeout == 30 and spec.engine.pool_recycle == 1800
    assert spec.engine.statement_timeout is None
    assert spec.retention.expires == 86400 and spec.retention.batch_size == 1000
    assert spec.credentials.rotate_every is None and spec.credentials.drain_timeout == 300
    assert spec.deletion_policy == "Retain"
    assert spec.cleanup_job.successful_jobs_history_limit == 3


def test_full_spec_is_typed() -> None:
    spec = parse_spec(minimal(
        database={"host": "h", "port": 6432, "name": "d", "sslMode": "verify-full",
                  "caSecretRef": {"name": "ca"},
                  "adminSecretRef": {"name": "a", "usernameKey": "u", "passwordKey": "p"}},
        tables={"taskTable": "tasks", "groupTable": "groups"},
        extendedResults=True,
        engine={"poolSize": 20, "maxOverflow": 0, "poolTimeout": "5s", "poolRecycle": "1h",
                "poolPrePing": False, "connectTimeout": "3s", "statementTimeout": "1500ms",
                "applicationName": "w"},
        retention={"expires": "7h", "schedule": "@hourly", "batchSize": 50},
        credentials={"rotateEvery": "720h", "drainTimeout": "10m"},
        cleanupJob={"image": "img:1", "nodeSelector": {"a": "b"},
                    "tolerations": [{"key": "k", "operator": "Exists"}],
                    "resources": {"limits": {"cpu": "1"}}, "serviceAccountName": "sa"},
        deletionPolicy="Delete",
    ))
    assert spec.database.ca_secret is not None and spec.database.ca_secret.key == "ca.crt"
    assert spec.database.admin_secret.password_key == "p"
    assert spec.engine.statement_timeout == pytest.approx(1.5)
    assert spec.engine.pool_recycle == 3600
    assert spec.retention.expires == 7 * 3600
    assert spec.credentials.rotate_every == 720 * 3600
    assert spec.cleanup_job.tolerations == ({"key": "k", "operator": "Exists"},)
    assert spec.deletion_policy == "Delete"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"schema": "Team"}, "spec.schema"),
        ({"schema": "1abc"}, "spec.schema"),
        ({"schema": "a" * 49}, "spec.schema"),
        ({"schema": "pg_catalog"}, "spec.schema"),
        ({"schema": "public"}, "spec.schema"),
        ({"schema": 'x"; drop'}, "spec.schema"),
        ({"deletionPolicy": "Orphan"}, "spec.deletionPolicy"),
        ({"engine": {"poolSize": 0}}, "spec.engine.poolSize"),
        ({"engine": {"poolSize": 1000}}, "spec.engine.poolSize"),
        ({"engine": {"maxOverflow": -1}}, "spec.engine.maxOverflow"),
        ({"engine": {"poolTimeout": "0s"}}, "spec.engine.poolTimeout"),
        ({"engine": {"poolTimeout": "soon"}}, "spec.engine.poolTimeout"),
        ({"engine": {"poolPrePing": "yes"}}, "spec.engine.poolPrePing"),
        ({"retention": {"batchSize": 0}}, "spec.retention.batchSize"),
        ({"retention": {"schedule": "every hour"}}, "spec.retention.schedule"),
        ({"credentials": {"rotateEvery": "1s"}}, "spec.credentials.rotateEvery"),
        ({"credentials": {"rotateEvery": "1m", "drainTimeout": "5m"}},
         "spec.credentials.rotateEvery"),
        ({"tables": {"taskTable": "x", "groupTable": "x"}}, "spec.tables"),
        ({"tables": {"taskTable": "Bad-Name"}}, "spec.tables.taskTable"),
        ({"database": {"host": "h", "name": "d"}}, "spec.database.adminSecretRef"),
        ({"database": {"name": "d", "adminSecretRef": {"name": "a"}}}, "spec.database.host"),
        ({"database": {"host": "h", "name": "d", "sslMode": "sometimes",
                       "adminSecretRef": {"name": "a"}}}, "spec.database.sslMode"),
        ({"database": {"host": "h", "name": "d", "port": 70000,
                       "adminSecretRef": {"name": "a"}}}, "spec.database.port"),
        ({"cleanupJob": {"tolerations": "all"}}, "spec.cleanupJob.tolerations"),
        ({"cleanupJob": {"imagePullPolicy": "Sometimes"}}, "spec.cleanupJob.imagePullPolicy"),
        ({"cleanupJob": {"hostNetwork": "true"}}, "spec.cleanupJob.hostNetwork"),
    ],
)
def test_invalid_specs_name_the_field(override: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(minimal(**override))
    assert field in str(err.value)


@pytest.mark.parametrize(
    ("job", "host_network"),
    [(None, False), ({}, False), ({"hostNetwork": None}, False),
     ({"hostNetwork": False}, False), ({"hostNetwork": True}, True),
     ({"hostNetwork": True, "nodeSelector": {"a": "b"}}, True)],
)
def test_cleanup_job_host_network(job: dict[str, Any] | None, host_network: bool) -> None:
    over = {} if job is None else {"cleanupJob": job}
    assert parse_spec(minimal(**over)).cleanup_job.host_network is host_network


@pytest.mark.parametrize("value", ["true", "yes", 1, 0, [], {}, "false"])
def test_cleanup_job_host_network_must_be_a_bool(value: Any) -> None:
    with pytest.raises(SpecError,
                       match=r"^spec\.cleanupJob\.hostNetwork: expected true or false$"):
        parse_spec(minimal(cleanupJob={"hostNetwork": value}))


def test_missing_schema_is_reported() -> None:
    raw = minimal()
    del raw["schema"]
    with pytest.raises(SpecError, match="spec.schema is required"):
        parse_spec(raw)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("500ms", 0.5), ("720h", 2_592_000),
     ("0s", 0), (45, 45)],
)
def test_parse_duration(text: str | int, seconds: float) -> None:
    assert parse_duration(text, "x") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1d", "-5s", "5", "1.5h", "s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(SpecError):
        parse_duration(text, "x")


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (90, "1m30s"), (3600, "1h"),
                                               (86400, "24h")])
def test_format_duration(seconds: int, text: str) -> None:
    assert format_duration(seconds) == text


def test_settings_from_env() -> None:
    settings = OperatorSettings.from_env({
        "RESULTSTORE_WATCH_NAMESPACES": "a, b,,",
        "RESULTSTORE_TICK_INTERVAL": "0.5",
        "RESULTSTORE_DRIFT_INTERVAL": "3",
        "RESULTSTORE_CLEANUP_IMAGE": "img:2",
        "POD_NAMESPACE": "ops",
        "RESULTSTORE_WEBHOOK_PORT": "9443",
        "OTHER": "ignored",
    })
    assert settings.namespaces == ("a", "b") and not settings.clusterwide
    assert settings.tick_interval == 0.5 and settings.drift_interval == 3
    assert settings.cleanup_image == "img:2"
    assert settings.operator_namespace == "ops"
    assert settings.standalone
    # The webhook's part is parsed from the same environment, in the operator's namespace.
    assert settings.webhook.listen_port == 9443 and settings.webhook.operator_namespace == "ops"
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.tick_interval = 1  # type: ignore[misc]


def test_settings_defaults_and_errors() -> None:
    settings = OperatorSettings.from_env({})
    assert settings.clusterwide
    assert settings.liveness_endpoint == "http://0.0.0.0:8080/healthz"
    assert [settings.backoff(n) for n in (1, 2, 3)] == [2.0, 4.0, 8.0]
    assert settings.backoff(50) == settings.retry_backoff_max
    with pytest.raises(SettingsError, match="RESULTSTORE_TICK_INTERVAL"):
        OperatorSettings.from_env({"RESULTSTORE_TICK_INTERVAL": "fast"})
    with pytest.raises(SettingsError, match="RESULTSTORE_WORKERS"):
        OperatorSettings.from_env({"RESULTSTORE_WORKERS": "0"})
