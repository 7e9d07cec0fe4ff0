from __future__ import annotations

from pathlib import Path

import pytest

from resultstore_backend.cli import main


def test_migrate_check_cleanup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    assert main(["check", "--url", url]) == 2  # not migrated yet
    assert main(["migrate", "--url", url]) == 0
    assert main(["check", "--url", url]) == 0
    assert main(["cleanup", "--url", url, "--batch-size", "10"]) == 0
    assert "deleted 0 rows" in capsys.readouterr().out


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cleanup", "--config-dir", str(tmp_path / "nope")]) == 1
    assert str(tmp_path / "nope") in capsys.readouterr().err
    assert main(["cleanup", "--url", f"sqlite:///{tmp_path}/y.db"]) == 1  # no tables
    assert main(["cleanup", "--url", "sqlite://", "--batch-size", "0"]) == 2
