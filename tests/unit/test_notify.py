"""Pure parts of push waits: channel sharding, payloads, LISTEN SQL, the notifying upsert,
the listener's connection options and the notification settings."""

from __future__ import annotations

import json
import zlib
from collections import Counter
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy.engine import make_url

from resultstore_backend.config import (
    CelerySettings,
    ConfigError,
    StoreConfig,
    parse_backend_url,
    read_binding_dir,
)
from resultstore_backend.consumer import listen_conninfo, through_pooler
from resultstore_backend.engine import reset_registry
from resultstore_backend.notify import (
    SHARDS,
    channel_for,
    channel_prefix,
    format_payload,
    listen_sql,
    lock_key,
    parse_payload,
    shard_of,
    shard_of_channel,
)
from resultstore_backend.schema import TableNames
from resultstore_backend.sql import statements


def test_shard_is_crc32_mod_shards_and_stable() -> None:
    # the same function in every process and Python version (no hash randomisation)
    for task_id in ("a", "5f1c1f2e-8a3b-4c8e-9d57-0e6b7f2c8a10", "ü-tâche", ""):
        assert shard_of(task_id) == zlib.crc32(task_id.encode("utf-8")) % SHARDS
    assert shard_of("x", shards=1) == 0


def test_shards_spread_uuids_evenly() -> None:
    import uuid

    counts = Counter(shard_of(str(uuid.UUID(int=i * 7919 + 13, version=4)))
                     for i in range(25600))
    assert len(counts) == SHARDS, f"only {len(counts)} of {SHARDS} shards used"
    assert max(counts.values()) < 3 * 100, counts.most_common(3)


def test_channel_names_per_store_and_shard() -> None:
    a = channel_prefix(TableNames("team_a"))
    b = channel_prefix(TableNames("team_b"))
    c = channel_prefix(TableNames("team_a", "other_taskmeta"))
    assert len({a, b, c}) == 3, "two stores of one database must never share channels"
    assert channel_prefix(TableNames("team_a")) == a  # deterministic
    ch = channel_for(a, "some-task")
    assert ch == f"{a}_{shard_of('some-task'):02x}"
    assert len(ch) <= 63 and ch.replace("_", "").isalnum() and ch == ch.lower()


def test_payload_round_trip_and_foreign_payloads_ignored() -> None:
    assert parse_payload(format_payload("id:with|bars", "SUCCESS")) == ("id:with|bars", "SUCCESS")
    assert parse_payload("rs1|PROGRESS|t1") == ("t1", "PROGRESS")
    for foreign in ("", "hello", "rs1|SUCCESS", "rs2|SUCCESS|t1", "rs1||t1", "rs1|SUCCESS|",
                    "rs1|success|t1", "rs1|DROP TABLE;|t1", '{"task_id": "t1"}'):
        assert parse_payload(foreign) is None, foreign


def test_listen_sql_quotes_only_our_channel_names_and_holds_presence_locks() -> None:
    assert listen_sql(["rs_ab_01", "rs_ab_00"], ["rs_ab_ff"]) == \
        'UNLISTEN "rs_ab_ff"; LISTEN "rs_ab_00"; LISTEN "rs_ab_01"'
    assert listen_sql(["rs_ab_0a"], ["rs_ab_ff"], key=-7) == (
        'UNLISTEN "rs_ab_ff"; SELECT pg_advisory_unlock_shared(-7, 255); '
        'SELECT pg_advisory_lock_shared(-7, 10); LISTEN "rs_ab_0a"')
    a, b = lock_key(TableNames("team_a")), lock_key(TableNames("team_b"))
    assert a != b and -2**31 <= a < 2**31 and lock_key(TableNames("team_a")) == a
    assert shard_of_channel(channel_for("rs_x", "some-id")) == shard_of("some-id")
    assert listen_sql([], []) == ""
    for bad in ('x"; DROP TABLE t; --', "Upper", "", "a" * 64):
        with pytest.raises(ValueError):
            listen_sql([bad], [])


def test_notifying_upsert_is_one_statement_with_the_channel_last() -> None:
    sql = statements("postgresql", TableNames("team_a"))
    stmt = sql.notify_upsert_task
    assert stmt.startswith("WITH u AS (INSERT INTO") and stmt.count(";") == 0
    assert "RETURNING t.task_id, t.status" in stmt
    assert "pg_notify(%s, 'rs1|' || u.status || '|' || u.task_id) FROM u" in stmt
    # only when a session listens to the shard (its shared presence lock is held)
    assert stmt.endswith("WHERE NOT pg_try_advisory_xact_lock(%s::int4, %s::int4)")
    # the upsert's own parameters come first, then channel, lock key, shard
    assert stmt.count("%s") == sql.upsert_task.count("%s") + 3
    assert sql.channel_prefix == channel_prefix(TableNames("team_a"))
    assert sql.lock_key == lock_key(TableNames("team_a"))
    assert "status IN" not in sql.select_many and "ANY(%s)" in sql.select_many
    lite = statements("sqlite", TableNames())
    assert lite.notify_upsert_task == "" and "{in}" in lite.select_many


def test_listen_conninfo_same_target_bounded_timeout_no_pool_options() -> None:
    config = StoreConfig(
        url=make_url("postgresql+psycopg://u:p%40ss@127.0.0.1:5433/db?sslmode=disable"),
        names=TableNames("rs"),
        engine_options={"pool_size": 3, "connect_args": {
            "connect_timeout": 30, "application_name": "app", "prepare_threshold": 1}},
    )
    kw = listen_conninfo(config)
    assert kw["host"] == "127.0.0.1" and kw["port"] == 5433 and kw["dbname"] == "db"
    assert kw["user"] == "u" and kw["password"] == "p@ss" and kw["sslmode"] == "disable"
    assert kw["application_name"] == "app" and kw["autocommit"] is True
    assert kw["connect_timeout"] == 5, "a LISTEN connect must not block a wait for 30 s"
    assert kw["keepalives"] == 1
    assert "prepare_threshold" not in kw and "pool_size" not in kw


def test_pooler_detected_by_a_made_up_backend_pid() -> None:
    assert not through_pooler(4242, 4242)
    assert through_pooler(123456, 4242)  # PgBouncer's cancel key, the server's real pid
    assert not through_pooler(None, 4242) and not through_pooler(0, 4242)


def test_notifications_setting_in_url_and_celery_json(tmp_path: Path) -> None:
    plain = parse_backend_url("postgresql://u:p@h/db")
    assert isinstance(plain, StoreConfig) and plain.notifications is None
    off = parse_backend_url("resultstore+postgresql://u:p@h/db?notify=false")
    assert isinstance(off, StoreConfig) and off.notifications is False
    assert "notify" not in dict(off.url.query)
    on = parse_backend_url("postgresql://u:p@h/db?notify=1")
    assert isinstance(on, StoreConfig) and on.notifications is True
    with pytest.raises(ConfigError, match="notify"):
        parse_backend_url("postgresql://u:secret@h/db?notify=maybe")
    assert "notifications" not in CelerySettings(schema="s").to_json()  # default: unchanged
    assert CelerySettings(schema="s", notifications=False).to_json()["notifications"] is False

    d = tmp_path / "b"
    d.mkdir()
    for key, value in (("host", "h"), ("database", "db"), ("username", "u"),
                       ("password", "pw")):
        (d / key).write_text(value)
    (d / "celery.json").write_text(json.dumps({"schema": "s"}))
    assert read_binding_dir(d).notifications is True  # absent key: on
    (d / "celery.json").write_text(json.dumps(CelerySettings(
        schema="s", notifications=False).to_json()))
    assert read_binding_dir(d).notifications is False
    (d / "celery.json").write_text(json.dumps({"schema": "s", "notifications": "no"}))
    with pytest.raises(ConfigError, match="notifications"):
        read_binding_dir(d)


def test_resultstore_field_reaches_the_backend_through_celery_json(tmp_path: Path) -> None:
    from resultstore_operator import crd
    from resultstore_operator.builders.secret import secret_values
    from resultstore_operator.spec import SpecError, parse_spec

    raw = {"database": {"host": "db.example", "name": "app",
                        "adminSecretRef": {"name": "pg-admin"}}, "schema": "orders"}
    assert parse_spec(raw).notifications is True
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    field = schema["properties"]["spec"]["properties"]["notifications"]
    assert field["type"] == "boolean" and field["default"] is True
    for value, expected in ((True, True), (False, False)):
        values = secret_values(parse_spec({**raw, "notifications": value}), "u", "p")
        d = tmp_path / f"b{value}"
        d.mkdir()
        for key, text in values.items():
            (d / key).write_text(text)
        assert read_binding_dir(d).notifications is expected
        # and on to the backend a worker builds from that directory (nothing connects yet)
        app = Celery("u", backend=f"resultstore://{d}", set_as_current=False)
        try:
            assert app.backend.notifications is expected
            assert app.backend.result_consumer.push is expected
        finally:
            app.close()
            reset_registry()
    with pytest.raises(SpecError, match="notifications"):
        parse_spec({**raw, "notifications": "yes"})
