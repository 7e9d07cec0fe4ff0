"""The code stays ruff- and mypy-clean: a lint regression fails the suite like any other bug."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PACKAGES = ["backend/resultstore_backend", "operator/resultstore_operator",
            "devtools/resultstore_devtools"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean() -> None:
    result = _run(str(BIN / "ruff"), "check", "backend", "operator", "devtools", "tests", "bench")
    assert result.returncode == 0, f"ruff found problems:\n{result.stdout}{result.stderr}"


def test_mypy_is_clean() -> None:
    result = _run(str(BIN / "mypy"), *PACKAGES)
    assert result.returncode == 0, f"mypy found problems:\n{result.stdout}{result.stderr}"


def test_nothing_refers_to_files_outside_the_repository() -> None:
    """A clone is all a newcomer has: contracts live in docs/, not in a sibling folder."""
    result = _run("git", "grep", "-n", "-I", "-e", "../shared", "-e", "DESIGN.md", "--",
                  ".", ":!tests/unit/test_code_quality.py")
    assert result.returncode == 1, (
        "files refer to documents outside the repository (use docs/CONTRACTS.md):\n"
        f"{result.stdout}{result.stderr}")
