"""The operator's Prometheus metrics: outcome classification, the store gauges read from
status, the exposition of a private registry, the HTTP endpoint on loopback, the settings and
the chart wiring, and the call sites in the controller and the webhook.

tests/e2e/test_operator_metrics.py scrapes a real operator process against the control plane.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest
from prometheus_client.parser import text_string_to_metric_families

from resultstore_devtools.procs import free_port
from resultstore_operator import metrics as m
from resultstore_operator.database import DatabaseError
from resultstore_operator.handlers import Controller, ObjectState, StoreError
from resultstore_operator.injection import INJECT_LABEL, StoreState
from resultstore_operator.kube import KubeError
from resultstore_operator.main import build_settings, parse_args
from resultstore_operator.settings import OperatorSettings, SettingsError, parse_listen_address
from resultstore_operator.spec import SpecError
from tests.unit.test_chart import render
from tests.unit.test_manifests import container, env_values, find
from tests.unit.test_webhook_server import review, run_scenario

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition as {(name, sorted labels): value}."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def scrape(metrics: m.OperatorMetrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain"), content_type
    return samples(body.decode())


def store(name: str, namespace: str = "team", ready: str | None = "True",
          phase: str | None = "Stable", cleanup: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    status: dict[str, Any] = {"credentials": {"phase": phase} if phase else {}}
    if ready is not None:
        status["conditions"] = [{"type": "SchemaReady", "status": "True"},
                                {"type": "Ready", "status": ready}]
    if cleanup is not None:
        status["lastCleanup"] = cleanup
    return {"metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"},
            "status": status}


# --- classification ----------------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "outcome", "reason"), [
    (None, m.SUCCESS, None),
    (SpecError("spec.database.name must be at most 63 bytes"), m.PERMANENT_ERROR,
     "InvalidSpec"),
    (kopf.PermanentError("invalid spec"), m.PERMANENT_ERROR, "Unexpected"),
    (StoreError("AdminSecretMissing", "admin Secret 'x' not found"), m.TEMPORARY_ERROR,
     "AdminSecretMissing"),
    (DatabaseError("DatabaseUnreachable", "connection refused"), m.TEMPORARY_ERROR,
     "DatabaseUnreachable"),
    (KubeError("forbidden", status=403, transient=False), m.TEMPORARY_ERROR,
     "KubernetesError"),
    (RuntimeError("bug"), m.TEMPORARY_ERROR, "Unexpected"),
    (kopf.TemporaryError("later"), m.TEMPORARY_ERROR, "Unexpected"),
], ids=["ok", "spec", "kopf-permanent", "store", "database", "kube", "bug", "kopf-temporary"])
def test_outcome_classification(exc: BaseException | None, outcome: str,
                                reason: str | None) -> None:
    assert m.classify(exc) == outcome
    if exc is not None:
        assert m.error_reason(exc) == reason


def test_error_reason_never_carries_free_text() -> None:
    """A reason attribute that is not an identifier (a message by mistake) is not a label."""
    exc = StoreError("password=hunter2 rejected", "x")
    assert m.error_reason(exc) == "Unexpected"


# --- the exposition ----------------------------------------------------------------------------


def test_reconcile_counters_and_histogram_render() -> None:
    metrics = m.OperatorMetrics()
    before = scrape(metrics)
    # every handler x outcome series exists at zero before anything happened
    for handler in m.HANDLERS:
        for outcome in m.OUTCOMES:
            got = value(before, "resultstore_reconciliations_total", handler=handler,
                        outcome=outcome)
            assert got == 0.0, f"series {handler}/{outcome} missing or non-zero: {got}"
    assert value(before, "resultstore_webhook_admission_requests_total",
                 outcome="mutated") == 0.0

    assert metrics.record_reconcile("create", None, 0.3) == m.SUCCESS
    assert metrics.record_reconcile("timer", StoreError("AdminAuthFailed", "no"), 1.5) \
        == m.TEMPORARY_ERROR
    assert metrics.record_reconcile("create", SpecError("bad"), 0.01) == m.PERMANENT_ERROR
    metrics.rotations_started.labels("requested").inc()
    metrics.rotations_completed.inc()
    metrics.record_admission(m.MUTATED, 0.004)

    after = scrape(metrics)
    assert value(after, "resultstore_reconciliations_total", handler="create",
                 outcome="success") == 1.0
    assert value(after, "resultstore_reconciliations_total", handler="timer",
                 outcome="temporary_error") == 1.0
    assert value(after, "resultstore_reconciliations_total", handler="create",
                 outcome="permanent_error") == 1.0
    assert value(after, "resultstore_reconcile_errors_total", reason="AdminAuthFailed") == 1.0
    assert value(after, "resultstore_reconcile_errors_total", reason="InvalidSpec") == 1.0
    assert value(after, "resultstore_reconcile_duration_seconds_count", handler="timer",
                 outcome="temporary_error") == 1.0
    assert value(after, "resultstore_reconcile_duration_seconds_bucket", handler="timer",
                 outcome="temporary_error", le="1.0") == 0.0
    assert value(after, "resultstore_reconcile_duration_seconds_bucket", handler="timer",
                 outcome="temporary_error", le="2.5") == 1.0
    assert value(after, "resultstore_credential_rotations_started_total",
                 trigger="requested") == 1.0
    assert value(after, "resultstore_credential_rotations_completed_total") == 1.0
    assert value(after, "resultstore_webhook_admission_requests_total",
                 outcome="mutated") == 1.0
    assert value(after, "resultstore_webhook_admission_duration_seconds_count",
                 outcome="mutated") == 1.0


def test_private_registry_has_only_our_metrics() -> None:
    """No process_/python_ collectors of the global registry, every name prefixed."""
    metrics = m.OperatorMetrics()
    metrics.stores.observe(m.snapshot_of(store("a")))
    names = {family.name for family in text_string_to_metric_families(
        metrics.render()[0].decode())}
    strange = sorted(n for n in names if not n.startswith("resultstore_"))
    assert not strange, f"metrics without the resultstore_ prefix: {strange}"
    assert "resultstore_stores" in names


def test_openmetrics_is_served_when_asked_for() -> None:
    metrics = m.OperatorMetrics()
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text"), content_type
    assert body.rstrip().endswith(b"# EOF")


# --- store gauges from status ------------------------------------------------------------------


def test_snapshot_reads_ready_rotation_and_cleanup() -> None:
    snap = m.snapshot_of(store("a", ready="False", phase="Draining", cleanup={
        "startedAt": "2024-05-01T10:00:00Z", "finishedAt": "2024-05-01T10:00:02Z",
        "succeeded": True, "deleted": 3}))
    assert (snap.namespace, snap.name, snap.ready, snap.rotating) == ("team", "a", "False", True)
    assert snap.cleanup_succeeded is True
    assert snap.cleanup_finished == 1714557602.0
    fresh = m.snapshot_of({"metadata": {"name": "b", "namespace": "team"}})
    assert (fresh.ready, fresh.rotating, fresh.cleanup_succeeded) == ("Unknown", False, None)
    odd = m.snapshot_of(store("c", ready="Maybe", phase="Rotating"))
    assert (odd.ready, odd.rotating) == ("Unknown", True)


def test_store_gauges_follow_watch_events() -> None:
    metrics = m.OperatorMetrics()
    ok = {"finishedAt": "2024-05-01T10:00:02Z", "succeeded": True}
    failed = {"finishedAt": "2024-05-01T11:00:00Z", "succeeded": False, "message": "boom"}
    for body in (store("a", cleanup=ok), store("b", ready="False", phase="Rotating"),
                 store("c", ready=None), store("d", namespace="other")):
        metrics.stores.observe(m.snapshot_of(body))
    got = scrape(metrics)
    for namespace, ready, count in (("team", "True", 1), ("team", "False", 1),
                                    ("team", "Unknown", 1), ("other", "True", 1),
                                    ("other", "False", 0)):
        assert value(got, "resultstore_stores", namespace=namespace, ready=ready) == count, (
            f"resultstore_stores{{namespace={namespace},ready={ready}}} should be {count}")
    assert value(got, "resultstore_store_ready", namespace="team", resultstore="a") == 1.0
    assert value(got, "resultstore_store_ready", namespace="team", resultstore="b") == 0.0
    assert value(got, "resultstore_credential_rotations_in_progress", namespace="team") == 1.0
    assert value(got, "resultstore_credential_rotations_in_progress", namespace="other") == 0.0
    assert value(got, "resultstore_cleanup_last_run_succeeded", namespace="team",
                 resultstore="a") == 1.0
    assert value(got, "resultstore_cleanup_last_success_timestamp_seconds",
                 namespace="team", resultstore="a") == 1714557602.0

    # a later failed run: the success timestamp stays, the last-run gauge drops to 0
    metrics.stores.observe(m.snapshot_of(store("a", cleanup=failed)))
    got = scrape(metrics)
    assert value(got, "resultstore_cleanup_last_run_succeeded", namespace="team",
                 resultstore="a") == 0.0
    assert value(got, "resultstore_cleanup_last_success_timestamp_seconds",
                 namespace="team", resultstore="a") == 1714557602.0

    # deletion removes every series of the store
    metrics.stores.forget("team", "a")
    got = scrape(metrics)
    assert value(got, "resultstore_store_ready", namespace="team", resultstore="a") is None
    assert value(got, "resultstore_cleanup_last_success_timestamp_seconds",
                 namespace="team", resultstore="a") is None
    assert value(got, "resultstore_stores", namespace="team", ready="True") == 0.0


def test_observe_store_forgets_on_deleted() -> None:
    body = store("observed-" + str(free_port()))
    m.observe_store(body, "ADDED")
    assert value(scrape(m.METRICS), "resultstore_store_ready", namespace="team",
                 resultstore=body["metadata"]["name"]) == 1.0
    m.observe_store(body, "DELETED")
    assert value(scrape(m.METRICS), "resultstore_store_ready", namespace="team",
                 resultstore=body["metadata"]["name"]) is None


# --- the HTTP endpoint -------------------------------------------------------------------------


def test_server_serves_text_format_on_loopback() -> None:
    metrics = m.OperatorMetrics()
    metrics.record_reconcile("create", None, 0.2)
    port = free_port()

    async def main() -> tuple[int, str, str, int, int]:
        server = m.MetricsServer(metrics, "127.0.0.1", port, "/custom-metrics")
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{port}"
                async with session.get(url + "/custom-metrics") as rsp:
                    status, ctype, text = rsp.status, rsp.headers["Content-Type"], \
                        await rsp.text()
                async with session.get(url + "/metrics") as rsp:
                    other = rsp.status
                async with session.post(url + "/custom-metrics") as rsp:
                    post = rsp.status
        finally:
            await server.stop()
        return status, ctype, text, other, post

    status, ctype, text, other, post = asyncio.run(main())
    assert status == 200, f"GET /custom-metrics answered {status}"
    assert ctype.startswith("text/plain; version="), ctype
    assert value(samples(text), "resultstore_reconciliations_total", handler="create",
                 outcome="success") == 1.0
    assert other == 404, "only the configured path is served"
    assert post == 405


def test_server_start_fails_on_a_busy_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        async def main() -> None:
            await m.MetricsServer(m.OperatorMetrics(), "127.0.0.1", port).start()

        with pytest.raises(OSError):
            asyncio.run(main())


# --- settings, CLI and chart -------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ("", None), ("0.0.0.0:9090", ("0.0.0.0", 9090)), ("127.0.0.1:1", ("127.0.0.1", 1)),
    (":9090", ("0.0.0.0", 9090)), ("[::]:9090", ("::", 9090)),
    ("metrics.local:8000", ("metrics.local", 8000)),
])
def test_listen_address_parsing(raw: str, expected: tuple[str, int] | None) -> None:
    assert parse_listen_address("X", raw) == expected


@pytest.mark.parametrize("raw", ["9090", "host:", "host:port", "h:0", "h:70000", "::1:80",
                                 "a b:80"])
def test_bad_listen_addresses_are_refused(raw: str) -> None:
    with pytest.raises(SettingsError, match="X"):
        parse_listen_address("X", raw)


def test_settings_read_metrics_once_from_env() -> None:
    assert OperatorSettings.from_env({}).metrics_listen is None
    s = OperatorSettings.from_env({"RESULTSTORE_METRICS_ADDRESS": "127.0.0.1:9321",
                                   "RESULTSTORE_METRICS_PATH": "/m"})
    assert s.metrics_listen == ("127.0.0.1", 9321) and s.metrics_path == "/m"
    with pytest.raises(SettingsError, match="RESULTSTORE_METRICS_ADDRESS"):
        OperatorSettings.from_env({"RESULTSTORE_METRICS_ADDRESS": "nonsense"})
    with pytest.raises(SettingsError, match="RESULTSTORE_METRICS_PATH"):
        OperatorSettings.from_env({"RESULTSTORE_METRICS_PATH": "metrics"})


def test_cli_flag_overrides_the_environment() -> None:
    env = {"RESULTSTORE_METRICS_ADDRESS": "0.0.0.0:9090"}
    assert build_settings(parse_args(["--metrics", "127.0.0.1:9999"]), env).metrics_listen \
        == ("127.0.0.1", 9999)
    assert build_settings(parse_args(["--metrics", ""]), env).metrics_listen is None
    assert build_settings(parse_args([]), env).metrics_listen == ("0.0.0.0", 9090)
    with pytest.raises(SettingsError, match="--metrics"):
        build_settings(parse_args(["--metrics", "oops"]), env)


def test_chart_port_path_and_service_match_what_the_operator_serves() -> None:
    chart = render(values=["metrics.enabled=true", "metrics.port=9191",
                           "metrics.path=/prom", "metrics.service.port=80"])
    deployment = find(chart, "Deployment")
    c = container(deployment)
    settings = OperatorSettings.from_env(env_values(c))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert settings.metrics_listen == ("0.0.0.0", ports["metrics"]) == ("0.0.0.0", 9191)
    assert settings.metrics_path == "/prom"
    service = find(chart, "Service", "resultstore-metrics")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == settings.metrics_path
    assert annotations["prometheus.io/port"] == "9191"
    off = OperatorSettings.from_env(env_values(container(find(render(), "Deployment"))))
    assert off.metrics_listen is None, "metrics must stay off unless metrics.enabled"


# --- call sites --------------------------------------------------------------------------------


def _count(handler: str, outcome: str) -> float:
    got = value(scrape(m.METRICS), "resultstore_reconciliations_total", handler=handler,
                outcome=outcome)
    assert got is not None
    return got


def test_controller_records_each_reconcile_outcome() -> None:
    """The controller's one reconcile path reports success, retryable failures and invalid
    specs under the Kopf handler id (reconcile_sync, the I/O, is replaced here)."""
    ctl = Controller(OperatorSettings(), kube=object())  # type: ignore[arg-type]
    results: list[Exception | None] = [None, DatabaseError("DatabaseUnreachable", "refused"),
                                       SpecError("spec.schema: bad")]

    def fake_sync(namespace: str, name: str, why: str) -> None:
        exc = results.pop(0)
        if exc is not None:
            raise exc

    ctl.reconcile_sync = fake_sync  # type: ignore[method-assign]
    before = {o: _count("rotate", o) for o in m.OUTCOMES}

    async def run() -> None:
        state = ObjectState()
        assert await ctl._reconcile_locked(state, "ns", "s", "test", "rotate") is None
        assert await ctl._reconcile_locked(state, "ns", "s", "test", "rotate") is None
        assert state.failures == 1
        assert isinstance(await ctl._reconcile_locked(state, "ns", "s", "test", "rotate"),
                          SpecError)

    try:
        asyncio.run(run())
    finally:
        ctl.executor.shutdown(wait=True)
    for outcome in m.OUTCOMES:
        assert _count("rotate", outcome) == before[outcome] + 1, (
            f"rotate/{outcome} was not counted once")


def test_webhook_counts_admissions_by_outcome(tmp_path: Path) -> None:
    def admissions() -> dict[str, float]:
        got = scrape(m.METRICS)
        return {o: value(got, "resultstore_webhook_admission_requests_total", outcome=o) or 0.0
                for o in m.ADMISSION_OUTCOMES}

    before = admissions()
    run_scenario(tmp_path, {"orders": StoreState.READY},
                 [review("team", {INJECT_LABEL: "orders"}, "1"), review("team", None, "2"),
                  review("team", {INJECT_LABEL: "ghost"}, "3")])
    after = admissions()
    # run_scenario also posts one malformed review (answered 400): an error
    assert {o: after[o] - before[o] for o in after} == {"mutated": 1, "unchanged": 2,
                                                       "error": 1}
