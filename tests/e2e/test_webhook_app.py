"""Not tests: the Celery app the e2e worker pods run (``celery -A tests.e2e.test_webhook_app``).

It configures nothing about result storage on purpose: the result backend comes only from the
``CELERY_RESULT_BACKEND`` variable the injection webhook put into the pod, and the broker from
``CELERY_BROKER_URL`` in the pod's own env, exactly as a real worker image would.
"""

from __future__ import annotations

from celery import Celery

app = Celery("webhook_e2e")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="e2e.add")
def add(x: int, y: int) -> int:
    return x + y
