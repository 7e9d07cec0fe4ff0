"""The retry budget of ResultStoreBackend._ensure_retryable (no services).

The loop's clock and sleep are replaced by a fake clock so that a 90 s budget is
checked in milliseconds; the errors are the ones the engine really raises for a
stopped server (StoreConnectionError, transient) or psycopg's OperationalError.
The live version of this (a worker storing through a 30 s outage) is
tests/integration/test_backend_outage.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import Celery
from celery.exceptions import BackendStoreError, ImproperlyConfigured

from resultstore_backend import backend as backend_mod
from resultstore_backend.backend import DEFAULT_RETRY_BUDGET, ResultStoreBackend
from resultstore_backend.engine import StoreConnectionError, reset_registry

SECRET = "Pw-Zq9Xk7Wv"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(backend_mod.time, "monotonic", fake.monotonic)
    return fake


@pytest.fixture
def make_backend(tmp_path: Path, clock: FakeClock) -> Iterator[Any]:
    def make(**conf: Any) -> ResultStoreBackend:
        app = Celery("retry", backend=f"resultstore+sqlite:///{tmp_path}/r.db",
                     set_as_current=False)
        app.conf.update(**conf)
        backend = app.backend
        assert isinstance(backend, ResultStoreBackend)
        backend._sleep = clock.sleep
        return backend
    reset_registry()
    yield make
    reset_registry()


def outage(clock: FakeClock, seconds: float, exc: Exception) -> Any:
    """An operation failing with ``exc`` until ``seconds`` of fake time have passed."""
    end = clock.now + seconds
    calls: list[float] = []

    def op() -> str:
        calls.append(clock.now)
        if clock.now < end:
            raise exc
        return "stored"
    op.calls = calls  # type: ignore[attr-defined]
    return op


def down() -> StoreConnectionError:
    return StoreConnectionError("cannot connect to PostgreSQL at h:5432/db as u: "
                                "connection refused", path="url", key="port", transient=True)


def test_defaults_ride_out_a_60s_outage(make_backend: Any, clock: FakeClock) -> None:
    backend = make_backend()
    assert backend.retry_budget == DEFAULT_RETRY_BUDGET >= 60
    assert backend.max_retries == float("inf") and backend.always_retry
    op = outage(clock, 60.0, down())
    assert backend._ensure_retryable(op) == "stored"
    assert max(clock.sleeps) <= 2.0, "backoff is capped at 2 s"
    assert 60.0 <= clock.now - 1000.0 <= 62.0, "retried right after the outage ended"


def test_budget_is_time_not_attempts(make_backend: Any, clock: FakeClock) -> None:
    backend = make_backend()
    op = outage(clock, 10_000.0, down())
    with pytest.raises(BackendStoreError):
        backend._ensure_retryable(op, fallback_exc=BackendStoreError, fallback_msg="lost")
    spent = op.calls[-1] - op.calls[0]
    assert spent == pytest.approx(DEFAULT_RETRY_BUDGET), spent  # last try at the deadline
    assert len(op.calls) > 50, "many attempts fit in the budget"


def test_app_setting_changes_the_budget(make_backend: Any, clock: FakeClock) -> None:
    backend = make_backend(resultstore_retry_budget=5)
    op = outage(clock, 30.0, down())
    with pytest.raises(StoreConnectionError):
        backend._ensure_retryable(op)
    assert op.calls[-1] - op.calls[0] == pytest.approx(5.0)
    no_retry = make_backend(resultstore_retry_budget=0)
    op = outage(clock, 30.0, down())
    with pytest.raises(StoreConnectionError):
        no_retry._ensure_retryable(op)
    assert len(op.calls) == 1


def test_celery_settings_still_apply(make_backend: Any, clock: FakeClock) -> None:
    capped = make_backend(result_backend_max_retries=3,
                          result_backend_max_sleep_between_retries_ms=100)
    op = outage(clock, 60.0, down())
    with pytest.raises(StoreConnectionError):
        capped._ensure_retryable(op)
    assert len(op.calls) == 4 and max(clock.sleeps) <= 0.1
    off = make_backend(result_backend_always_retry=False)
    op = outage(clock, 60.0, down())
    with pytest.raises(StoreConnectionError):
        off._ensure_retryable(op)
    assert len(op.calls) == 1


def test_permanent_errors_are_not_retried(make_backend: Any, clock: FakeClock) -> None:
    backend = make_backend()
    wrong_password = StoreConnectionError("password authentication failed", path="url",
                                          key="password", transient=False)
    for exc in (wrong_password, ValueError("a bug")):
        op = outage(clock, 60.0, exc)
        with pytest.raises(type(exc)):
            backend._ensure_retryable(op)
        assert len(op.calls) == 1


def test_retry_logs_never_show_the_password(tmp_path: Path, clock: FakeClock,
                                            caplog: pytest.LogCaptureFixture) -> None:
    reset_registry()
    try:
        app = Celery("retry", backend=f"resultstore+postgresql://u:{SECRET}@127.0.0.1:1/db",
                     set_as_current=False)
        backend = app.backend
        backend._sleep = clock.sleep
        leaky = psycopg.OperationalError(f"server said: password {SECRET} rejected")
        op = outage(clock, 1.0, leaky)
        with caplog.at_level(logging.WARNING, logger="resultstore_backend.backend"):
            assert backend._ensure_retryable(op) == "stored"
        assert "retry budget left" in caplog.text
        assert SECRET not in caplog.text and "***" in caplog.text
    finally:
        reset_registry()


@pytest.mark.parametrize("value", ["soon", -1, float("nan")])
def test_bad_budget_setting_is_improperly_configured(tmp_path: Path, value: Any) -> None:
    reset_registry()
    app = Celery("retry", backend=f"resultstore+sqlite:///{tmp_path}/r.db",
                 set_as_current=False)
    app.conf.resultstore_retry_budget = value
    with pytest.raises(ImproperlyConfigured, match="resultstore_retry_budget"):
        app.backend  # noqa: B018 - constructing the backend reads the setting
    reset_registry()
