"""The HTTPS admission endpoint on loopback, with a real TLS handshake against our own CA.

The ResultStore lookup and the Event sink are plain functions here (this is a unit test of
the server's contract: always allowed, patch only when Ready, warnings and de-duplicated
Events otherwise, excluded namespaces untouched); tests/e2e drives it through an API server.
"""

from __future__ import annotations

import asyncio
import base64
import copy
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
from resultstore_operator.kube import Forbidden, Kube
from resultstore_operator.webhook import (
    WEBHOOK_PATH,
    InjectionServer,
    WebhookRuntime,
    WebhookSettings,
    server_ssl_context,
)
from resultstore_operator.webhook_tls import (
    ServingNames,
    TlsBundle,
    ca_bundle_b64,
    new_bundle,
    write_bundle_files,
)


def review_uid(uid: str) -> str:
    """A UUID (the API server's request uids are UUIDs) ending in `uid`'s digits."""
    return f"00000000-0000-4000-8000-{int(uid):012d}"


def review(namespace: str, labels: dict[str, str] | None, uid: str = "1",
           dry_run: bool = False) -> dict[str, Any]:
    """An AdmissionReview shaped exactly like the API server's."""
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": review_uid(uid), "namespace": namespace, "operation": "CREATE",
        "dryRun": dry_run,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "object": {"metadata": {"generateName": "w-", "labels": labels or {}},
                   "spec": {"containers": [{"name": "c", "image": "i"}]}}}}


def run_scenario(tmp_path: Path, states: Mapping[str, StoreState],
                 requests: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    bundle = new_bundle(ServingNames(ips=("127.0.0.1",)))
    cert, key = write_bundle_files(bundle, str(tmp_path))
    port = free_port()
    settings = WebhookSettings(operator_namespace="ops", listen_host="127.0.0.1",
                               listen_port=port, url=f"https://127.0.0.1:{port}{WEBHOOK_PATH}",
                               lookup_timeout=0.3, event_dedup_seconds=0)
    events: list[Any] = []

    async def lookup(namespace: str, name: str) -> StoreLookup:
        if name == "slow":
            await asyncio.sleep(10)
        return StoreLookup(states.get(name, StoreState.MISSING))

    async def emit(body: Mapping[str, Any]) -> None:
        events.append(body)

    async def update(namespace: str, name: str, count: int, last: str, message: str) -> None:
        for e in events:
            if e["metadata"]["name"] == name:
                e["count"] = count

    async def main() -> list[dict[str, Any]]:
        server = InjectionServer(settings, lookup, emit, update)
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
    assert [r["uid"] for r in responses] == [review_uid(str(i)) for i in range(1, 9)]
    patch = json.loads(base64.b64decode(responses[0]["patch"]))
    assert {op["path"] for op in patch} >= {"/spec/volumes", "/spec/containers/0/env"}
    for r in responses[1:4]:
        assert "patch" not in r and "warnings" not in r
    assert "not Ready" in responses[4]["warnings"][0]
    assert "not found" in responses[6]["warnings"][0]
    assert "timed out" in responses[7]["warnings"][0]
    # Events only about a store that exists (a timed-out lookup proves nothing), on the
    # store itself, and the two NotReady admissions aggregated into one Event, count 2.
    assert [(e["reason"], e["count"]) for e in events] == [("ResultStoreNotReady", 2)]
    assert events[0]["metadata"]["namespace"] == "team"
    assert events[0]["involvedObject"] == {"apiVersion": "resultstore.dev/v1alpha1",
                                           "kind": "ResultStore", "name": "pending",
                                           "namespace": "team"}


class MemoryKube:
    """The Kube calls of the webhook runtime, in memory, only in this lifecycle unit test
    (tests/e2e/test_webhook.py runs the runtime against a real API server): one TLS Secret,
    the MutatingWebhookConfiguration writes recorded, Forbidden until `fail_apply` is off."""

    def __init__(self) -> None:
        self.stored: dict[str, Any] | None = None
        self.applied: list[Mapping[str, Any]] = []
        self.fail_apply = True
        self._configuration: dict[str, Any] | None = None

    @property
    def secret(self) -> TlsBundle | None:
        return TlsBundle.from_secret_data(self.stored["data"]) if self.stored else None

    def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.stored)

    def create_secret(self, namespace: str, body: Mapping[str, Any]) -> None:
        self.stored = copy.deepcopy(dict(body))

    def replace_secret(self, namespace: str, name: str, body: Mapping[str, Any]) -> None:
        self.stored = copy.deepcopy(dict(body))

    def read_webhook_configuration(self, name: str) -> dict[str, Any] | None:
        if self.fail_apply:
            raise Forbidden("read MutatingWebhookConfiguration: API answered 403", 403)
        return copy.deepcopy(self._configuration)

    def create_webhook_configuration(self, body: Mapping[str, Any]) -> None:
        self._configuration = {**copy.deepcopy(dict(body)),
                               "metadata": {**body["metadata"], "resourceVersion": "1"}}
        self.applied.append(body)

    def patch_webhook_configuration(self, name: str, patch: Mapping[str, Any]) -> None:
        assert self._configuration is not None
        self._configuration["webhooks"] = copy.deepcopy(patch["webhooks"])
        self.applied.append(copy.deepcopy(self._configuration))


def test_runtime_serves_without_configuration_and_keeps_ca(tmp_path: Path) -> None:
    port = free_port()
    settings = WebhookSettings(operator_namespace="ops", listen_host="127.0.0.1",
                               listen_port=port, url=f"https://127.0.0.1:{port}{WEBHOOK_PATH}",
                               cert_dir=str(tmp_path))
    gateway = MemoryKube()

    async def main() -> bool:
        first = WebhookRuntime(settings, cast(Kube, gateway))
        await first.start()
        try:
            assert first.serving and port_open(port, "127.0.0.1")  # apply failed, still serving
            gateway.fail_apply = False
            await first._try_apply_configuration()
        finally:
            await first.stop()
        second = WebhookRuntime(settings, cast(Kube, gateway))
        await second.start()  # a restart: the CA comes back from the kept Secret
        await second.stop()
        return second._config_ok

    assert asyncio.run(main()), "the restarted runtime could not check the configuration"
    assert gateway.secret is not None
    bundles = [b["webhooks"][0]["clientConfig"]["caBundle"] for b in gateway.applied]
    # One write: the restart found the registered caBundle still the kept CA's.
    assert bundles == [ca_bundle_b64(gateway.secret)]


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
    gateway = MemoryKube()
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
        runtime = WebhookRuntime(settings, cast(Kube, gateway))
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


# --- issue 14: forged reviews, aggregated Events, mutual TLS ------------------------------------

def forged(mutate: Any, store: str = "pending", namespace: str = "victim") -> dict[str, Any]:
    body = review(namespace, {INJECT_LABEL: store}, "77")
    mutate(body)
    return body


FORGERIES = {
    "v1beta1": lambda b: b.update(apiVersion="admission.k8s.io/v1beta1"),
    "no-uuid": lambda b: b["request"].update(uid="not-a-uuid"),
    "not-pods": lambda b: b["request"].update(resource={"group": "", "version": "v1",
                                                        "resource": "secrets"}),
    "no-resource": lambda b: b["request"].pop("resource"),
    "update": lambda b: b["request"].update(operation="UPDATE"),
    "subresource": lambda b: b["request"].update(subResource="status"),
    "no-namespace": lambda b: b["request"].pop("namespace"),
    "other-namespace": lambda b: b["request"]["object"]["metadata"].update(namespace="other"),
    "no-user": lambda b: b["request"].pop("userInfo"),
}


def test_review_problem_names_what_the_api_server_would_never_send() -> None:
    from resultstore_operator.webhook import AdmissionRequest, review_problem

    assert review_problem(review("team", {INJECT_LABEL: "x"})) is None
    for name, mutate in FORGERIES.items():
        problem = review_problem(forged(mutate))
        assert problem, f"{name} accepted as genuine"
        assert AdmissionRequest.from_review(forged(mutate)).problem == problem


def test_forged_reviews_are_answered_unchanged_and_post_no_event(tmp_path: Path) -> None:
    """Every forgery is allowed (the webhook never refuses), gets no patch even for a Ready
    store, and produces no Event; then 301 well-shaped reviews about a missing store produce
    none, and 301 about an existing not-Ready store produce exactly one Event (count 301)."""
    states = {"ready": StoreState.READY, "pending": StoreState.NOT_READY}
    requests = [forged(m, store) for m in FORGERIES.values() for store in ("ready", "pending")]
    requests += [review("victim", {INJECT_LABEL: "ghost"}, str(i)) for i in range(301)]
    requests += [review("victim", {INJECT_LABEL: "pending"}, str(i)) for i in range(301)]
    responses, events = run_scenario(tmp_path, states, requests)
    assert all(r["allowed"] is True for r in responses)
    assert not [r for r in responses[:2 * len(FORGERIES)] if "patch" in r or "warnings" in r]
    assert [(e["reason"], e["count"], e["involvedObject"]["name"]) for e in events] == [
        ("ResultStoreNotReady", 301, "pending")], events


def test_aggregator_is_bounded_and_writes_at_most_once_per_window() -> None:
    from resultstore_operator.webhook import EventAggregator

    created: list[dict[str, Any]] = []
    updates: list[int] = []

    async def create(body: Mapping[str, Any]) -> None:
        created.append(dict(body))

    async def update(namespace: str, name: str, count: int, last: str, message: str) -> None:
        updates.append(count)

    async def main() -> EventAggregator:
        agg = EventAggregator(create, update, window=3600, max_keys=3, instance="op-0")
        for i in range(50):
            agg.record("ns", "s", "R", f"occurrence {i}")
        for store in ("a", "b", "c", "d"):
            agg.record("ns", store, "R", "m")
        await asyncio.sleep(0.05)
        await agg.stop()
        return agg

    agg = asyncio.run(main())
    assert len(agg) == 3  # the least recently seen key ("s") was dropped
    assert agg.count(("ns", "s", "R")) == 0 and agg.count(("ns", "d", "R")) == 1
    # One create per key, carrying every occurrence recorded before it went out.
    assert [(e["involvedObject"]["name"], e["count"]) for e in created] == [
        ("s", 50), ("a", 1), ("b", 1), ("c", 1), ("d", 1)]
    assert updates == []

    # After the create, repeats within a window are folded into one count update.
    created.clear()

    async def later() -> None:
        agg = EventAggregator(create, update, window=0.2, instance="op-0")
        agg.record("ns", "s", "R", "m")
        await asyncio.sleep(0.05)  # the create went out
        for _ in range(99):
            agg.record("ns", "s", "R", "m")
        await asyncio.sleep(0.4)
        await agg.stop()

    asyncio.run(later())
    assert [e["count"] for e in created] == [1]
    assert updates == [100]


def test_mutual_tls_refuses_callers_without_a_client_certificate(tmp_path: Path) -> None:
    """RESULTSTORE_WEBHOOK_CLIENT_CA_FILE: only a caller with a certificate from that CA
    (the API server, configured to present one) completes the handshake."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from resultstore_operator.webhook_tls import generate_ca

    bundle = new_bundle(ServingNames(ips=("127.0.0.1",)))
    cert, key = write_bundle_files(bundle, str(tmp_path))
    client_ca, client_ca_key = generate_ca("apiserver-client-ca")
    (tmp_path / "client-ca.crt").write_bytes(client_ca)
    ca_cert = x509.load_pem_x509_certificate(client_ca)
    ca_key = serialization.load_pem_private_key(client_ca_key, None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                        "kube-apiserver")]))
            .issuer_name(ca_cert.subject).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "client.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "client.key").write_bytes(leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    port = free_port()
    settings = WebhookSettings(operator_namespace="ops", listen_host="127.0.0.1",
                               listen_port=port, url=f"https://127.0.0.1:{port}{WEBHOOK_PATH}",
                               client_ca_file=str(tmp_path / "client-ca.crt"))
    events: list[Any] = []

    async def lookup(namespace: str, name: str) -> StoreLookup:
        return StoreLookup(StoreState.NOT_READY)

    async def emit(body: Mapping[str, Any]) -> None:
        events.append(body)

    async def post(ctx: ssl.SSLContext) -> int | str:
        try:
            async with aiohttp.ClientSession() as session, session.post(
                    settings.url or "", json=review("team", {INJECT_LABEL: "s"}),
                    ssl=ctx) as resp:
                return resp.status
        except aiohttp.ClientError as exc:
            return type(exc).__name__

    async def main() -> tuple[int | str, int | str]:
        server = InjectionServer(settings, lookup, emit)
        await server.start(server_ssl_context(cert, key, settings.client_ca_file))
        try:
            anonymous = ssl.create_default_context(cadata=bundle.ca_crt.decode())
            with_cert = ssl.create_default_context(cadata=bundle.ca_crt.decode())
            with_cert.load_cert_chain(str(tmp_path / "client.crt"), str(tmp_path / "client.key"))
            return await post(anonymous), await post(with_cert)
        finally:
            await server.stop()

    anonymous, authenticated = asyncio.run(main())
    assert anonymous != 200, "a caller without a client certificate was served"
    assert authenticated == 200
    assert WebhookSettings.from_env({"RESULTSTORE_WEBHOOK_CLIENT_CA_FILE": "/x/ca.crt"},
                                    "ops").client_ca_file == "/x/ca.crt"
