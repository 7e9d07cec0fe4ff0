"""Bad configuration gives an error naming the file and key, never the password."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery, states

from resultstore_backend.config import ConfigError, render_binding
from tests.helpers.kubelet_dir import KubeletDir
from tests.integration.stores import binding_for, create_role, create_store

pytestmark = pytest.mark.integration


def _backend(config_dir: Path) -> Any:
    app = Celery("c", backend=f"resultstore://{config_dir}", set_as_current=False)
    app.conf.result_backend_max_retries = 1
    return app.backend


def _full_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


@pytest.fixture
def store(pg_database: Any) -> tuple[Any, tuple[str, str]]:
    names = create_store(pg_database)
    return pg_database, create_role(pg_database, names)


def _write(tmp_path: Path, data: dict[str, str]) -> Path:
    KubeletDir(tmp_path / "b").write(data)
    return tmp_path / "b"


@pytest.mark.parametrize("case", ["missing", "malformed", "wrong_type"])
def test_bad_files(case: str, store: Any, tmp_path: Path) -> None:
    pg_database, (role, password) = store
    data = render_binding(binding_for(pg_database, role, password))
    if case == "missing":
        del data["celery.json"]
        where = "celery.json"
    elif case == "malformed":
        data["engine_options.json"] = '{"pool_size": ' + json.dumps(password)
        where = "engine_options.json"
    else:
        data["engine_options.json"] = json.dumps({"pool_size": "ten"})
        where = "engine_options.json"
    config_dir = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        _backend(config_dir)
    text = _full_text(info.value)
    assert str(config_dir / where) in str(info.value)
    if case == "wrong_type":
        assert "'pool_size'" in str(info.value)
    assert password not in text


def test_wrong_password(store: Any, tmp_path: Path) -> None:
    pg_database, (role, password) = store
    wrong = password + "-WRONG"
    config_dir = _write(tmp_path, render_binding(binding_for(pg_database, role, wrong)))
    backend = _backend(config_dir)
    with pytest.raises(Exception) as info:
        backend.store_result("x", 1, states.SUCCESS)
    text = _full_text(info.value)
    assert str(config_dir / "password") in text
    assert "password authentication failed" in text
    assert wrong not in text and password not in text
    # the CronJob's command reports the same, with a non-zero exit
    proc = subprocess.run([sys.executable, "-m", "resultstore_backend.cli", "cleanup",
                           "--config-dir", str(config_dir)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert str(config_dir / "password") in proc.stderr
    assert wrong not in proc.stdout + proc.stderr


def test_unreachable_host(store: Any, tmp_path: Path) -> None:
    pg_database, (role, password) = store
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config_dir = _write(tmp_path, render_binding(
        binding_for(pg_database, role, password, port=port)))
    backend = _backend(config_dir)
    with pytest.raises(Exception) as info:
        backend.store_result("x", 1, states.SUCCESS)
    text = _full_text(info.value)
    assert str(config_dir / "port") in text and "Connection refused" in text
    assert password not in text
    proc = subprocess.run([sys.executable, "-m", "resultstore_backend.cli", "cleanup",
                           "--config-dir", str(config_dir)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and str(config_dir / "port") in proc.stderr
    assert password not in proc.stdout + proc.stderr


def test_bad_url_does_not_echo_password() -> None:
    app = Celery("c", backend="resultstore+mysql://u:hunter2secret@h/db", set_as_current=False)
    with pytest.raises(Exception) as info:
        app.backend  # noqa: B018
    assert "hunter2secret" not in _full_text(info.value)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "resultstore_backend.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_url_errors_name_the_server_not_secret_keys(store: Any) -> None:
    """With --url there is no Secret directory: errors speak of host:port, never of keys."""
    pg_database, (role, password) = store
    server = pg_database.server
    wrong = password + "-WRONG"
    url = sa.engine.URL.create("postgresql", username=role, password=wrong, host=server.host,
                               port=server.port, database=pg_database.name,
                               query={"schema": "rs"}).render_as_string(hide_password=False)
    proc = _cli("check", "--url", url)
    assert proc.returncode == 1, proc
    assert (f"cannot connect to PostgreSQL at {server.host}:{server.port} "
            f"(database {pg_database.name!r}, user {role!r})") in proc.stderr, proc.stderr
    assert "password authentication failed" in proc.stderr, proc.stderr
    assert "key '" not in proc.stderr, proc.stderr
    assert wrong not in proc.stdout + proc.stderr and password not in proc.stderr
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        refused = _cli("cleanup", "--url", url.replace(f":{server.port}/", f":{port}/"))
    assert refused.returncode == 1, refused
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port} " in refused.stderr, refused.stderr
    assert "refused" in refused.stderr.lower() and "key '" not in refused.stderr, refused.stderr


def test_check_tells_an_unmigrated_postgresql_store(pg_database: Any) -> None:
    url = pg_database.url() + "?schema=not_there"
    proc = _cli("check", "--url", url)
    assert proc.returncode == 3, proc
    assert not proc.stdout.startswith("ok"), proc.stdout
    assert "not migrated: schema version 0, run `resultstore migrate`" in proc.stderr, proc
    assert _cli("migrate", "--url", url).returncode == 0
    ok = _cli("check", "--url", url)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: "), ok
