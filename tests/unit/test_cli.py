from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

import pytest

from resultstore_backend.cli import (
    EXIT_ERROR,
    EXIT_NEWER,
    EXIT_NOT_MIGRATED,
    EXIT_OK,
    EXIT_USAGE,
    main,
    schema_problem,
)
from resultstore_backend.schema import SCHEMA_VERSION, VERSION_TABLE

NOT_MIGRATED = "not migrated: schema version 0, run `resultstore migrate`"


def test_migrate_check_cleanup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    assert main(["check", "--url", url]) == EXIT_NOT_MIGRATED
    out, err = capsys.readouterr()
    assert not out.startswith("ok"), f"an unmigrated store reported ok: {out!r}"
    assert f"not migrated: no SQLite database at {tmp_path}/x.db" in err, err
    assert not (tmp_path / "x.db").exists(), "check created the database it was asked about"
    (tmp_path / "x.db").touch()  # an empty database: no tables
    assert main(["check", "--url", url]) == EXIT_NOT_MIGRATED
    assert NOT_MIGRATED in capsys.readouterr().err
    assert main(["migrate", "--url", url]) == EXIT_OK
    capsys.readouterr()
    assert main(["check", "--url", url]) == EXIT_OK
    out, err = capsys.readouterr()
    assert out.startswith("ok: ") and f"at version {SCHEMA_VERSION}" in out, out
    assert main(["cleanup", "--url", url, "--batch-size", "10"]) == EXIT_OK
    assert "deleted 0 rows" in capsys.readouterr().out


def test_cleanup_of_an_unmigrated_store_says_so(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cleanup", "--url", f"sqlite:///{tmp_path}/y.db"]) == EXIT_NOT_MIGRATED
    err = capsys.readouterr().err
    assert "not migrated: no SQLite database" in err and "no such table" not in err, err
    assert not (tmp_path / "y.db").exists(), "cleanup created the database it was asked about"
    (tmp_path / "y.db").touch()
    assert main(["cleanup", "--url", f"sqlite:///{tmp_path}/y.db"]) == EXIT_NOT_MIGRATED
    err = capsys.readouterr().err
    assert NOT_MIGRATED in err and "no such table" not in err, err


def test_check_of_a_store_migrated_by_newer_code(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    assert main(["migrate", "--url", url]) == EXIT_OK
    with sqlite3.connect(tmp_path / "x.db") as conn:
        conn.execute(f"INSERT INTO {VERSION_TABLE} (version, description, applied_at) "
                     "VALUES (?, ?, ?)", (SCHEMA_VERSION + 1, "from the future",
                                          "2030-01-01 00:00:00"))
    conn.close()
    capsys.readouterr()
    assert main(["check", "--url", url]) == EXIT_NEWER
    out, err = capsys.readouterr()
    assert out == "" and f"schema version {SCHEMA_VERSION + 1} is newer" in err, (out, err)


def test_schema_problem_names_each_case() -> None:
    assert schema_problem(SCHEMA_VERSION) is None
    assert schema_problem(0) == (EXIT_NOT_MIGRATED, NOT_MIGRATED)
    assert schema_problem(1, code_version=3) == (
        EXIT_NOT_MIGRATED, "schema version 1 is older than this code's 3: run `resultstore "
        "migrate`")
    assert schema_problem(4, code_version=3) == (
        EXIT_NEWER, "schema version 4 is newer than this code's 3: upgrade celery-resultstore")
    assert len({EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_MIGRATED, EXIT_NEWER}) == 5


def test_exit_codes_are_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    out = capsys.readouterr().out
    for code in (EXIT_NOT_MIGRATED, EXIT_NEWER):
        assert f"  {code}  " in out, out


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cleanup", "--config-dir", str(tmp_path / "nope")]) == EXIT_ERROR
    assert str(tmp_path / "nope") in capsys.readouterr().err
    assert main(["cleanup", "--url", "sqlite://", "--batch-size", "0"]) == EXIT_USAGE


@pytest.mark.parametrize("command", ["check", "migrate", "cleanup"])
def test_a_sqlite_file_that_cannot_be_opened(command: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "missing-dir" / "x.db"
    assert main([command, "--url", f"sqlite:///{path}"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert f"cannot open SQLite database at {path}: " in err, err
    assert f"directory {path.parent} does not exist" in err, err
    for wrong in ("PostgreSQL", "None", "key '"):
        assert wrong not in err, f"{wrong!r} in {err!r}"
    assert not path.parent.exists()


def test_a_refused_url_names_its_host_and_port(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert main(["check", "--url",
                     f"postgresql://u:s3cr3t-pw@127.0.0.1:{port}/db"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port} (database 'db', user 'u')" \
        in err, err
    assert "refused" in err.lower(), err
    assert "key '" not in err and "s3cr3t-pw" not in err, err


@pytest.mark.parametrize(("url", "says"), [
    ("postgresql://u:pw@h:abc/db", "backend URL: the port is not a number"),
    ("postgresql://u:pw@h/db?notify=maybe", "?notify= expects true or false"),
    ("sqlite:///x.db?schema=s", "SQLite has no schemas; drop ?schema="),
])
def test_url_mistakes_name_the_url_part_not_a_secret_key(
        url: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--url", url]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert says in err and "key '" not in err, err
