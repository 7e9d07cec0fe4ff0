"""The code stays ruff- and mypy-clean and its long modules say why: a lint regression fails the
suite like any other bug."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PACKAGES = ["backend/resultstore_backend", "operator/resultstore_operator",
            "devtools/resultstore_devtools"]
#: Checked by mypy with the packages (pyproject's mypy_path resolves their imports).
CHECKED_TOO = ["tests", "bench"]
#: The shipped code held to the module-size rule (devtools is not shipped).
PRODUCT = ["backend/resultstore_backend", "operator/resultstore_operator"]
#: Longer than this, a module says in its docstring why it is one (docs/CONVENTIONS.md).
MODULE_LINES = 400
WHY_ONE_MODULE = "Why one module:"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean() -> None:
    result = _run(str(BIN / "ruff"), "check", "backend", "operator", "devtools", "tests", "bench")
    assert result.returncode == 0, f"ruff found problems:\n{result.stdout}{result.stderr}"


def test_mypy_is_clean() -> None:
    """The product, and the tests and benchmarks that hold it, against the same types."""
    result = _run(str(BIN / "mypy"), *PACKAGES, *CHECKED_TOO)
    assert result.returncode == 0, (
        f"mypy found problems in {' '.join(PACKAGES + CHECKED_TOO)}:\n"
        f"{result.stdout}{result.stderr}")


def _long_modules_without_reason() -> list[str]:
    offenders = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            lines = len(text.splitlines())
            if lines <= MODULE_LINES:
                continue
            docstring = ast.get_docstring(ast.parse(text, str(path))) or ""
            if WHY_ONE_MODULE not in docstring:
                offenders.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    return offenders


def test_long_modules_say_why_they_are_one_module() -> None:
    """A module over MODULE_LINES lines is either split or its docstring says why it is one.

    The reason is for the next reader: either it is a real one (one contract, one lock, a
    boundary that must be reviewed as a whole), or writing it shows the module should split.
    """
    offenders = _long_modules_without_reason()
    assert not offenders, (
        f"modules over {MODULE_LINES} lines whose docstring has no {WHY_ONE_MODULE!r} "
        "paragraph (split them, or say why they are one; docs/CONVENTIONS.md):\n  "
        + "\n  ".join(offenders))


def test_nothing_refers_to_files_outside_the_repository() -> None:
    """A clone is all a newcomer has: contracts live in docs/, not in a sibling folder."""
    result = _run("git", "grep", "-n", "-I", "-e", "../shared", "-e", "DESIGN.md", "--",
                  ".", ":!tests/unit/test_code_quality.py")
    assert result.returncode == 1, (
        "files refer to documents outside the repository (use docs/CONTRACTS.md):\n"
        f"{result.stdout}{result.stderr}")
