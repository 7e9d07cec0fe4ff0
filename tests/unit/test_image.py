"""Pure parts of the image tooling: apt sources, cache keys, command lines, users."""

from __future__ import annotations

from pathlib import Path

import pytest

from resultstore_devtools import image

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_mirrors_from_deb822_and_one_line_sources() -> None:
    sources = image.parse_apt_sources(DEB822)
    assert image.debian_mirrors(sources) == ("http://mirror.example/debian",
                                             "http://mirror.example/debian-security")
    one_line = image.parse_apt_sources(
        "deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian/ bookworm main\n"
        "# deb http://ignored bookworm main\n")
    assert image.debian_mirrors(one_line) == ("http://m.example/debian",
                                              image.DEBIAN_FALLBACK_SECURITY)
    assert image.debian_mirrors([]) == (image.DEBIAN_FALLBACK_MIRROR,
                                        image.DEBIAN_FALLBACK_SECURITY)


def test_base_key_changes_with_every_input() -> None:
    inputs = image.base_inputs("http://a/debian", "http://a/sec", "amd64")
    key = image.base_key(inputs)
    assert key == image.base_key(dict(inputs))
    assert key != image.base_key({**inputs, "arch": "arm64"})
    assert key != image.base_key({**inputs, "packages": ["python3"]})


def test_context_key_follows_the_build_context(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_text("**\n!pyproject.toml\n!pkg/\n**/__pycache__/\n")
    (tmp_path / "Dockerfile").write_text("FROM x\n")
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("a = 1\n")
    (tmp_path / "outside.txt").write_text("not in the context\n")
    files = image.context_files(tmp_path, (tmp_path / ".dockerignore").read_text())
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["pkg/a.py", "pyproject.toml"]
    key = image.context_key(tmp_path, {"base": "b"})
    (tmp_path / "outside.txt").write_text("changed\n")
    (tmp_path / "pkg" / "__pycache__" / "a.pyc").write_bytes(b"x")
    assert image.context_key(tmp_path, {"base": "b"}) == key
    assert image.context_key(tmp_path, {"base": "other"}) != key
    (tmp_path / "pkg" / "a.py").write_text("a = 2\n")
    assert image.context_key(tmp_path, {"base": "b"}) != key


def test_the_real_context_matches_the_dockerignore() -> None:
    files = image.context_files(image.ROOT, (image.ROOT / ".dockerignore").read_text())
    names = {p.relative_to(image.ROOT).as_posix() for p in files}
    assert "pyproject.toml" in names and "README.md" in names
    assert not [n for n in names if "__pycache__" in n or ".egg-info" in n]
    assert not [n for n in names if n.startswith(("tests/", ".venv/", "docs/"))]


def test_bud_command() -> None:
    cmd = image.bud_command(["--root", "/r"], Path("/src"), "localhost/x:1", "base:1", "1",
                            "worker", Path("/ca.crt"), "k")
    assert cmd[:3] == ["buildah", "--root", "/r"]
    assert "--layers" not in cmd  # buildah <= 1.28 builds stale images with it (see module)
    assert ["--isolation", "chroot"] == cmd[cmd.index("--isolation"):][:2]
    assert "PYTHON_IMAGE=base:1" in cmd and "RESULTSTORE_VERSION=1" in cmd
    assert ["--target", "worker"] == cmd[cmd.index("--target"):][:2]
    assert f"/ca.crt:{image.CA_BUNDLE_TARGET}:ro" in cmd
    assert f"{image.CONTEXT_KEY_LABEL}=k" in cmd
    assert cmd[-1] == "/src"


def test_run_command_and_volumes() -> None:
    volume = image.Volume.parse("/host/data:/data:ro")
    assert volume == image.Volume(Path("/host/data"), "/data", True)
    assert image.Volume.parse("/h:/c").flag() == "/h:/c"
    with pytest.raises(ValueError):
        image.Volume.parse("/only-one")
    cmd = image.run_command([], "ctr", ["echo", "--flag"], {"A": "1"}, "10001:10001",
                            [volume], "/app", cap_add=["CAP_SYS_ADMIN"])
    assert cmd[:6] == ["buildah", "run", "--isolation", "chroot", "--network", "host"]
    assert cmd[-4:] == ["ctr", "--", "echo", "--flag"]
    for pair in (["--user", "10001:10001"], ["--env", "A=1"], ["--volume", "/host/data:/data:ro"],
                 ["--workingdir", "/app"], ["--cap-add", "CAP_SYS_ADMIN"]):
        assert pair == cmd[cmd.index(pair[0]):][:2]


PASSWD = ("root:x:0:0:root:/root:/bin/bash\n"
          "resultstore:x:10001:10001::/nonexistent:/usr/sbin/nologin\n")
GROUP = "root:x:0:\nresultstore:x:10001:\n"


@pytest.mark.parametrize(("user", "expected"), [
    ("10001", (10001, 10001)), ("resultstore", (10001, 10001)), ("10001:10001", (10001, 10001)),
    ("0", (0, 0)), ("12345", (12345, 0)), ("12345:23456", (12345, 23456)),
    ("resultstore:root", (10001, 0)),
])
def test_resolve_user(user: str, expected: tuple[int, int]) -> None:
    assert image.resolve_user(user, PASSWD, GROUP) == expected


def test_resolve_user_rejects_unknown_names() -> None:
    with pytest.raises(ValueError):
        image.resolve_user("nobody", PASSWD, GROUP)
    with pytest.raises(ValueError):
        image.resolve_user("10001:nogroup", PASSWD, GROUP)


def test_read_only_wrapper_remounts_then_drops_privileges() -> None:
    cmd = image.read_only_wrapper(10001, 10001, ["resultstore-operator", "--help"])
    assert cmd[:2] == ["/bin/sh", "-c"]
    assert cmd[2].startswith("mount -o remount,bind,ro /")
    assert "--bounding-set=-all" in cmd[2] and "exec setpriv" in cmd[2]
    assert cmd[3:] == ["resultstore-ro", "10001", "10001", "resultstore-operator", "--help"]


def test_archive_names() -> None:
    targets = image.Targets("0.1.0")
    reference = targets.archive_reference(targets.operator)
    assert reference == "docker.io/library/celery-resultstore:0.1.0"


@pytest.mark.parametrize("path,expected", [
    ("/var/run/secrets/kubernetes.io/serviceaccount", "/run/secrets/kubernetes.io/serviceaccount"),
    ("/var/run/resultstore/orders", "/run/resultstore/orders"),
    ("/var/lock/x", "/run/lock/x"),
    ("/var/runner", "/var/runner"),
    ("/app", "/app"),
])
def test_mount_targets_resolve_the_images_absolute_symlinks(path: str, expected: str) -> None:
    from resultstore_devtools.image import Volume, container_path

    assert container_path(path) == expected
    assert Volume(Path("/h"), path, True).flag() == f"/h:{expected}:ro"
