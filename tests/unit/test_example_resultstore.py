"""manifests/examples/resultstore.yaml shows every field of the ResultStore spec.

docs/CONTRACTS.md promises it: a user reads the example to learn what can be set, so a
field added to the CRD without a line in the example (active, or commented with its
default) is a hole in the documentation that nothing else would catch.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from resultstore_operator.crd import build_crd
from resultstore_operator.spec import parse_spec

EXAMPLE = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "resultstore.yaml"
# `key:` at some indent, possibly behind a "# " that keeps the key's own column.
KEY_LINE = re.compile(r"^(?P<lead>\s*)(?:#\s?(?P<inner>\s*))?(?P<key>[A-Za-z][A-Za-z0-9]*):")


def _crd_paths(props: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for name, schema in props.items():
        yield prefix + name
        if "properties" in schema:
            yield from _crd_paths(schema["properties"], f"{prefix}{name}.")


def _example_paths(text: str) -> set[str]:
    """Dotted key paths under `spec:`, commented keys included (indentation decides)."""
    paths: set[str] = set()
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        m = KEY_LINE.match(line)
        if not m:
            continue
        indent = len(m["lead"]) + len(m["inner"] or "")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m["key"]))
        keys = [k for _, k in stack]
        if keys[0] == "spec" and len(keys) > 1:
            paths.add(".".join(keys[1:]))
    return paths


def _spec_schema() -> Mapping[str, Any]:
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]


def test_every_spec_field_is_in_the_example() -> None:
    missing = sorted(set(_crd_paths(_spec_schema())) - _example_paths(EXAMPLE.read_text()))
    assert not missing, (
        f"{EXAMPLE.name} does not show these ResultStore fields (add them, commented with "
        f"their default if optional): {missing}")


def test_the_example_has_no_field_the_crd_does_not_know() -> None:
    unknown = sorted(_example_paths(EXAMPLE.read_text()) - set(_crd_paths(_spec_schema())))
    assert not unknown, f"{EXAMPLE.name} shows fields the CRD does not define: {unknown}"


def test_the_example_as_written_is_a_valid_spec() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    spec = parse_spec(doc["spec"])
    assert spec.schema == "orders_results"


def test_the_path_reader_sees_commented_and_nested_keys() -> None:
    text = "spec:\n  a: 1\n  # b:\n  #   c: 2\n  d:\n    e: 3\n"
    assert _example_paths(text) == {"a", "b", "b.c", "d", "d.e"}
