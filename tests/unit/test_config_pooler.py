"""A pooler in front of the server (issue 17): its URL and Secret forms, the pool's
transaction-mode-safe connection settings, the direct LISTEN target, and the pool sizes of a
prefork child. No services: everything here is decided by pure functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resultstore_backend import engine as engine_mod
from resultstore_backend.config import (
    Binding,
    CelerySettings,
    ConfigError,
    EngineSettings,
    PoolerSettings,
    StoreConfig,
    parse_backend_url,
    read_binding_dir,
    render_binding,
    validate_engine_options,
)
from resultstore_backend.consumer import listen_conninfo
from resultstore_backend.engine import engine_arguments
from tests.helpers.kubelet_dir import KubeletDir

PASSWORD = "s3cr:et/p@ss%word"
DIRECT = "resultstore+postgresql+psycopg://rs:pw@db.example:5432/app?schema=rs"


def _config(url: str) -> StoreConfig:
    source = parse_backend_url(url)
    assert isinstance(source, StoreConfig)
    return source


def binding(pooler: PoolerSettings | None = None) -> Binding:
    return Binding(host="db.example", port=5432, database="app", username="rs_app",
                   password=PASSWORD, sslmode="require",
                   engine=EngineSettings(statement_timeout_ms=5000),
                   celery=CelerySettings(schema="team_a"), pooler=pooler)


# ----------------------------------------------------------------------------- URL form


def test_url_pooler_routes_the_pool_and_keeps_the_direct_target() -> None:
    config = _config(DIRECT + "&pooler=bouncer.example:6432&pooler_mode=transaction"
                     "&options=-c%20statement_timeout%3D5000")
    assert config.pooler == PoolerSettings("bouncer.example", 6432, "transaction", False)
    assert (config.url.host, config.url.port) == ("db.example", 5432)
    pool = config.pool_url
    assert (pool.host, pool.port, pool.database, pool.username) == \
        ("bouncer.example", 6432, "app", "rs")
    assert "options" not in pool.query and "options" in config.url.query
    assert not {"pooler", "pooler_mode"} & set(config.url.query)


@pytest.mark.parametrize(("query", "expected"), [
    ("pooler=b", PoolerSettings("b", 5432, "transaction", False)),
    ("pooler=[::1]:6432&pooler_mode=session", PoolerSettings("::1", 6432, "session")),
    ("pooler=b:6432&pooler_prepared_statements=true",
     PoolerSettings("b", 6432, "transaction", True)),
])
def test_url_pooler_forms(query: str, expected: PoolerSettings) -> None:
    assert _config(DIRECT + "&" + query).pooler == expected


@pytest.mark.parametrize(("query", "part"), [
    ("pooler=b:65536", "port"), ("pooler=b:x", "port"), ("pooler=b/c:1", "host"),
    ("pooler=b&pooler_mode=statement", "pooler_mode"),
    ("pooler_mode=transaction", "pooler"),
    ("pooler=b&pooler_prepared_statements=maybe", "pooler_prepared_statements"),
])
def test_url_pooler_errors_name_the_parameter(query: str, part: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_backend_url(DIRECT.replace("pw", PASSWORD.replace("/", "%2F")) + "&" + query)
    assert part in str(err.value) and PASSWORD not in str(err.value)


def test_sqlite_has_no_pooler() -> None:
    with pytest.raises(ConfigError, match="pooler"):
        parse_backend_url("resultstore+sqlite:///r.db?pooler=b:6432")


def test_without_a_pooler_nothing_changes() -> None:
    config = _config(DIRECT)
    assert config.pooler is None and config.pool_url == config.url


# ----------------------------------------------------------------------------- Secret form


def test_secret_carries_the_pooled_dsn_beside_the_direct_one(tmp_path: Path) -> None:
    data = render_binding(binding(PoolerSettings("pooler.ns.svc", 6432)))
    assert data["pooler-host"] == "pooler.ns.svc" and data["pooler-port"] == "6432"
    assert data["pooler-mode"] == "transaction"
    assert data["pooler-prepared-statements"] == "false"
    assert data["pooled-uri"].startswith("postgresql://rs_app:")
    assert "@pooler.ns.svc:6432/app?sslmode=require" in data["pooled-uri"]
    assert "options" not in data["pooled-uri"]  # PgBouncer refuses the startup parameter
    assert data["pooled-result-backend"] == "db+postgresql+psycopg://" + \
        data["pooled-uri"].split("://", 1)[1]
    assert "@db.example:5432/" in data["uri"] and "@db.example:5432/" in data["result_backend"]
    KubeletDir(tmp_path).write(data)
    config = read_binding_dir(tmp_path)
    assert config.pooler == PoolerSettings("pooler.ns.svc", 6432, "transaction", False)
    assert (config.url.host, config.pool_url.host) == ("db.example", "pooler.ns.svc")
    assert config.pool_url.password == PASSWORD and PASSWORD not in repr(config)


def test_secret_without_pooler_has_no_pooler_keys() -> None:
    assert not [k for k in render_binding(binding()) if "pool" in k and k != "engine_options.json"]


@pytest.mark.parametrize(("key", "value"), [
    ("pooler-port", "sixty"), ("pooler-port", "0"), ("pooler-mode", "statement"),
    ("pooler-prepared-statements", "yes please"), ("pooler-host", "bad host"),
])
def test_secret_pooler_errors_name_the_file(tmp_path: Path, key: str, value: str) -> None:
    data = render_binding(binding(PoolerSettings("pooler.ns.svc", 6432)))
    data[key] = value
    KubeletDir(tmp_path).write(data)
    with pytest.raises(ConfigError) as err:
        read_binding_dir(tmp_path)
    assert str(tmp_path / key) in str(err.value) and PASSWORD not in str(err.value)


def test_pooler_settings_refuse_unknown_modes() -> None:
    with pytest.raises(ValueError, match="mode"):
        PoolerSettings("b", 6432, "statement")


# ----------------------------------------------------------------------------- the pool


def test_transaction_pooler_never_prepares_nor_sends_options() -> None:
    config = _config(DIRECT + "&pooler=b:6432")
    config = StoreConfig(url=config.url, names=config.names, pooler=config.pooler,
                         engine_options={"connect_args": {
                             "options": "-c statement_timeout=5000", "prepare_threshold": 5,
                             "application_name": "w"}})
    url, connect_args, _ = engine_arguments(config)
    assert (url.host, url.port) == ("b", 6432)
    assert connect_args["prepare_threshold"] is None, \
        "a transaction-mode pooler hands each statement to another server session"
    assert "options" not in connect_args and connect_args["application_name"] == "w"


@pytest.mark.parametrize("query", ["&pooler=b&pooler_mode=session",
                                   "&pooler=b&pooler_prepared_statements=true", ""])
def test_prepared_statements_where_the_session_keeps_them(query: str) -> None:
    _, connect_args, _ = engine_arguments(_config(DIRECT + query))
    assert connect_args["prepare_threshold"] == 1


def test_listen_connection_stays_direct_through_a_pooler() -> None:
    config = _config(DIRECT + "&pooler=b:6432&options=-c%20statement_timeout%3D5000")
    info = listen_conninfo(config)
    assert (info["host"], info["port"]) == ("db.example", 5432)
    assert "prepare_threshold" not in info and info["autocommit"] is True


# ----------------------------------------------------------------------------- pool sizes


def test_engine_options_say_what_a_prefork_child_holds() -> None:
    options = EngineSettings(pool_size=8, max_overflow=4).to_engine_options()
    assert (options["pool_size"], options["max_overflow"]) == (8, 4)
    assert options["prefork_child"] == {"pool_size": 1, "max_overflow": 0}
    assert validate_engine_options(json.loads(json.dumps(options)), Path("e.json")) == options


@pytest.mark.parametrize("bad", [{"pool_size": "1"}, {"pool_size": -1}, {"pool_timeout": 3},
                                 []])
def test_prefork_child_options_are_checked(bad: object) -> None:
    with pytest.raises(ConfigError, match="prefork_child"):
        validate_engine_options({"prefork_child": bad}, Path("e.json"))


def test_a_prefork_child_uses_its_own_pool_sizes() -> None:
    config = StoreConfig(url=_config(DIRECT).url, names=_config(DIRECT).names,
                         engine_options=EngineSettings().to_engine_options())
    _, _, parent = engine_arguments(config)
    _, _, child = engine_arguments(config, prefork_child=True)
    assert (parent["pool_size"], parent["max_overflow"]) == (5, 10)
    assert (child["pool_size"], child["max_overflow"]) == (1, 0)
    assert "prefork_child" not in parent and "prefork_child" not in child


def test_worker_process_init_marks_the_process_a_prefork_child() -> None:
    from celery.signals import worker_process_init

    import resultstore_backend.backend  # noqa: F401 - connects the signal

    assert not engine_mod.in_prefork_child()
    try:
        worker_process_init.send(sender=None)
        assert engine_mod.in_prefork_child()
    finally:
        engine_mod._PREFORK_CHILD = False


# ----------------------------------------------------------------------------- errors, warnings


def test_a_refused_pool_connection_names_the_pooler(tmp_path: Path) -> None:
    import psycopg

    refused = psycopg.OperationalError("connection refused")
    config = _config(DIRECT + "&pooler=bouncer.example:6432")
    err = engine_mod.classify_connect_error(refused, config, pooled=True)
    assert "bouncer.example:6432 (pooler)" in str(err) and err.key == "pooler" and err.transient
    direct = engine_mod.classify_connect_error(refused, config)  # the LISTEN connection's
    assert "db.example:5432" in str(direct) and "pooler" not in str(direct)
    KubeletDir(tmp_path).write(render_binding(binding(PoolerSettings("pooler.ns.svc", 6432))))
    from_dir = engine_mod.classify_connect_error(refused, read_binding_dir(tmp_path),
                                                 pooled=True)
    assert from_dir.path == str(tmp_path / "pooler-port") and PASSWORD not in str(from_dir)


def test_options_left_out_through_a_pooler_are_warned_once(
        caplog: pytest.LogCaptureFixture) -> None:
    config = StoreConfig(url=_config(DIRECT).url, names=_config(DIRECT).names,
                         pooler=PoolerSettings("warned.example", 6432),
                         engine_options={"connect_args": {
                             "options": "-c statement_timeout=5000"}})
    with caplog.at_level("WARNING", logger="resultstore_backend.engine"):
        engine_mod.build_engine(config).dispose()
        engine_mod.build_engine(config).dispose()
    warnings = [r.getMessage() for r in caplog.records if "statement_timeout" in r.getMessage()]
    assert len(warnings) == 1 and "ALTER ROLE" in warnings[0], warnings
