"""The Celery app every benchmark process builds, and the module a real worker runs.

Jobs, the chord client and the real worker (`celery -A bench.celeryapp worker`, which reads
the spec from BENCH_APP_SPEC once at import) all build the app here, so the same
configuration and task names are used on both sides of the broker.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from bench.backends import AppSpec

APP_SPEC_ENV = "BENCH_APP_SPEC"
NOOP = "bench.noop"
CALLBACK = "bench.chord_callback"


def build_app(spec: AppSpec) -> Celery:
    """Defaults everywhere except what a JSON-only deployment sets; no backend tuning."""
    app = Celery("bench", broker=spec.broker_url, backend=spec.result_backend,
                 set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=spec.queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )

    # shared=False: several apps are built in one process (seeding, measuring); shared tasks
    # would be attached to every app at finalize and warn about duplicate names.
    @app.task(name=NOOP, shared=False)
    def noop(i: int) -> int:
        return i

    @app.task(name=CALLBACK, shared=False)
    def chord_callback(results: list[Any]) -> dict[str, float]:
        # First statement: "the callback task starting" is what the chord metric measures.
        started = time.time()
        return {"started": started, "n": float(len(results))}

    return app


def _app_from_env() -> Celery | None:
    text = os.environ.get(APP_SPEC_ENV)
    return build_app(AppSpec.from_json(text)) if text else None


app = _app_from_env()
