"""The layering of docs/ARCHITECTURE.md, as import-linter contracts ([tool.importlinter]).

The backend imports neither the operator nor the devtools; the product never imports the
devtools; the pure operator modules (builders, spec, crd, injection) import no I/O module; the
operator and the backend are layered; and no package has an import cycle between its modules
(imports inside functions included). A broken contract fails here with import-linter's report,
which names the contract and the import chain that breaks it.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = {"resultstore_backend": "backend", "resultstore_operator": "operator",
            "resultstore_devtools": "devtools"}


def _lint_imports(config: Path, cwd: Path, pythonpath: str | None = None
                  ) -> subprocess.CompletedProcess[str]:
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} missing: pip install import-linter (test extra)"
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", str(config)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept() -> None:
    result = _lint_imports(ROOT / "pyproject.toml", ROOT)
    assert result.returncode == 0, f"an import contract is broken:\n{result.stdout}{result.stderr}"
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in result.stdout, result.stdout


@pytest.fixture
def tree_copy(tmp_path: Path) -> Iterator[Path]:
    """The three packages copied outside the work tree (PYTHONPATH takes them first)."""
    for package, folder in PACKAGES.items():
        shutil.copytree(ROOT / folder / package, tmp_path / folder / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("backend/resultstore_backend/identifiers.py", "from resultstore_operator import spec",
     "The backend (the base install) imports neither the operator nor its dependencies"),
    ("operator/resultstore_operator/builders/names.py",
     "def _late() -> None:\n    from resultstore_operator import kube",
     "Pure operator modules (builders, spec, crd, injection) import no I/O part"),
    ("operator/resultstore_operator/kube/client.py", "import resultstore_devtools.procs",
     "The product never imports the development tooling"),
    ("operator/resultstore_operator/rollout.py",
     "def _late() -> None:\n    from kubernetes.client.exceptions import ApiException",
     "Only the kube package imports the kubernetes client library"),
    ("operator/resultstore_operator/webhook/admission.py",
     "def _late() -> None:\n    from . import server",
     "Webhook layers: runtime, server, events, pure admission and configuration"),
    ("operator/resultstore_operator/spec.py",
     "def _late() -> None:\n    from . import kube",
     "Operator layers"),
    ("devtools/resultstore_devtools/demo_story.py",
     "def _late() -> None:\n    from . import demo",
     "No import cycle between the modules of any package"),
])
def test_a_violation_breaks_its_contract(tree_copy: Path, module: str, line: str,
                                         contract: str) -> None:
    """The contracts are live: one forbidden import added to a copy of the tree fails them."""
    path = tree_copy / module
    path.write_text(path.read_text() + f"\n\n{line}\n")
    pythonpath = os.pathsep.join(str(tree_copy / folder) for folder in PACKAGES.values())
    result = _lint_imports(tree_copy / "pyproject.toml", tree_copy, pythonpath)
    assert result.returncode != 0, f"{line!r} in {module} passed:\n{result.stdout}"
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken.replace("\n", " "), result.stdout


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from psycopg import sql` -> psycopg.sql (a submodule or a name of psycopg)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_pure_modules_use_psycopg_for_sql_composition_only() -> None:
    """The one psycopg import the contracts let through: psycopg.sql (no connection)."""
    operator = ROOT / "operator" / "resultstore_operator"
    pure = [*sorted((operator / "builders").glob("*.py")), operator / "spec.py",
            operator / "crd.py", operator / "injection.py"]
    offenders = {str(p.relative_to(ROOT)): sorted(n) for p in pure
                 if (n := {m for m in _imports(p) if m.split(".")[0] == "psycopg"}
                     - {"psycopg.sql"})}
    assert not offenders, f"pure modules importing psycopg beyond psycopg.sql: {offenders}"
