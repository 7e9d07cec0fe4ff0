from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest

from resultstore_backend.config import (
    Binding,
    CelerySettings,
    ConfigError,
    DirectorySource,
    EngineSettings,
    StoreConfig,
    parse_backend_url,
    read_binding_dir,
    render_binding,
)
from tests.helpers.kubelet_dir import KubeletDir

PASSWORD = "s3cr:et/p@ss%word"


def binding(**kw: object) -> Binding:
    values: dict[str, object] = dict(
        host="127.0.0.1", port=5432, database="app", username="rs_app", password=PASSWORD,
        sslmode="disable",
        engine=EngineSettings(pool_size=3, statement_timeout_ms=5000),
        celery=CelerySettings(schema="team_a", extended=True, expires=3600),
    )
    values.update(kw)
    return Binding(**values)  # type: ignore[arg-type]


def test_render_binding_keys() -> None:
    data = render_binding(binding(ca_cert="CERT"))
    assert set(data) == {
        "type", "provider", "host", "port", "database", "username", "password", "sslmode",
        "schema", "uri", "result_backend", "engine_options.json", "celery.json", "ca.crt",
    }
    assert data["type"] == "postgresql" and data["provider"] == "resultstore"
    assert data["uri"].startswith("postgresql://rs_app:")
    assert "options=-csearch_path%3Dteam_a" in data["uri"]
    assert data["result_backend"].startswith("db+postgresql+psycopg://")
    assert "options=-csearch_path%3Dteam_a" in data["result_backend"]
    opts = json.loads(data["engine_options.json"])
    assert opts["pool_size"] == 3
    assert opts["connect_args"]["options"] == "-c statement_timeout=5000"
    cel = json.loads(data["celery.json"])
    assert cel == {"schema": "team_a", "task_table": "celery_taskmeta",
                   "group_table": "celery_tasksetmeta", "result_extended": True,
                   "result_expires": 3600}
    assert PASSWORD not in repr(binding())


def test_round_trip_through_kubelet_dir(tmp_path: Path) -> None:
    KubeletDir(tmp_path).write(render_binding(binding()))
    cfg = read_binding_dir(tmp_path)
    assert cfg.url.password == PASSWORD
    assert cfg.url.username == "rs_app" and cfg.url.host == "127.0.0.1"
    assert cfg.url.drivername == "postgresql+psycopg"
    assert cfg.names.schema == "team_a"
    assert cfg.extended is True and cfg.expires == 3600
    assert cfg.engine_options["pool_size"] == 3
    assert cfg.version is not None and cfg.version.startswith("..")
    assert PASSWORD not in repr(cfg) and PASSWORD not in str(cfg)


def test_uri_only(tmp_path: Path) -> None:
    data = render_binding(binding())
    for key in ("host", "port", "database", "username", "password"):
        del data[key]
    KubeletDir(tmp_path).write(data)
    cfg = read_binding_dir(tmp_path)
    assert cfg.url.password == PASSWORD and cfg.url.database == "app"
    assert "options" not in cfg.url.query


def _error(tmp_path: Path, data: dict[str, str]) -> ConfigError:
    KubeletDir(tmp_path).write(data)
    with pytest.raises(ConfigError) as info:
        read_binding_dir(tmp_path)
    assert PASSWORD not in str(info.value)
    return info.value


def test_missing_key(tmp_path: Path) -> None:
    data = render_binding(binding())
    del data["uri"], data["password"]
    err = _error(tmp_path, data)
    assert err.path == str(tmp_path / "password")
    assert "password" in str(err)


def test_missing_celery_json(tmp_path: Path) -> None:
    data = render_binding(binding())
    del data["celery.json"]
    err = _error(tmp_path, data)
    assert str(tmp_path / "celery.json") in str(err)


def test_malformed_json(tmp_path: Path) -> None:
    data = render_binding(binding())
    data["engine_options.json"] = '{"pool_size": 3,, "x": "' + PASSWORD + '"}'
    err = _error(tmp_path, data)
    assert str(tmp_path / "engine_options.json") in str(err)
    assert "malformed JSON" in str(err)


@pytest.mark.parametrize("file,key,value", [
    ("engine_options.json", "pool_size", "five"),
    ("engine_options.json", "pool_pre_ping", 1),
    ("celery.json", "result_expires", "1d"),
    ("celery.json", "result_extended", "yes"),
    ("celery.json", "schema", 5),
])
def test_wrong_type(tmp_path: Path, file: str, key: str, value: object) -> None:
    data = render_binding(binding())
    doc = json.loads(data[file])
    doc[key] = value
    data[file] = json.dumps(doc)
    err = _error(tmp_path, data)
    assert err.path == str(tmp_path / file) and err.key == key
    assert file in str(err) and repr(key) in str(err)


def test_unknown_engine_option(tmp_path: Path) -> None:
    data = render_binding(binding())
    data["engine_options.json"] = json.dumps({"pool_sise": 3})
    err = _error(tmp_path, data)
    assert err.key == "pool_sise"


def test_bad_port_and_schema(tmp_path: Path) -> None:
    data = render_binding(binding())
    data["port"] = "fifty"
    assert _error(tmp_path / "a", data).path == str(tmp_path / "a" / "port")
    data = render_binding(binding())
    data["celery.json"] = json.dumps({"schema": "bad-name"})
    assert _error(tmp_path / "b", data).key == "schema"


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_binding_dir(tmp_path / "nope")


def test_kubelet_swap_changes_version(tmp_path: Path) -> None:
    kd = KubeletDir(tmp_path)
    kd.write(render_binding(binding()))
    first = read_binding_dir(tmp_path)
    kd.write(render_binding(binding(username="rs_app2")))
    second = read_binding_dir(tmp_path)
    assert first.version != second.version
    assert second.url.username == "rs_app2"
    # old timestamped dir removed, visible keys are symlinks into ..data
    entries = [p.name for p in tmp_path.iterdir() if p.name.startswith("..") and p.is_dir()
               and not p.is_symlink()]
    assert entries == [second.version]
    assert (tmp_path / "password").is_symlink()


def test_parse_backend_url_forms() -> None:
    src = parse_backend_url("resultstore:///var/run/resultstore/x")
    assert src == DirectorySource(Path("/var/run/resultstore/x"))
    quoted = quote(PASSWORD, safe="")
    pg = parse_backend_url(
        f"resultstore+postgresql+psycopg://u:{quoted}@h:5/db?schema=s1&sslmode=disable"
    )
    assert isinstance(pg, StoreConfig)
    assert pg.names.schema == "s1" and pg.url.drivername == "postgresql+psycopg"
    assert "schema" not in pg.url.query and pg.url.query["sslmode"] == "disable"
    assert PASSWORD not in repr(pg)
    stripped = parse_backend_url("postgresql://u:p@h/db")  # as Celery's by_url passes it
    assert isinstance(stripped, StoreConfig) and stripped.names.schema is None
    lite = parse_backend_url("resultstore+sqlite:///results.db")
    assert isinstance(lite, StoreConfig) and lite.is_sqlite
    default = parse_backend_url(None)
    assert isinstance(default, StoreConfig) and default.is_sqlite


@pytest.mark.parametrize("url", [
    "resultstore://relative/dir", "mysql://u:p@h/db", "postgresql://u:p@h/db?schema=bad-x",
    "sqlite:///x.db?schema=s",
])
def test_parse_backend_url_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_backend_url(url)


# --------------------------------------------------------------------------- URLs and secrets
# No part of a password may reach an error message, str/repr of the error or of the
# config: every check below looks for any 3-character fragment of the secret.

SECRET = "Zq9Xk7Wv"


def leaks(text: str, secret: str = SECRET) -> list[str]:
    """Fragments (3+ characters) of ``secret`` that appear in ``text``."""
    return [secret[i:i + 3] for i in range(len(secret) - 2) if secret[i:i + 3] in text]


def refused_url(url: str, secret: str = SECRET) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_backend_url(url)
    exc = info.value
    for text in (str(exc), repr(exc), exc.message, str(exc.path)):
        assert not leaks(text, secret), f"{text!r} shows part of the password"
    return exc


@pytest.mark.parametrize("password", ["p@" + SECRET, SECRET + "@", "a@b@" + SECRET,
                                      SECRET + "/x@y", "?" + SECRET + "@"])
def test_unescaped_at_in_password_splits_at_the_last_at(password: str) -> None:
    config = parse_backend_url(f"resultstore+postgresql://u:{password}@db.example:5433/app"
                               "?schema=s1&application_name=a@b")
    assert isinstance(config, StoreConfig)
    assert config.url.password == password
    assert (config.url.host, config.url.port, config.url.database) == ("db.example", 5433,
                                                                        "app")
    assert config.url.query["application_name"] == "a@b"
    for text in (repr(config), str(config), config.describe()):
        assert not leaks(text, password.replace("@", "")), text


def test_percent_encoded_passwords_still_work() -> None:
    config = parse_backend_url(f"postgresql://u:{quote(PASSWORD, safe='')}@h/db")
    assert isinstance(config, StoreConfig) and config.url.password == PASSWORD


def test_at_in_a_path_is_not_userinfo() -> None:
    # (without user info, an '@' in the query needs %40, as with SQLAlchemy: the text
    # before it could be a user and a password containing '/')
    config = parse_backend_url("postgresql://h:5432/db?application_name=x%40y")
    assert isinstance(config, StoreConfig)
    assert config.url.host == "h" and config.url.username is None
    assert config.url.query["application_name"] == "x@y"
    lite = parse_backend_url("sqlite:////tmp/a@b.db")
    assert isinstance(lite, StoreConfig) and lite.url.database == "/tmp/a@b.db"


def test_ambiguous_userinfo_is_refused_without_quoting_it() -> None:
    # '/' between two '@' of the password: no parser can tell where the host starts
    exc = refused_url(f"postgresql://u:p@{SECRET[:4]}/{SECRET[4:]}@host/db")
    assert exc.key == "password" and "percent-encode" in exc.message


def test_password_query_parameter_is_moved_and_never_shown() -> None:
    config = parse_backend_url(f"postgresql://u@h/db?password={SECRET}&sslmode=disable")
    assert isinstance(config, StoreConfig)
    assert config.url.password == SECRET and config.password == SECRET
    assert "password" not in config.url.query and config.url.query["sslmode"] == "disable"
    for text in (repr(config), str(config), config.describe()):
        assert not leaks(text), text
    # errors raised after parsing name the URL safely too
    exc = refused_url(f"postgresql://u@h/db?password={SECRET}&schema=bad-x")
    assert "schema" in str(exc) or "bad-x" in str(exc)
    refused_url(f"sqlite:///x.db?password={SECRET}&schema=s")


def test_password_given_twice_is_refused() -> None:
    exc = refused_url(f"postgresql://u:{SECRET}@h/db?password={SECRET}x")
    assert exc.key == "password" and "twice" in exc.message


def test_sslpassword_is_never_shown() -> None:
    config = parse_backend_url(f"postgresql://u:pw@h/db?sslpassword={SECRET}")
    assert isinstance(config, StoreConfig)
    assert config.url.query["sslpassword"] == SECRET  # still passed to libpq
    assert not leaks(repr(config)) and not leaks(config.describe())


@pytest.mark.parametrize("port,reason", [
    ("notaport", "not a number"), ("99999", "outside"), ("0", "outside"), ("-1", "not a"),
    ("5432,h2:5433", "not a number"), ("", "not a number"),
])
def test_malformed_ports_name_the_port(port: str, reason: str) -> None:
    url = f"resultstore+postgresql://u:{SECRET}@h:{port}/db"
    exc = refused_url(url)
    assert exc.key == "port" and reason in exc.message, exc.message


@pytest.mark.parametrize("host", ["ho st", "h<x>", "[::1", "[::1]x"])
def test_invalid_hosts_are_refused(host: str) -> None:
    exc = refused_url(f"postgresql://u:{SECRET}@{host}/db")
    assert exc.key == "host"


def test_ipv6_hosts_and_ports() -> None:
    config = parse_backend_url(f"postgresql://u:{SECRET}@x@[::1]:6543/db")
    assert isinstance(config, StoreConfig)
    assert (config.url.host, config.url.port, config.url.password) == (
        "::1", 6543, f"{SECRET}@x")


def test_backend_gives_improperly_configured_without_the_password() -> None:
    from celery import Celery
    from celery.exceptions import ImproperlyConfigured

    for url in (f"resultstore+postgresql://u:{SECRET}@h:notaport/db",
                f"resultstore+postgresql://u:p@{SECRET}/x@h/db",
                f"resultstore+postgresql://u@h:99999/db?password={SECRET}"):
        app = Celery("u", backend=url, set_as_current=False)
        with pytest.raises(ImproperlyConfigured) as info:
            app.backend  # noqa: B018 - constructing the backend parses the URL
        assert not leaks(str(info.value)) and not leaks(repr(info.value)), info.value


def test_uri_key_of_a_config_dir_is_checked_the_same_way(tmp_path: Path) -> None:
    KubeletDir(tmp_path).write({
        "uri": f"postgresql://u:{SECRET}@h:notaport/db",
        "celery.json": json.dumps({"schema": "s"}),
    })
    with pytest.raises(ConfigError) as info:
        read_binding_dir(tmp_path)
    assert info.value.key == "port" and str(tmp_path / "uri") in str(info.value)
    assert not leaks(str(info.value))
    KubeletDir(tmp_path).write({
        "uri": f"postgresql://u:p@{SECRET}@h/db",
        "celery.json": json.dumps({"schema": "s"}),
    })
    config = read_binding_dir(tmp_path)
    assert config.url.password == f"p@{SECRET}" and not leaks(repr(config))


def test_unescaped_at_in_the_user_name_azure_style() -> None:
    config = parse_backend_url(f"postgresql://app@myserver:{SECRET}@myserver.example/db")
    assert isinstance(config, StoreConfig)
    assert (config.url.username, config.url.password, config.url.host) == (
        "app@myserver", SECRET, "myserver.example")
    assert not leaks(repr(config))
