"""The demo's leftovers and tables: the work directory (Secret files, an operator token) is
removed, read-only volume directories included, or named with what it holds; SQL rows print
as a table, not as a Python tuple."""

from __future__ import annotations

import base64
import datetime
import os
from pathlib import Path

import yaml

from resultstore_devtools.demo_report import (
    WORKDIR_CONTENTS,
    describe_workdir,
    format_table,
    kube_client,
    leave_workdir,
    remove_workdir,
)
from resultstore_devtools.kubelet import KubeletDir


def _workdir(tmp_path: Path) -> Path:
    work = tmp_path / "resultstore-demo-x"
    work.mkdir(mode=0o700)
    KubeletDir(work / "client-binding", mode=0o600).write({"password": "s3cret"})
    (work / "operator.kubeconfig").write_text("token: abc\n")
    (work / "operator.log").write_text("log\n")
    volume = work / "worker-pod" / "volumes" / "orders"
    KubeletDir(volume, mode=0o400).write({"password": "s3cret"})
    # a read-only directory tree, as a mounted Secret volume may be
    for root, dirs, _ in os.walk(work / "worker-pod", topdown=False):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o500)
    os.chmod(work / "worker-pod", 0o500)
    return work


def test_remove_workdir_removes_secrets_and_read_only_volumes(tmp_path: Path) -> None:
    work = _workdir(tmp_path)
    assert remove_workdir(work) is True
    assert not work.exists(), f"left behind: {sorted(p.name for p in work.rglob('*'))}"
    assert remove_workdir(work) is False  # already gone: nothing to do, no error


def test_remove_workdir_keeps_what_symlinks_point_to(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the demo's\n")
    work = tmp_path / "work"
    work.mkdir()
    (work / "link").symlink_to(outside, target_is_directory=True)
    remove_workdir(work)
    assert not work.exists() and (outside / "keep.txt").read_text() == "not the demo's\n"


def test_describe_workdir_names_the_directory_and_each_secret(tmp_path: Path) -> None:
    work = _workdir(tmp_path)
    try:
        lines = describe_workdir(work, os.listdir(work))
        assert str(work) in lines[0] and f"rm -rf {work}" in lines[0], lines
        text = "\n".join(lines)
        for name in ("client-binding", "operator.kubeconfig", "worker-pod"):
            assert f"  {name}: {WORKDIR_CONTENTS[name]}" in text, text
        assert "token" in WORKDIR_CONTENTS["operator.kubeconfig"]
        assert "password" in WORKDIR_CONTENTS["client-binding"]
        assert "  other: a file of the demo" in describe_workdir(work, ["other"])
    finally:
        remove_workdir(work)


def test_format_table_prints_rows_like_psql() -> None:
    done = datetime.datetime(2026, 12, 2, 1, 2, 3, tzinfo=datetime.UTC)
    lines = format_table(["task_id", "status", "date_done", "worker"],
                         [("abc", "FAILURE", done, None)])
    assert lines == [
        "task_id | status  | date_done                 | worker",
        "--------+---------+---------------------------+-------",
        "abc     | FAILURE | 2026-12-02 01:02:03+00:00 |",
        "(1 row)",
    ]
    assert "(" not in "".join(lines[:3]) and "None" not in "".join(lines)
    assert format_table(["status", "count"], [])[-1] == "(0 rows)"
    assert format_table(["n"], [(1,), (22,)])[2:] == ["1", "22", "(2 rows)"]


def test_leave_workdir_removes_it_and_says_so(tmp_path: Path) -> None:
    work = _workdir(tmp_path)
    lines = leave_workdir(work, keep=False, failed=False)
    assert not work.exists(), "the demo left its Secret copies and token behind"
    assert len(lines) == 1 and f"Removed the demo's temporary directory {work}" in lines[0]
    assert "--keep" not in lines[0]


def test_leave_workdir_after_a_failure_points_at_keep(tmp_path: Path) -> None:
    work = _workdir(tmp_path)
    lines = leave_workdir(work, keep=False, failed=True)
    assert not work.exists() and "Run with --keep" in lines[-1], lines


def test_leave_workdir_with_keep_names_it_and_its_secrets(tmp_path: Path) -> None:
    work = _workdir(tmp_path)
    try:
        lines = leave_workdir(work, keep=True, failed=False)
        assert work.is_dir() and (work / "operator.kubeconfig").exists()
        assert lines == describe_workdir(work, os.listdir(work)), lines
        assert any("operator.kubeconfig" in line and "token" in line for line in lines)
    finally:
        remove_workdir(work)


def test_kube_client_writes_its_certificate_files_into_the_work_directory(
        tmp_path: Path) -> None:
    """The kubernetes client would put the kubeconfig's client key in the system temp
    directory (deleted only at a clean exit); the demo's goes with its work directory."""
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    kubeconfig = tmp_path / "admin.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {
            "server": "https://127.0.0.1:1",
            "certificate-authority-data": b64("ca for the test\n")}}],
        "users": [{"name": "u", "user": {
            "client-certificate-data": b64("cert for the test\n"),
            "client-key-data": b64("key for the test\n")}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))
    work = tmp_path / "work"
    work.mkdir()
    api = kube_client(kubeconfig, work)
    conf = api.configuration
    files = [Path(conf.key_file), Path(conf.cert_file), Path(conf.ssl_ca_cert)]
    for path in files:
        assert path.parent == work / "kube-client", path
    assert Path(conf.key_file).read_text() == "key for the test\n"
    remove_workdir(work)
    assert not any(path.exists() for path in files)
