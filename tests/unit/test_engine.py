"""Engine holder: hot reload on a kubelet swap, fork safety, error classification."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from resultstore_backend.config import (
    Binding,
    CelerySettings,
    EngineSettings,
    parse_backend_url,
    render_binding,
)
from resultstore_backend.engine import (
    EngineHolder,
    StoreConnectionError,
    classify_connect_error,
    is_transient_error,
)
from tests.helpers.kubelet_dir import KubeletDir


def _binding(user: str) -> Binding:
    return Binding(host="127.0.0.1", port=1, database="d", username=user, password="pw-" + user,
                   sslmode="disable", engine=EngineSettings(),
                   celery=CelerySettings(schema="s"))


def test_reload_swaps_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A controlled clock: on a loaded machine real sleeps make "not yet checked" unreliable.
    now = [1000.0]
    monkeypatch.setattr("resultstore_backend.engine.time.monotonic", lambda: now[0])
    kd = KubeletDir(tmp_path)
    kd.write(render_binding(_binding("a")))
    holder = EngineHolder(parse_backend_url(f"resultstore://{tmp_path}"), reload_interval=5.0)
    first = holder.engine()
    assert first.url.username == "a"
    assert holder.engine() is first  # no change, same engine
    kd.write(render_binding(_binding("b")))
    now[0] += 4.9
    assert holder.engine() is first  # checked at most every reload_interval
    now[0] += 0.2
    second = holder.engine()
    assert second is not first and second.url.username == "b" and holder.reloads == 1
    # invalid new content keeps the working engine
    data = render_binding(_binding("c"))
    data["celery.json"] = "{"
    kd.write(data)
    now[0] += 5.1
    assert holder.engine() is second


def test_fork_gets_fresh_engine(tmp_path: Path) -> None:
    holder = EngineHolder(parse_backend_url(f"sqlite:///{tmp_path}/f.db"))
    with holder.connection() as conn:
        conn.execute("SELECT 1")
    parent_engine = holder.engine()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        ok = holder.engine() is not parent_engine
        with holder.connection() as conn:
            conn.execute("SELECT 1")
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
    with holder.connection() as conn:  # the parent's pool still works
        conn.execute("SELECT 1")


def test_error_classification() -> None:
    cfg = parse_backend_url("postgresql://u:sekret@127.0.0.1:1/db")
    assert not isinstance(cfg, type(None))
    err = classify_connect_error(
        psycopg.OperationalError('FATAL: password authentication failed for user "u" sekret'),
        cfg)  # type: ignore[arg-type]
    assert err.key == "password" and not err.transient and "sekret" not in str(err)
    refused = classify_connect_error(psycopg.OperationalError("Connection refused"), cfg)  # type: ignore[arg-type]
    assert refused.transient and refused.key == "port"
    assert is_transient_error(refused) and not is_transient_error(err)
    assert is_transient_error(sa.exc.TimeoutError())
    assert not is_transient_error(ValueError())
    assert isinstance(err, StoreConnectionError)


def test_bad_dir_fails_at_construction(tmp_path: Path) -> None:
    from resultstore_backend.config import ConfigError

    with pytest.raises(ConfigError):
        EngineHolder(parse_backend_url(f"resultstore://{tmp_path}/missing"))
