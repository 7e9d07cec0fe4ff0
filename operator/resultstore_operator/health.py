"""The probes of every replica: `/healthz` (liveness) and `/readyz` (readiness).

Why our own endpoint rather than Kopf's `--liveness`: Kopf runs only on the replica that
holds the Lease (docs/ARCHITECTURE.md, "Leadership"), but every replica serves the webhook
and must be probed. Liveness means "the event loop answers" (a request is served by the loop
itself, so a wedged loop fails it and the kubelet restarts the container); it never depends
on the API server or on leadership, or a partition would restart every replica at once.
Readiness means "the webhook serves" (or is disabled): only then does the Service send
admission requests to this replica.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .httpserver import AppServer

log = logging.getLogger("resultstore.health")

LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"


class HealthServer:
    """`status()` returns the body's fields; `ready()` decides readiness."""

    def __init__(self, host: str, port: int, status: Callable[[], dict[str, Any]],
                 ready: Callable[[], bool]) -> None:
        self.host = host
        self.port = port
        self.status = status
        self.ready = ready
        self._server = AppServer()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(LIVENESS_PATH, self.handle_liveness)
        app.router.add_get(READINESS_PATH, self.handle_readiness)
        return app

    def _body(self, **extra: Any) -> str:
        return json.dumps({**self.status(), **extra}, sort_keys=True)

    async def handle_liveness(self, request: web.Request) -> web.Response:
        return web.Response(text=self._body(loop="alive"), content_type="application/json")

    async def handle_readiness(self, request: web.Request) -> web.Response:
        ready = self.ready()
        return web.Response(status=200 if ready else 503, text=self._body(ready=ready),
                            content_type="application/json")

    async def start(self) -> None:
        await self._server.start(self.app(), self.host, self.port)
        log.info("health serving on http://%s:%d (%s, %s)", self.host, self.port,
                 LIVENESS_PATH, READINESS_PATH)

    async def stop(self) -> None:
        await self._server.stop()
