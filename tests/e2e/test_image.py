"""The container image, built for real from the Dockerfile and checked.

Uses the caches of ``resultstore_devtools.image`` (stand-in base rootfs, images labelled with
their build-context hash), so a run over an unchanged tree takes seconds and a source change
costs one rebuild (~1 min on 2 cores); an empty cache costs ~2.5 min more for debootstrap.
Needs Docker or buildah (+ debootstrap for the stand-in base): it fails, never skips, when
they are missing.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from resultstore_devtools import image

COLD_TIMEOUT = 1200


@pytest.fixture(scope="module")
def built() -> Iterator[image.BuildResult]:
    result = image.build()
    if result.engine != "buildah":
        pytest.fail("these checks run images with buildah; set RESULTSTORE_IMAGE_ENGINE=buildah")
    yield result


@pytest.mark.timeout(COLD_TIMEOUT)
def test_build_produces_both_targets(built: image.BuildResult) -> None:
    version = image.project_version()
    assert built.operator == f"localhost/celery-resultstore:{version}"
    assert built.worker == f"localhost/celery-resultstore-worker:{version}"
    assert image.image_exists(built.operator) and image.image_exists(built.worker)


@pytest.mark.timeout(COLD_TIMEOUT)
def test_verify_passes(built: image.BuildResult) -> None:
    checks = image.verify(built.operator, built.worker)
    failed = [f"{c.name}: {c.detail}" for c in checks if not c.ok]
    assert not failed, "\n".join(failed)
    assert len(checks) >= 12


@pytest.mark.timeout(COLD_TIMEOUT)
def test_run_user_volumes_and_read_only_root(built: image.BuildResult, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "in").write_text("from the host\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o1777)
    scratch.chmod(0o1777)
    result = image.run(
        built.operator,
        ["sh", "-c", "id -u; id -g; cat /data/in; echo $GREETING; pwd; "
         "touch /data/new 2>&1; touch /etc/new 2>&1; touch /tmp/out && echo tmp-ok"],
        env={"GREETING": "hello"}, user="12345:23456", workdir="/tmp", read_only=True,
        volumes=[image.Volume(data, "/data", read_only=True), image.Volume(scratch, "/tmp")],
    )
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stderr
    assert lines[:5] == ["12345", "23456", "from the host", "hello", "/tmp"]
    assert "touch: cannot touch '/data/new': Read-only file system" in lines
    assert "touch: cannot touch '/etc/new': Read-only file system" in lines
    assert lines[-1] == "tmp-ok"
    assert (scratch / "out").stat().st_uid == 12345


@pytest.mark.timeout(COLD_TIMEOUT)
def test_exit_status_signals_and_cleanup(built: image.BuildResult) -> None:
    assert image.run(built.worker, ["sh", "-c", "exit 7"]).returncode == 7
    proc = image.run_in_image(
        built.worker,
        ["sh", "-c", 'trap "echo got-TERM; exit 3" TERM; echo up; while :; do sleep 0.1; done'],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "up"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    # The command itself got SIGTERM (a grace period works), not buildah's SIGKILL.
    assert proc.returncode == 3 and "got-TERM" in out
    # A supervisor killed outright leaves its container behind; the next run removes it.
    killed = image.run_in_image(built.worker, ["sleep", "600"])
    time.sleep(3)
    killed.kill()
    killed.wait()
    assert image.run(built.worker, ["true"]).returncode == 0
    names = image.buildah("containers", "--format", "{{.ContainerName}}").split()
    assert not [n for n in names if n.startswith(f"{image.RUN_PREFIX}{killed.pid}-")]


@pytest.mark.timeout(COLD_TIMEOUT)
def test_export_docker_archive(built: image.BuildResult, tmp_path: Path) -> None:
    archive = image.export(built.worker, tmp_path / "worker.tar")
    listing = subprocess.run(["tar", "-tf", str(archive)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert "manifest.json" in listing
    manifest = subprocess.run(["tar", "-xOf", str(archive), "manifest.json"],
                              capture_output=True, text=True, check=True).stdout
    assert f"celery-resultstore-worker:{image.project_version()}" in manifest
