"""Not a test: a recording reverse proxy in front of the Kubernetes API server.

Why: "the operator never reads the data of a Secret that did not opt in" is a statement about
what the API server *sent*, and the local control plane keeps no audit log. The operator is
given a kubeconfig pointing at this proxy (plain HTTP on 127.0.0.1), which forwards every
request to the real API server with the test's admin credentials, streams the answer back
(watches included), and records method, path and Accept header of each request.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from kubernetes import client, config

from resultstore_devtools.procs import free_port

_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive",
        "authorization", "accept-encoding"}


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    accept: str


class RecordingApiProxy:
    def __init__(self, kubeconfig: Path) -> None:
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
        self.upstream = cfg.host.rstrip("/")
        self.ssl = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        if not cfg.verify_ssl:
            self.ssl.check_hostname = False
            self.ssl.verify_mode = ssl.CERT_NONE
        if cfg.cert_file:
            self.ssl.load_cert_chain(cfg.cert_file, cfg.key_file)
        token = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get(
            "BearerToken")
        self.authorization = token if token else None
        self.port = free_port()
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    # --- the proxy -------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.requests.append(Recorded(request.method, request.path_qs,
                                          request.headers.get("Accept", "")))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        if self.authorization:
            headers["Authorization"] = self.authorization
        body = await request.read()
        assert self._session is not None
        async with self._session.request(
                request.method, self.upstream + request.path_qs, headers=headers,
                data=body or None, ssl=self.ssl,
                # The kubernetes client may send a body without Content-Type (the API server
                # reads JSON then); aiohttp would otherwise add application/octet-stream.
                skip_auto_headers=("Content-Type",),
                timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items()
                if k.lower() not in _HOP | {"content-encoding"}})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=True)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        # Streams still open (watches) end here, before the loop goes away.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def start(self) -> RecordingApiProxy:
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(self._start())
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name="api-recorder")
        self._thread.start()
        if not started.wait(10):
            raise AssertionError("the recording API proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    # --- for the tests ---------------------------------------------------------------------

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig for the operator: the proxy, no credentials of its own."""
        doc: dict[str, Any] = {
            "apiVersion": "v1", "kind": "Config", "current-context": "recorded",
            "clusters": [{"name": "recorded",
                          "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "recorded", "user": {}}],
            "contexts": [{"name": "recorded",
                          "context": {"cluster": "recorded", "user": "recorded"}}],
        }
        path.write_text(yaml.safe_dump(doc))
        return path

    def seen(self) -> list[Recorded]:
        with self._lock:
            return list(self.requests)
