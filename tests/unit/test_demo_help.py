"""`scripts/demo --help` answers on a fresh clone: no virtualenv, no bootstrap first.

The first bootstrap takes minutes (apt, the virtualenv, Go builds of the control plane); a
newcomer asking for help must not wait for it. The demo's argument parser lives in
resultstore_devtools/demo_args.py, standard library only, and scripts/demo runs it with the
system python before anything else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKER = "BOOTSTRAP RAN"


def _path_without_venv() -> str:
    """This PATH minus every virtualenv's bin/ (what a fresh clone's shell has)."""
    venv_bin = str(Path(sys.executable).parent)
    keep = [p for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and p != venv_bin and "/.venv/" not in p + "/"]
    return os.pathsep.join(keep)


@pytest.fixture
def fresh_clone(tmp_path: Path) -> Iterator[Path]:
    """The demo script and the devtools sources without .venv, and a bootstrap that only
    reports that it ran (so a regression shows here instead of installing packages)."""
    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "demo", clone / "scripts" / "demo")
    shutil.copytree(ROOT / "devtools", clone / "devtools",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (clone / "scripts" / "bootstrap").write_text(f"#!/usr/bin/env bash\necho '{MARKER}'\nexit 97\n")
    yield clone
    shutil.rmtree(clone, ignore_errors=True)


def test_help_answers_without_venv_or_bootstrap(fresh_clone: Path) -> None:
    path = _path_without_venv()
    python = shutil.which("python3", path=path)
    assert python is not None, f"no python3 on PATH without the venv: {path}"
    assert not (fresh_clone / ".venv").exists()
    env = {"PATH": path, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    result = subprocess.run(["bash", str(fresh_clone / "scripts" / "demo"), "--help"],
                            env=env, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert MARKER not in output, f"--help ran the bootstrap first:\n{output}"
    assert result.returncode == 0, f"scripts/demo --help failed ({python}):\n{output}"
    assert result.stdout.startswith("usage: scripts/demo"), output
    assert "--kubeconfig" in result.stdout and "--keep" in result.stdout
    assert not (fresh_clone / ".venv").exists(), "--help created a virtualenv"
    assert not list((fresh_clone / "devtools").rglob("__pycache__")), "byte code written"


def test_demo_args_needs_the_standard_library_only() -> None:
    """Imported by a bare interpreter (-I -S: no site-packages, no PYTHONPATH), the parser
    module loads nothing outside the standard library and resultstore_devtools."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "import resultstore_devtools.demo_args as a; a.parse_args(['--keep']); "
            "top = {m.split('.')[0] for m in sys.modules}; "
            "ours = {'resultstore_devtools', '__main__'}; "
            "print(sorted(top - set(sys.stdlib_module_names) - ours))")
    result = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(ROOT / "devtools")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"demo_args imports beyond the stdlib: {result.stdout}"
