"""The CRD is generated from crd.py; the committed manifest must match it exactly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from resultstore_operator import crd
from resultstore_operator.spec import DURATION_PATTERN

ROOT = Path(__file__).resolve().parents[2]


def test_committed_manifest_matches_generator() -> None:
    committed = (ROOT / "manifests" / "crd.yaml").read_text()
    assert committed == crd.render_yaml(), (
        "manifests/crd.yaml is stale: run "
        "`.venv/bin/python -m resultstore_operator.crd > manifests/crd.yaml`")


def test_chart_crd_matches_generator_when_present() -> None:
    chart = ROOT / "helm" / "resultstore" / "crds"
    files = sorted(chart.glob("*.yaml")) if chart.is_dir() else []
    for path in files:
        doc = yaml.safe_load(path.read_text())
        if doc and doc.get("kind") == "CustomResourceDefinition":
            assert doc == crd.build_crd(), f"{path} differs from crd.py"


def _walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, child in (schema.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")


def _root() -> dict[str, Any]:
    doc = crd.build_crd()
    return doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_names_scope_and_subresources() -> None:
    doc = crd.build_crd()
    assert doc["metadata"]["name"] == "resultstores.resultstore.dev"
    names = doc["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "ResultStore", "resultstores", ["rstore"])
    version = doc["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Ready", "Reason", "Schema", "Secret", "Connections", "Age"]


def test_every_string_is_bounded_for_cel_cost() -> None:
    """Unbounded strings make CEL cost estimates exceed the budget; every one has a bound."""
    for path, node in _walk(_root()):
        if path in (".apiVersion", ".kind"):
            continue
        if node.get("type") == "string" and node.get("format") != "date-time":
            assert "maxLength" in node or "enum" in node, path


@pytest.mark.parametrize(
    ("path", "default"),
    [(".spec.database.port", 5432), (".spec.database.sslMode", "prefer"),
     (".spec.engine.poolSize", 5), (".spec.engine.poolTimeout", "30s"),
     (".spec.retention.batchSize", 1000), (".spec.credentials.drainTimeout", "5m"),
     (".spec.deletionPolicy", "Retain"), (".spec.tables.taskTable", "celery_taskmeta"),
     (".spec.cleanupJob.hostNetwork", False)],
)
def test_defaults(path: str, default: Any) -> None:
    nodes = dict(_walk(_root()))
    assert nodes[path]["default"] == default


@pytest.mark.parametrize(
    ("path", "fragment"),
    [(".spec.schema", "self == oldSelf"), (".spec.schema", "self.matches("),
     (".spec.database", "self.host == oldSelf.host"),
     (".spec.database", "self.name == oldSelf.name"),
     (".spec.tables", "self == oldSelf"),
     (".spec.engine.poolTimeout", "duration(self) >= duration('1s')"),
     (".spec.credentials", "duration(self.rotateEvery) > duration(self.drainTimeout)"),
     ("", "size(self.metadata.name) <= 32")],
)
def test_cel_rules(path: str, fragment: str) -> None:
    nodes = dict(_walk(_root()))
    rules = [v["rule"] for v in nodes[path].get("x-kubernetes-validations", [])]
    assert any(fragment in rule for rule in rules), rules


@pytest.mark.parametrize(
    ("path", "values"),
    [(".spec.deletionPolicy", ["Retain", "Delete"]),
     (".spec.database.sslMode",
      ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"])],
)
def test_enums(path: str, values: list[str]) -> None:
    assert dict(_walk(_root()))[path]["enum"] == values


def test_durations_share_one_pattern() -> None:
    for path, node in _walk(_root()):
        if "duration(self)" in str(node.get("x-kubernetes-validations", "")):
            assert node["pattern"] == DURATION_PATTERN, path


def test_conditions_are_a_map_list() -> None:
    conditions = dict(_walk(_root()))[".status.conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert set(conditions["items"]["required"]) == {
        "type", "status", "reason", "message", "lastTransitionTime"}
