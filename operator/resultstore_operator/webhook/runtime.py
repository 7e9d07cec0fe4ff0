"""The webhook's life in the operator process: start-up, periodic resync, shutdown, and the
service main.py runs on every replica (`WebhookService`).

Start-up order matters: certificates, then the listening server, then the configuration, so
the API server is never pointed at a CA or port that is not yet serving. Start-up retries
with backoff rather than failing the operator: the webhook fails open, so the ResultStore
controllers keep working while, say, the TLS Secret cannot be written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from ..injection import StoreLookup, StoreState
from ..kube import Kube, KubeError, new_api_client
from ..settings import WebhookSettings
from ..webhook_tls import (
    TlsBundle,
    ca_bundle_b64,
    ensure_tls_secret,
    read_bundle_files,
    write_bundle_files,
)
from .admission import store_lookup_from_object
from .configuration import apply_configuration, configuration_for, serving_names
from .server import InjectionServer, server_ssl_context

log = logging.getLogger("resultstore.webhook")

#: Resync interval while the configuration could not be applied (RBAC, API down).
RETRY_APPLY_SECONDS = 15.0
MAX_START_BACKOFF = 60.0


class WebhookRuntime:
    """Owns the server, the certificates and the configuration for the process lifetime."""

    def __init__(self, settings: WebhookSettings, kube: Kube) -> None:
        self.settings = settings
        self.kube = kube
        self.server = InjectionServer(settings, self._lookup, self._emit, self._update)
        self.serving = False
        self._context: ssl.SSLContext | None = None
        self._bundle: TlsBundle | None = None
        self._cert_paths: tuple[str, str] | None = None
        self._external_mtimes: tuple[float, ...] = ()
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._config_ok = False

    def _read_store(self, namespace: str, name: str) -> StoreLookup:
        try:
            obj = self.kube.read_store(namespace, name, timeout=self.settings.lookup_timeout)
        except KubeError as exc:
            return StoreLookup(StoreState.UNKNOWN, f"API answered {exc.status}")
        return store_lookup_from_object(obj)

    async def _lookup(self, namespace: str, name: str) -> StoreLookup:
        return await asyncio.to_thread(self._read_store, namespace, name)

    async def _emit(self, body: Mapping[str, Any]) -> None:
        await asyncio.to_thread(self.kube.create_event, body)

    async def _update(self, namespace: str, name: str, count: int, last: str,
                      message: str) -> None:
        """Fold repeats into the aggregate Event (merge patch of count/lastTimestamp)."""
        await asyncio.to_thread(self.kube.patch_event, namespace, name,
                                {"count": count, "lastTimestamp": last, "message": message})

    def _external_mtime(self) -> tuple[float, ...]:
        files = [f for f in (self.settings.cert_file, self.settings.key_file,
                             self.settings.ca_file) if f]
        return tuple(os.stat(f).st_mtime for f in files)

    async def _kept_bundle(self) -> tuple[TlsBundle, tuple[str, str]] | None:
        """The self-signed bundle from its Secret, written to files (None: unchanged)."""
        s = self.settings
        bundle = await asyncio.to_thread(
            ensure_tls_secret, self.kube, s.operator_namespace, s.tls_secret, serving_names(s))
        if self._bundle == bundle:
            return None
        directory = s.cert_dir
        if directory is None:
            if self._tmpdir is None:
                self._tmpdir = tempfile.TemporaryDirectory(prefix="resultstore-webhook-")
            directory = self._tmpdir.name
        return bundle, write_bundle_files(bundle, directory)

    def _external_bundle(self) -> tuple[TlsBundle, tuple[str, str]] | None:
        """The mounted bundle (cert-manager), when its files changed (None: unchanged)."""
        s = self.settings
        assert s.cert_file is not None and s.key_file is not None
        mtimes = self._external_mtime()
        if self._bundle is not None and mtimes == self._external_mtimes:
            return None
        bundle = read_bundle_files(s.cert_file, s.key_file, s.ca_file)
        self._external_mtimes = mtimes
        return bundle, (s.cert_file, s.key_file)

    async def _load_certificates(self) -> bool:
        """(Re)load the serving pair; True when it changed since the last load."""
        loaded = (self._external_bundle() if self.settings.external_certs
                  else await self._kept_bundle())
        if loaded is None:
            return False
        bundle, paths = loaded
        if self._context is None:
            self._context = server_ssl_context(*paths, self.settings.client_ca_file)
        else:
            self._context.load_cert_chain(*paths)  # new handshakes use the new pair
        self._bundle = bundle
        self._cert_paths = paths
        return True

    async def _apply_configuration(self) -> None:
        if not self.settings.manage_config or self._bundle is None:
            return
        body = configuration_for(self.settings, ca_bundle_b64(self._bundle))
        changed = await asyncio.to_thread(apply_configuration, self.kube, body)
        if changed:
            log.info("MutatingWebhookConfiguration %s applied", self.settings.config_name)

    async def start(self) -> None:
        await self._load_certificates()
        assert self._context is not None
        await self.server.start(self._context)
        self.serving = True
        await self._try_apply_configuration()

    async def _try_apply_configuration(self) -> None:
        """Apply the configuration; a failure (RBAC, API down) is logged and retried soon.

        Serving must not depend on it: an installer may own the configuration, and an
        existing one with the same CA keeps working while we cannot write it.
        """
        try:
            await self._apply_configuration()
            self._config_ok = True
        except Exception as exc:
            self._config_ok = False
            log.error("could not apply MutatingWebhookConfiguration %s (%s: %s); retrying",
                      self.settings.config_name, type(exc).__name__, exc)

    async def resync_forever(self) -> None:
        """Renew certificates and correct configuration drift, forever."""
        while True:
            interval = self.settings.resync_interval
            await asyncio.sleep(interval if self._config_ok
                                else min(interval, RETRY_APPLY_SECONDS))
            try:
                await self._load_certificates()
            except Exception as exc:
                log.warning("webhook certificate resync failed: %s", exc)
            await self._try_apply_configuration()

    async def stop(self) -> None:
        await self.server.stop()
        self.serving = False
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


async def run_webhook(settings: WebhookSettings,
                      kube_factory: Callable[[], Kube] | None = None,
                      started: Callable[[WebhookRuntime], None] | None = None) -> None:
    """Start the webhook (retrying with backoff until it serves), then resync until cancelled."""
    factory = kube_factory or (lambda: Kube(new_api_client()))
    delay = 1.0
    runtime: WebhookRuntime | None = None
    try:
        while True:
            try:
                runtime = WebhookRuntime(settings, factory())
                await runtime.start()
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("webhook failed to start (%s: %s); retrying in %.0fs",
                          type(exc).__name__, exc, delay)
                if runtime is not None:
                    await runtime.stop()
                    runtime = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_START_BACKOFF)
        if started is not None:
            started(runtime)
        await runtime.resync_forever()
    finally:
        if runtime is not None:
            with contextlib.suppress(Exception):
                await runtime.stop()


class WebhookService:
    """The webhook as one service of the process, on every replica (leader or not).

    The webhook is read-only (it reads the store and its Secret), so every replica serves it
    behind the Service: a failover or a rollout never leaves admission without a server.
    `state` feeds the readiness probe (health.py): "serving" once the server listens.
    """

    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings
        self.runtime: WebhookRuntime | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def state(self) -> str:
        if not self.settings.enabled:
            return "disabled"
        if self.task is None:
            return "stopped"
        return "serving" if self.runtime is not None and self.runtime.serving else "starting"

    @property
    def ready(self) -> bool:
        return self.state in ("disabled", "serving")

    def start(self) -> None:
        if not self.settings.enabled:
            log.info("pod-injection webhook disabled")
            return

        def started(runtime: WebhookRuntime) -> None:
            self.runtime = runtime

        self.task = asyncio.get_running_loop().create_task(
            run_webhook(self.settings, started=started), name="resultstore-webhook")

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.runtime = None
