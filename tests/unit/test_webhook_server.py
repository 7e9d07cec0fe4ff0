"""The HTTPS admission endpoint on loopback, with a real TLS handshake against our own CA.

The ResultStore lookup and the Event sink are plain functions here (this is a unit test of
the server's contract: always allowed, patch only when Ready, warnings and de-duplicated
Events otherwise, excluded namespaces untouched); tests/e2e drives it through an API server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import aiohttp

from resultstore_devtools.procs import free_port, port_open
from resultstore_operator.injection import INJECT_LABEL, StoreLookup, StoreState
from resultstore_operator.webhook import (
    WEBHOOK_PATH,
    InjectionServer,
    KubeGateway,
    WebhookRuntime,
    WebhookSettings,
    server_ssl_context,
)
from resultstore_operator.webhook_tls import (
    ServingNames,
    TlsBundle,
    ca_bundle_b64,
    new_bundle,
    reconcile_bundle,
    write_bundle_files,
)


def review(namespace: str, labels: dict[str, str] | None, uid: str = "uid-1",
           dry_run: bool = False) -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": uid, "namespace": namespace, "operation": "CREATE", "dryRun": dry_run,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "object": {"metadata": {"generateName": "w-", "labels": labels or {}},
                   "spec": {"containers": [{"name": "c", "image": "i"}]}}}}


def run_scenario(tmp_path: Path, states: Mapping[str, StoreState],
                 requests: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    bundle = new_bundle(ServingNames(ips=("127.0.0.1",)))
    cert, key = write_bundle_files(bundle, str(tmp_path))
    port = free_port()
    settings = WebhookSettings(operator_namespace="ops", listen_host="127.0.0.1",
                               listen_port=port, url=f"https://127.0.0.1:{port}{WEBHOOK_PATH}",
                               lookup_timeout=0.3)
    events: list[Any] = []

    async def lookup(namespace: str, name: str) -> StoreLookup:
        if name == "slow":
            await asyncio.sleep(10)
        return StoreLookup(states.get(name, StoreState.MISSING))

    async def emit(body: Mapping[str, Any]) -> None:
        events.append(body)

    async def main() -> list[dict[str, Any]]:
        server = InjectionServer(settings, lookup, emit)
        await server.start(server_ssl_context(cert, key))
        client_ctx = ssl.create_default_context(cadata=bundle.ca_crt.decode())
        out = []
        try:
            async with aiohttp.ClientSession() as session:
                for body in requests:
                    async with session.post(settings.url or "", json=body,
                                            ssl=client_ctx) as resp:
                        assert resp.status == 200
                        out.append((await resp.json())["response"])
                async with session.post(settings.url or "", data=b"{nonsense",
                                        ssl=client_ctx) as resp:
                    assert resp.status == 400
            await asyncio.sleep(0.05)  # let fire-and-forget Events land
        finally:
            await server.stop()
        return out

    return asyncio.run(main()), events


def test_server_contract(tmp_path: Path) -> None:
    label = {INJECT_LABEL: "orders"}
    responses, events = run_scenario(
        tmp_path,
        {"orders": StoreState.READY, "pending": StoreState.NOT_READY},
        [
            review("team", label, "1"),
            review("team", None, "2"),
            review("kube-system", label, "3"),
            review("ops", label, "4"),
            review("team", {INJECT_LABEL: "pending"}, "5"),
            review("team", {INJECT_LABEL: "pending"}, "6"),  # de-duplicated Event
            review("team", {INJECT_LABEL: "ghost"}, "7", dry_run=True),  # no Event on dry-run
            review("team", {INJECT_LABEL: "slow"}, "8"),
        ],
    )
    assert all(r["allowed"] is True for r in responses)
    assert [r["uid"] for r in responses] == list("12345678")
    patch = json.loads(base64.b64decode(responses[0]["patch"]))
    assert {op["path"] for op in patch} >= {"/spec/volumes", "/spec/containers/0/env"}
    for r in responses[1:4]:
        assert "patch" not in r and "warnings" not in r
    assert "not Ready" in responses[4]["warnings"][0]
    assert "not found" in responses[6]["warnings"][0]
    assert "timed out" in responses[7]["warnings"][0]
    reasons = [e["reason"] for e in events]
    assert reasons == ["ResultStoreNotReady", "ResultStoreUnknown"]
    assert all(e["metadata"]["namespace"] == "team" for e in events)


class RecordingGateway:
    """Stands in for the API only in this lifecycle unit test (e2e uses the real API)."""

    def __init__(self) -> None:
        self.secret: TlsBundle | None = None
        self.applied: list[Mapping[str, Any]] = []
        self.fail_apply = True

    def ensure_tls(self, namespace: str, name: str, names: ServingNames) -> TlsBundle:
        self.secret, _ = reconcile_bundle(self.secret, names)
        return self.secret

    def apply_configuration(self, body: Mapping[str, Any]) -> bool:
        if self.fail_apply:
            raise RuntimeError("forbidden")
        self.applied.append(body)
        return True


def test_runtime_serves_without_configuration_and_keeps_ca(tmp_path: Path) -> None:
    port = free_port()
    settings = WebhookSettings(operator_namespace="ops", listen_host="127.0.0.1",
                               listen_port=port, url=f"https://127.0.0.1:{port}{WEBHOOK_PATH}",
                               cert_dir=str(tmp_path))
    gateway = RecordingGateway()

    async def main() -> None:
        first = WebhookRuntime(settings, cast(KubeGateway, gateway))
        await first.start()
        try:
            assert first.serving and port_open(port, "127.0.0.1")  # apply failed, still serving
            gateway.fail_apply = False
            await first._try_apply_configuration()
        finally:
            await first.stop()
        second = WebhookRuntime(settings, cast(KubeGateway, gateway))
        await second.start()  # a restart: the CA comes back from the kept Secret
        await second.stop()

    asyncio.run(main())
    assert gateway.secret is not None
    bundles = [b["webhooks"][0]["clientConfig"]["caBundle"] for b in gateway.applied]
    assert bundles == [ca_bundle_b64(gateway.secret)] * 2


def test_external_certificates_are_reloaded_when_files_change(tmp_path: Path) -> None:
    """cert-manager mode: files are mounted, rotated in place, and picked up without restart."""
    port = free_port()
    names = ServingNames(ips=("127.0.0.1",))
    first, second = new_bundle(names), new_bundle(names)

    def publish(bundle: TlsBundle) -> None:
        write_bundle_files(bundle, str(tmp_path))
        (tmp_path / "ca.crt").write_bytes(bundle.ca_crt)

    publish(first)
    settings = WebhookSettings(
        operator_namespace="ops", listen_host="127.0.0.1", listen_port=port,
        url=f"https://127.0.0.1:{port}{WEBHOOK_PATH}", cert_file=str(tmp_path / "tls.crt"),
        key_file=str(tmp_path / "tls.key"), ca_file=str(tmp_path / "ca.crt"))
    gateway = RecordingGateway()
    gateway.fail_apply = False

    async def handshake(ca: bytes) -> bool:
        ctx = ssl.create_default_context(cadata=ca.decode())
        try:
            async with aiohttp.ClientSession() as session, session.get(
                    f"https://127.0.0.1:{port}/healthz", ssl=ctx) as resp:
                return resp.status == 200
        except aiohttp.ClientConnectorCertificateError:
            return False

    async def main() -> None:
        runtime = WebhookRuntime(settings, cast(KubeGateway, gateway))
        await runtime.start()
        try:
            assert await handshake(first.ca_crt)
            assert not await runtime._load_certificates()  # unchanged files: nothing to do
            time.sleep(0.01)
            publish(second)
            os.utime(tmp_path / "tls.crt", (time.time() + 5, time.time() + 5))
            assert await runtime._load_certificates()
            await runtime._try_apply_configuration()
            assert await handshake(second.ca_crt)
            assert not await handshake(first.ca_crt)
        finally:
            await runtime.stop()

    asyncio.run(main())
    assert gateway.secret is None  # no Secret is written in external mode
    bundles = [b["webhooks"][0]["clientConfig"]["caBundle"] for b in gateway.applied]
    assert bundles == [ca_bundle_b64(first), ca_bundle_b64(second)]
