"""Metrics: the real operator process serves Prometheus text on its metrics port, and the
counters and gauges follow what it did to real ResultStores (control plane + PostgreSQL)."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from resultstore_devtools.procs import free_port
from tests.e2e.operator_support import OpEnv, eventually, make_openv, no_secret_in

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def env(kube: Any, api_client: Any, namespace: str, postgres: Any,
        pg_database: Any) -> Iterator[OpEnv]:
    port = free_port()
    yield from make_openv(kube, api_client, namespace, postgres, pg_database,
                          extra_env={"RESULTSTORE_METRICS_ADDRESS": f"127.0.0.1:{port}"})


class Scraper:
    def __init__(self, env: OpEnv) -> None:
        self.env = env
        address = env.operator.extra_env["RESULTSTORE_METRICS_ADDRESS"]
        self.url = f"http://{address}/metrics"
        self.text = ""

    def scrape(self) -> Samples:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as rsp:
                assert rsp.status == 200, f"GET {self.url} answered {rsp.status}"
                ctype = rsp.headers.get("Content-Type", "")
                assert ctype.startswith("text/plain"), f"{self.url}: Content-Type {ctype!r}"
                self.text = rsp.read().decode()
        except OSError as exc:
            raise AssertionError(f"cannot scrape {self.url}: {exc}\noperator log:\n"
                                 f"{self.env.operator.tail()}") from exc
        out: Samples = {}
        for family in text_string_to_metric_families(self.text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def value(self, name: str, **labels: str) -> float | None:
        return self.scrape().get((name, tuple(sorted(labels.items()))))

    def wait(self, name: str, expected: float, at_least: bool = False, timeout: float = 30,
             **labels: str) -> float:
        """Poll until the sample equals (or reaches) `expected`; the failure says what the
        endpoint showed instead."""
        seen: list[float | None] = [None]

        def probe() -> bool:
            got = seen[0] = self.value(name, **labels)
            return got is not None and (got >= expected if at_least else got == expected)

        try:
            eventually(probe, timeout, f"{name}{labels} == {expected}")
            return float(seen[0] or 0.0)
        except AssertionError as exc:
            related = "\n".join(line for line in self.text.splitlines()
                                if line.startswith(name))
            raise AssertionError(
                f"{name}{labels}: expected {'>= ' if at_least else ''}{expected}, last "
                f"scrape showed {seen[0]}; samples of {name}:\n{related or '(none)'}\n"
                f"operator log:\n{self.env.operator.tail(30)}") from exc


def test_metrics_follow_reconciles_ready_state_and_invalid_specs(env: OpEnv) -> None:
    metrics = Scraper(env)
    ns = env.namespace
    first = metrics.scrape()
    assert first.get(("resultstore_reconciliations_total",
                      (("handler", "create"), ("outcome", "success")))) == 0.0, (
        "the reconcile counter should exist at 0 before any store")

    # a valid store: counted as a successful create, and Ready in the gauges
    env.create("orders", "orders")
    env.ready("orders")
    metrics.wait("resultstore_reconciliations_total", 1, at_least=True, handler="create",
                 outcome="success")
    metrics.wait("resultstore_reconcile_duration_seconds_count", 1, at_least=True,
                 handler="create", outcome="success")
    metrics.wait("resultstore_stores", 1, namespace=ns, ready="True")
    metrics.wait("resultstore_store_ready", 1, namespace=ns, resultstore="orders")
    metrics.wait("resultstore_credential_rotations_in_progress", 0, namespace=ns)

    # an invalid spec the CRD cannot catch (40 characters, 80 bytes): a permanent error
    bad_db = {**env.spec("x")["database"], "name": "\u00e9" * 40}
    env.create("broken", "broken", database=bad_db)
    env.cluster.wait_condition(ns, "broken", "Ready", "False", reason="InvalidSpec",
                               timeout=45)
    metrics.wait("resultstore_reconciliations_total", 1, at_least=True, handler="create",
                 outcome="permanent_error")
    metrics.wait("resultstore_reconcile_errors_total", 1, at_least=True, reason="InvalidSpec")
    metrics.wait("resultstore_stores", 1, namespace=ns, ready="False")
    metrics.wait("resultstore_stores", 1, namespace=ns, ready="True")
    metrics.wait("resultstore_store_ready", 0, namespace=ns, resultstore="broken")
    # permanent means no retries: over several ticks and backoff periods the count stays
    def permanent() -> dict[str, float]:
        got = metrics.scrape()
        return {h: got.get(("resultstore_reconciliations_total",
                            (("handler", h), ("outcome", "permanent_error"))), -1.0)
                for h in ("create", "timer")}

    settled = permanent()
    # attempted exactly once, by create: the timer leaves a store alone until a change
    # handler has run (it used to race create and make a second attempt)
    assert settled == {"create": 1.0, "timer": 0.0}, (
        f"an invalid new store was attempted more than once: {settled}")
    time.sleep(6)  # 12 ticks, longer than the retry backoff ceiling (4 s) of these tests
    assert permanent() == settled, (
        f"an invalid spec kept being retried: permanent errors went {settled} -> "
        f"{permanent()}")

    # deleting a store finalises it and removes its series
    env.cluster.delete_store(ns, "broken")
    eventually(lambda: env.cluster.store(ns, "broken") is None, 30, "broken to be deleted")
    metrics.wait("resultstore_reconciliations_total", 1, at_least=True, handler="finalize",
                 outcome="success")
    metrics.wait("resultstore_stores", 0, namespace=ns, ready="False")
    samples = metrics.scrape()
    leftovers = [k for k in samples if ("resultstore", "broken") in k[1]]
    assert not leftovers, f"series of the deleted store remain: {leftovers}"

    # labels never carry credentials
    no_secret_in(metrics.text, env.admin.password, env.binding("orders")["password"])
