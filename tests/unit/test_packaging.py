"""The product wheel carries the product only; the development tooling is its own distribution.

`resultstore_devtools` (5k lines of local services, control plane, image builds and the demo)
and its `resultstore-dev` command are development tooling: shipping them in the
celery-resultstore wheel would put them on every worker's and operator's PATH. These tests
build both wheels for real (setuptools, offline: no build isolation) from a copy of the tree
that still holds devtools/, so it is the packaging configuration that keeps it out.
"""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT_PACKAGES = {"resultstore_backend", "resultstore_operator"}


def _build_wheel(source: Path, out: Path) -> Path:
    """`pip wheel --no-deps --no-build-isolation source`: the .venv's setuptools, no index."""
    import setuptools

    major = int(setuptools.__version__.split(".")[0])
    assert major >= 77, (f"setuptools {setuptools.__version__} in {sys.prefix}: the SPDX "
                         "`license` needs >= 77 (pip install 'setuptools>=77', test extra)")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"building {source.name} failed:\n{result.stdout}{result.stderr}"
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {out}, got {wheels}"
    return wheels[0]


def _ignore(_dir: str, names: list[str]) -> set[str]:
    return {n for n in names if n in {"__pycache__", "build", "dist"} or n.endswith(".egg-info")}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """What a checkout holds for the build (devtools/ included), outside the work tree."""
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("backend", "operator", "devtools"):
        shutil.copytree(ROOT / name, src / name, ignore=_ignore)
    yield src
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def product_wheel(tree: Path) -> zipfile.ZipFile:
    return zipfile.ZipFile(_build_wheel(tree, tree.parent / "product"))


@pytest.fixture(scope="module")
def devtools_wheel(tree: Path) -> zipfile.ZipFile:
    return zipfile.ZipFile(_build_wheel(tree / "devtools", tree.parent / "devtools"))


def _dist_file(wheel: zipfile.ZipFile, name: str) -> str:
    matches = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    assert matches, f"{name} missing from {wheel.filename}: {wheel.namelist()}"
    return wheel.read(matches[0]).decode()


def _console_scripts(wheel: zipfile.ZipFile) -> set[str]:
    text = _dist_file(wheel, "entry_points.txt")
    section = text.split("[console_scripts]", 1)[1].split("\n[", 1)[0] if (
        "[console_scripts]" in text) else ""
    return {line.split("=")[0].strip() for line in section.splitlines() if "=" in line}


def test_product_wheel_holds_backend_and_operator_only(product_wheel: zipfile.ZipFile) -> None:
    names = product_wheel.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == PRODUCT_PACKAGES, f"top-level entries of the product wheel: {sorted(top)}"
    leaked = [n for n in names if "devtools" in n]
    assert not leaked, f"development tooling in the product wheel: {leaked}"
    # The real modules are in it (not an empty shell that would pass the checks above).
    assert "resultstore_backend/backend.py" in names
    assert "resultstore_operator/main.py" in names


def test_product_wheel_commands_and_license(product_wheel: zipfile.ZipFile) -> None:
    scripts = _console_scripts(product_wheel)
    assert scripts == {"resultstore", "resultstore-operator"}, (
        f"console scripts of the product wheel: {sorted(scripts)}")
    entry_points = _dist_file(product_wheel, "entry_points.txt")
    assert "[celery.result_backends]" in entry_points and "resultstore = " in entry_points
    metadata = email.parser.Parser().parsestr(_dist_file(product_wheel, "METADATA"))
    assert metadata["License-Expression"] == "Apache-2.0", metadata.items()
    assert "Apache License" in _dist_file(product_wheel, "licenses/LICENSE")


def test_devtools_wheel_is_the_tooling(devtools_wheel: zipfile.ZipFile) -> None:
    names = devtools_wheel.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"resultstore_devtools"}, f"top-level entries of the devtools wheel: {top}"
    assert "resultstore_devtools/cli.py" in names and "resultstore_devtools/demo.py" in names
    assert _console_scripts(devtools_wheel) == {"resultstore-dev"}
    metadata = email.parser.Parser().parsestr(_dist_file(devtools_wheel, "METADATA"))
    assert metadata["Name"] == "celery-resultstore-devtools"
    requires = metadata.get_all("Requires-Dist") or []
    assert any(r.startswith("celery-resultstore[") for r in requires), requires


def test_product_pyproject_does_not_look_in_devtools() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    where = project["tool"]["setuptools"]["packages"]["find"]["where"]
    assert sorted(where) == ["backend", "operator"], where
    assert "resultstore-dev" not in project["project"]["scripts"]
