"""Shortcuts on the store/get hot path keep Celery's observable behaviour.

SQLite-backed (no services): what is proved here is behaviour, not speed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from celery import Celery, states


def _app(tmp_path: Path, **conf: object) -> Celery:
    app = Celery("hotpath", backend=f"resultstore+sqlite:///{tmp_path}/h.db",
                 set_as_current=False)
    app.conf.update(result_serializer="json", accept_content=["json"], **conf)
    return app


def test_eager_mode_warning_still_raised_on_reads(tmp_path: Path) -> None:
    app = _app(tmp_path, task_always_eager=True)
    backend = app.backend
    backend.store_result("e1", {"v": 1}, states.SUCCESS)
    for _ in range(2):  # the setting is read once; the warning is given on every read
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            meta = backend.get_task_meta("e1", cache=False)
        assert meta["result"] == {"v": 1}
        assert any(issubclass(w.category, RuntimeWarning) and "task_always_eager" in
                   str(w.message) for w in seen), f"no eager warning: {seen!r}"


def test_no_eager_warning_when_results_are_stored(tmp_path: Path) -> None:
    for conf in ({}, {"task_always_eager": True, "task_store_eager_result": True}):
        app = _app(tmp_path, **conf)
        backend = app.backend
        backend.store_result("e2", 2, states.SUCCESS)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert backend.get_task_meta("e2", cache=False)["result"] == 2
        eager = [w for w in seen if "task_always_eager" in str(w.message)]
        assert eager == [], f"unexpected eager warning with {conf}: {eager!r}"
