"""Not tests: the Celery app the operator e2e tests run as a worker (and as a client).

Like a real worker image it takes the result backend from CELERY_RESULT_BACKEND (the
`resultstore:///<dir>` URL of the mounted Secret) and the broker from CELERY_BROKER_URL; the
config directory is re-read every half second so reloads show up quickly in tests.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("operator_e2e")
app.conf.update(
    broker_url=os.environ.get("CELERY_BROKER_URL"),
    result_backend=os.environ.get("CELERY_RESULT_BACKEND"),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    resultstore_reload_interval=0.5,
    task_default_queue=os.environ.get("RS_QUEUE", "celery"),
)


@app.task(name="operator_e2e.mul")
def mul(x: int, y: int) -> int:
    return x * y
