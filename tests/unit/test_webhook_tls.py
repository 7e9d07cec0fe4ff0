"""Webhook certificates: generation, validation and the keep-the-CA reconciliation rule."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, cast

import pytest

from resultstore_operator.kube import Conflict, Kube
from resultstore_operator.webhook_tls import (
    ServingNames,
    TlsBundle,
    build_tls_secret,
    ca_problem,
    ensure_tls_secret,
    new_bundle,
    reconcile_bundle,
    service_names,
    serving_problem,
)

NAMES = ServingNames(dns=service_names("resultstore-webhook", "resultstore-system"))
LOCAL = ServingNames(ips=("127.0.0.1",))


@pytest.fixture(scope="module")
def bundle() -> TlsBundle:
    return new_bundle(NAMES)


def test_new_bundle_is_valid(bundle: TlsBundle) -> None:
    assert ca_problem(bundle) is None
    assert serving_problem(bundle, NAMES) is None
    assert "resultstore-webhook.resultstore-system.svc" in NAMES.dns


def test_valid_bundle_is_kept_unchanged(bundle: TlsBundle) -> None:
    kept, why = reconcile_bundle(bundle, NAMES)
    assert kept is bundle and why is None


def test_secret_data_round_trip(bundle: TlsBundle) -> None:
    data = bundle.to_secret_data()
    assert set(data) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    assert TlsBundle.from_secret_data(data) == bundle
    assert TlsBundle.from_secret_data({"tls.crt": data["tls.crt"]}) is None
    assert TlsBundle.from_secret_data(None) is None
    assert "PRIVATE" not in repr(bundle)


def test_changed_names_reissue_serving_cert_but_keep_ca(bundle: TlsBundle) -> None:
    renewed, why = reconcile_bundle(bundle, LOCAL)
    assert why is not None and why.startswith("re-issued")
    assert renewed.ca_crt == bundle.ca_crt and renewed.ca_key == bundle.ca_key
    assert renewed.tls_crt != bundle.tls_crt
    assert serving_problem(renewed, LOCAL) is None


def test_expiring_serving_cert_is_reissued_with_same_ca(bundle: TlsBundle) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=340)
    assert serving_problem(bundle, NAMES, now=later) is not None
    renewed, why = reconcile_bundle(bundle, NAMES, now=later)
    assert renewed.ca_crt == bundle.ca_crt and why is not None


def test_expiring_ca_is_replaced() -> None:
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=3640)
    old = new_bundle(NAMES, now=long_ago)
    assert ca_problem(old) == "CA expires soon"
    fresh, why = reconcile_bundle(old, NAMES)
    assert why is not None and why.startswith("new CA") and fresh.ca_crt != old.ca_crt


def test_foreign_serving_cert_or_missing_ca_key_is_detected(bundle: TlsBundle) -> None:
    other = new_bundle(NAMES)
    mixed = TlsBundle(bundle.ca_crt, other.tls_crt, other.tls_key, bundle.ca_key)
    assert serving_problem(mixed, NAMES) == "serving certificate not issued by the CA"
    swapped_key = TlsBundle(bundle.ca_crt, bundle.tls_crt, other.tls_key, bundle.ca_key)
    assert serving_problem(swapped_key, NAMES) == "serving key does not match the certificate"
    no_key = TlsBundle(bundle.ca_crt, bundle.tls_crt, bundle.tls_key, None)
    assert ca_problem(no_key) == "CA key missing"
    assert reconcile_bundle(None, NAMES)[1] == "created"


class _RacingSecrets:
    """The client's Secret calls, in memory: another replica creates the TLS Secret between
    our read and our create (the API server answers AlreadyExists: a Conflict)."""

    def __init__(self, winner: TlsBundle) -> None:
        self.winner = winner
        self.stored: dict[str, Any] | None = None
        self.writes = 0

    def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.stored

    def create_secret(self, namespace: str, body: Mapping[str, Any]) -> None:
        self.stored = build_tls_secret(name="tls", namespace=namespace, bundle=self.winner)
        self.stored["metadata"]["resourceVersion"] = "1"
        raise Conflict("create Secret tls: API answered 409 AlreadyExists", 409)

    def replace_secret(self, namespace: str, name: str, body: Mapping[str, Any]) -> None:
        self.writes += 1


def test_a_replica_that_loses_the_race_adopts_the_winners_bundle() -> None:
    winner = new_bundle(LOCAL)
    api = _RacingSecrets(winner)
    assert ensure_tls_secret(cast(Kube, api), "ops", "tls", LOCAL) == winner
    assert api.writes == 0, "the winner's valid Secret was overwritten"
