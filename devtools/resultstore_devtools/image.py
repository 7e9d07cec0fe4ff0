"""The container image: build it, run commands in it and verify it, with or without Docker.

Why this exists: the Dockerfile is what users build, so it must be built and exercised
here too, but these machines have no Docker engine and no registry access (only PyPI, the
Debian mirrors, the Go module proxy and npm). What they do have is Debian's buildah (and
debootstrap) and root with namespaces, but without CAP_SYS_RESOURCE, so OCI runtimes (crun,
runc, and so ``podman run``) fail on setrlimit; ``buildah run --isolation chroot`` works.

* ``base``: ``python:3.11-slim-bookworm`` cannot be pulled, so a stand-in is made from
  Debian bookworm with debootstrap (``--variant=minbase`` plus python3, python3-venv and
  ca-certificates, upgraded from bookworm-updates and bookworm-security). To behave like the
  official image for our Dockerfile, ``/usr/local`` *is* a Python virtual environment: the
  official image installs its own Python under ``/usr/local``, so ``python``, ``pip`` and
  console scripts land in ``/usr/local/bin`` (first on PATH) and packages in
  ``/usr/local/lib/python3.11/site-packages``, exactly where the Dockerfile expects them.
  Debian's own interpreter stays "externally managed" (PEP 668) for Debian's packages; we do
  not delete that marker, we simply never pip-install into the system interpreter. The
  rootfs tarball is cached under ``~/.cache/celery-resultstore/images/`` keyed by a hash of
  every input (suite, packages, mirror, recipe), so later runs only import it (seconds).
* ``build``: ``buildah bud`` of both targets (``docker build`` when a Docker engine
  answers), with layer caching. buildah keeps its images in a storage root of this project
  (``~/.cache/celery-resultstore/containers/<driver>``), not the machine-wide one: it must
  not collide with other users of ``/var/lib/containers`` and can use the overlay driver,
  which starts a container in ~0.03 s, where vfs copies the whole 400 MB image (~25 s).
  vfs is the fallback when the kernel refuses an overlay mount.
* ``run`` / :func:`run_in_image`: one command in a fresh container of an image, host
  network (loopback services reachable), optional user, environment, volumes and a
  read-only root; the container is removed when the command ends. The stand-in kubelet uses
  it to run pods in the real image.
* ``verify``: the entry points start, the operator extra is absent from the worker image,
  the default user is 10001, the root filesystem can be read-only, and the sizes.
* ``export``: ``docker-archive`` (or ``oci-archive``) files for ``kind load image-archive``.

Settings come from the environment once (:class:`Settings`).
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .procs import pid_alive

ROOT = Path(__file__).resolve().parents[2]

OFFICIAL_PYTHON_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
STANDIN_PYTHON_IMAGE = "localhost/resultstore-python:3.11-bookworm"
OPERATOR_REPOSITORY = "celery-resultstore"
WORKER_REPOSITORY = "celery-resultstore-worker"
IMAGE_USER = "10001:10001"

DEBIAN_SUITE = "bookworm"
DEBIAN_FALLBACK_MIRROR = "http://deb.debian.org/debian"
DEBIAN_FALLBACK_SECURITY = "http://deb.debian.org/debian-security"
# python3-venv brings ensurepip's pip and setuptools wheels; ca-certificates is what the
# official image ships for TLS. passwd (groupadd/useradd) is Priority: required, so minbase
# already has it.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# Bump when the recipe below changes in a way the other inputs do not capture.
BASE_RECIPE_VERSION = "2"
BASE_KEY_LABEL = "dev.resultstore.base-key"
CONTEXT_KEY_LABEL = "dev.resultstore.context-key"
BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
# pip inside the venv uses its vendored certifi bundle; the official image's Python does the
# same. Pointing it at the system store instead lets a build trust whatever the build host
# mounts there (see CA_BUNDLE_TARGET); with Debian's stock bundle it changes nothing.
PIP_CONF = "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"
CA_BUNDLE_TARGET = "/etc/ssl/certs/ca-certificates.crt"
CA_BUNDLE_CANDIDATES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")

RUN_PREFIX = "resultstore-run-"
PULL_TIMEOUT = 60.0  # seconds; a registry that does not answer must not stall every build

Engine = Literal["auto", "docker", "buildah"]
Driver = Literal["auto", "overlay", "vfs"]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Settings:
    """Read once from the environment.

    ``RESULTSTORE_CACHE_DIR`` moves the cache (default ``~/.cache/celery-resultstore``, the
    same as the control-plane binaries). ``RESULTSTORE_IMAGE_ENGINE``: ``auto`` (Docker when
    ``docker info`` answers, else buildah), ``docker`` or ``buildah``.
    ``RESULTSTORE_IMAGE_STORAGE_DRIVER``: ``auto`` (overlay when the kernel allows it, else
    vfs), ``overlay`` or ``vfs``. ``RESULTSTORE_PYTHON_IMAGE`` forces the base image.
    The CA bundle mounted into build steps is the first of ``PIP_CERT``, ``SSL_CERT_FILE``,
    ``REQUESTS_CA_BUNDLE`` and the usual system paths that exists: a build host behind a
    TLS-intercepting proxy trusts its own CA, and so must pip inside the build.
    """

    cache_dir: Path
    engine: Engine
    driver: Driver
    python_image: str | None
    ca_bundle: Path | None

    @classmethod
    def from_env(cls) -> Settings:
        raw = os.environ.get("RESULTSTORE_CACHE_DIR")
        base = Path(raw).expanduser() if raw else Path.home() / ".cache" / "celery-resultstore"
        engine = os.environ.get("RESULTSTORE_IMAGE_ENGINE", "auto")
        if engine not in ("auto", "docker", "buildah"):
            raise ValueError(f"RESULTSTORE_IMAGE_ENGINE must be auto, docker or buildah, "
                             f"not {engine!r}")
        driver = os.environ.get("RESULTSTORE_IMAGE_STORAGE_DRIVER", "auto")
        if driver not in ("auto", "overlay", "vfs"):
            raise ValueError(f"RESULTSTORE_IMAGE_STORAGE_DRIVER must be auto, overlay or vfs, "
                             f"not {driver!r}")
        candidates = [os.environ.get(name) for name in
                      ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")]
        bundle = next((Path(c) for c in [*candidates, *CA_BUNDLE_CANDIDATES]
                       if c and Path(c).is_file()), None)
        return cls(cache_dir=base, engine=engine,  # type: ignore[arg-type]
                   driver=driver,  # type: ignore[arg-type]
                   python_image=os.environ.get("RESULTSTORE_PYTHON_IMAGE") or None,
                   ca_bundle=bundle)


@functools.cache
def settings() -> Settings:
    return Settings.from_env()


# --------------------------------------------------------------------------------------------
# Pure helpers: names, inputs and their hash, command lines.
# --------------------------------------------------------------------------------------------


def project_version(root: Path = ROOT) -> str:
    """The image tag: [project].version (the Dockerfile's RESULTSTORE_VERSION must match)."""
    version: str = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    return version


@dataclass(frozen=True)
class Targets:
    """The two images the Dockerfile produces, as buildah names them."""

    version: str

    @property
    def operator(self) -> str:
        return f"localhost/{OPERATOR_REPOSITORY}:{self.version}"

    @property
    def worker(self) -> str:
        return f"localhost/{WORKER_REPOSITORY}:{self.version}"

    def archive_reference(self, image: str) -> str:
        """What an exported archive is tagged as: ``celery-resultstore:0.1.0`` for the
        cluster, i.e. docker.io/library/..., which is what the manifests' short name means."""
        repository = image.removeprefix("localhost/")
        return f"docker.io/library/{repository}"


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]


def parse_apt_sources(text: str) -> list[AptSource]:
    """Both the one-line ``deb URI SUITE COMPONENTS`` and the deb822 ``.sources`` format."""
    sources: list[AptSource] = []
    if re.search(r"^\s*URIs:", text, re.MULTILINE | re.IGNORECASE):
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.lstrip().startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "deb").split():
                continue
            for uri in fields.get("uris", "").split():
                sources.append(AptSource(uri, tuple(fields.get("suites", "").split())))
        return sources
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "deb":
            rest = [p for p in parts[1:] if not p.startswith("[")]
            # skip an options block like [arch=amd64 signed-by=...]
            if parts[1].startswith("["):
                closing = next(i for i, p in enumerate(parts) if p.endswith("]"))
                rest = parts[closing + 1:]
            if len(rest) >= 2:
                sources.append(AptSource(rest[0], (rest[1],)))
    return sources


def debian_mirrors(sources: Sequence[AptSource], suite: str = DEBIAN_SUITE) -> tuple[str, str]:
    """(archive mirror, security mirror) for ``suite`` from this machine's apt sources.

    Using the machine's own mirror is what makes debootstrap work where only the configured
    Debian mirror is reachable; deb.debian.org is the fallback.
    """
    archive = next((s.uri for s in sources if suite in s.suites), DEBIAN_FALLBACK_MIRROR)
    security = next((s.uri for s in sources if f"{suite}-security" in s.suites),
                    DEBIAN_FALLBACK_SECURITY)
    return archive.rstrip("/"), security.rstrip("/")


def base_sources_list(archive: str, security: str, suite: str = DEBIAN_SUITE) -> str:
    return (f"deb {archive} {suite} main\n"
            f"deb {archive} {suite}-updates main\n"
            f"deb {security} {suite}-security main\n")


def base_inputs(archive: str, security: str, arch: str) -> dict[str, Any]:
    """Everything that decides the stand-in base's content (and so its cache key)."""
    return {
        "suite": DEBIAN_SUITE,
        "variant": "minbase",
        "packages": list(BASE_PACKAGES),
        "archive": archive,
        "security": security,
        "arch": arch,
        "recipe": BASE_RECIPE_VERSION,
        "pip_conf": PIP_CONF,
        "env": BASE_ENV,
    }


def base_key(inputs: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def storage_flags(root: Path, runroot: Path, driver: str) -> list[str]:
    return ["--root", str(root), "--runroot", str(runroot), "--storage-driver", driver]


def bud_command(
    storage: Sequence[str], context: Path, tag: str, python_image: str, version: str,
    target: str | None, ca_bundle: Path | None, label: str | None = None,
) -> list[str]:
    """``buildah bud`` for one target.

    chroot isolation because OCI runtimes cannot start here; host network so the builder's
    ``pip wheel`` reaches the index; ``--layers`` so an unchanged stage is reused;
    ``--pull=false`` pulls the base only when it is not in the store (the stand-in never is
    in a registry). No ``--layers``: see :func:`context_key`. The CA bundle mount is a
    build-time volume: it is not committed.
    """
    cmd = ["buildah", *storage, "bud", "--isolation", "chroot", "--network", "host",
           "--pull=false",
           "--build-arg", f"PYTHON_IMAGE={python_image}",
           "--build-arg", f"RESULTSTORE_VERSION={version}",
           "-f", str(context / "Dockerfile"), "-t", tag]
    if target:
        cmd += ["--target", target]
    if ca_bundle is not None:
        cmd += ["-v", f"{ca_bundle}:{CA_BUNDLE_TARGET}:ro"]
    if label is not None:
        cmd += ["--label", f"{CONTEXT_KEY_LABEL}={label}"]
    return [*cmd, str(context)]


def docker_build_command(context: Path, tag: str, python_image: str, version: str,
                         target: str | None) -> list[str]:
    cmd = ["docker", "build", "--build-arg", f"PYTHON_IMAGE={python_image}",
           "--build-arg", f"RESULTSTORE_VERSION={version}", "-t", tag]
    if target:
        cmd += ["--target", target]
    return [*cmd, str(context)]


def context_files(root: Path, dockerignore: str) -> list[Path]:
    """The files ``docker build`` would send, for our allow-list style .dockerignore.

    Supports what the project's .dockerignore uses: ``**`` first, ``!path`` to let a file or
    folder in, and ``**/name`` or ``**/*.ext`` patterns to leave things out again.
    """
    allowed: list[str] = []
    excluded: list[str] = []
    for raw in dockerignore.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line == "**":
            continue
        if line.startswith("!"):
            allowed.append(line[1:].strip("/"))
        else:
            excluded.append(line.rstrip("/").removeprefix("**/"))
    files: list[Path] = []
    for entry in allowed:
        base = root / entry
        candidates = [base] if base.is_file() else sorted(p for p in base.rglob("*")
                                                          if p.is_file())
        for path in candidates:
            parts = path.relative_to(root).parts
            if any(fnmatch.fnmatch(part, pattern) for part in parts for pattern in excluded):
                continue
            files.append(path)
    return sorted(set(files))


def context_key(root: Path, extra: Mapping[str, str]) -> str:
    """Hash of the Dockerfile, the build context and ``extra`` (base image id, version).

    The images carry it as a label, so an unchanged tree is not rebuilt. buildah's own
    ``--layers`` cache cannot be used for that: buildah <= 1.28 loses ``RUN --mount=from=``
    sources of a cached stage (containers/buildah#4375) and reuses such a RUN layer even
    when that stage changed (containers/buildah#4522), i.e. it would build stale images.
    """
    digest = hashlib.sha256()
    for name, value in sorted(extra.items()):
        digest.update(f"{name}={value}\0".encode())
    dockerignore = (root / ".dockerignore").read_text()
    for path in [root / "Dockerfile", root / ".dockerignore",
                 *context_files(root, dockerignore)]:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Volume:
    host: Path
    container: str
    read_only: bool = False

    @classmethod
    def parse(cls, text: str) -> Volume:
        """``HOST:CONTAINER[:ro|:rw]`` as in ``docker run -v``."""
        parts = text.split(":")
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            return cls(Path(parts[0]), parts[1], parts[2] == "ro")
        if len(parts) == 2:
            return cls(Path(parts[0]), parts[1])
        raise ValueError(f"expected HOST:CONTAINER[:ro], got {text!r}")

    def flag(self) -> str:
        return f"{self.host}:{container_path(self.container)}" + (
            ":ro" if self.read_only else "")


# Debian-based images make these absolute symlinks. With chroot isolation buildah resolves a
# volume target's symlinks against the *host's* root, so /var/run/secrets/... would create
# directories under the host's /run and the mount would not appear in the container.
_IMAGE_SYMLINKS = (("/var/run/", "/run/"), ("/var/lock/", "/run/lock/"))


def container_path(path: str) -> str:
    """A mount target with the image's well-known absolute symlinks resolved (pure)."""
    for link, target in _IMAGE_SYMLINKS:
        if path == link.rstrip("/") or path.startswith(link):
            return target + path[len(link):]
    return path


def split_user(user: str) -> tuple[str, str | None]:
    name, sep, group = user.partition(":")
    return name, (group if sep else None)


def resolve_user(user: str, passwd_text: str, group_text: str) -> tuple[int, int]:
    """Numeric (uid, gid) for ``user[:group]`` using the image's own /etc/passwd and group.

    A uid without a group takes the passwd entry's group, else 0 (what Docker does).
    """
    name, group = split_user(user)
    entries = [line.split(":") for line in passwd_text.splitlines() if line.count(":") >= 6]
    by_name = {e[0]: e for e in entries}
    by_uid = {e[2]: e for e in entries}
    if name.isdigit():
        uid = int(name)
        entry = by_uid.get(name)
    elif name in by_name:
        entry = by_name[name]
        uid = int(entry[2])
    else:
        raise ValueError(f"user {name!r} is not in the image's /etc/passwd")
    if group is None:
        return uid, int(entry[3]) if entry else 0
    if group.isdigit():
        return uid, int(group)
    groups = {g[0]: g for g in (line.split(":") for line in group_text.splitlines())
              if len(g) >= 3}
    if group not in groups:
        raise ValueError(f"group {group!r} is not in the image's /etc/group")
    return uid, int(groups[group][2])


def read_only_wrapper(uid: int, gid: int, command: Sequence[str]) -> list[str]:
    """Make / read-only inside the container, then become uid:gid with no capabilities.

    ``buildah run`` has no read-only root option, and a read-only bind of the rootfs made
    from outside fails: buildah creates its mount points (``/run/.containerenv``, volume
    targets) in the rootfs first. So the container starts as root with CAP_SYS_ADMIN, and
    its first process remounts its own root (a bind mount in the container's private mount
    namespace) read-only, then execs the command through ``setpriv`` with every capability
    and the bounding set dropped. The kernel enforces the read-only mount from then on;
    needs ``mount`` and ``setpriv`` (util-linux, in every Debian-based image) in the image.
    """
    script = ('mount -o remount,bind,ro / || exit 125; u="$1"; g="$2"; shift 2; '
              'exec setpriv --reuid="$u" --regid="$g" --clear-groups --inh-caps=-all '
              '--bounding-set=-all -- "$@"')
    return ["/bin/sh", "-c", script, "resultstore-ro", str(uid), str(gid), *command]


def run_command(
    storage: Sequence[str], container: str, command: Sequence[str],
    env: Mapping[str, str], user: str | None, volumes: Sequence[Volume], workdir: str | None,
    cap_add: Sequence[str] = (),
) -> list[str]:
    cmd = ["buildah", *storage, "run", "--isolation", "chroot", "--network", "host"]
    for cap in cap_add:
        cmd += ["--cap-add", cap]
    if user is not None:
        cmd += ["--user", user]
    for key, value in env.items():
        cmd += ["--env", f"{key}={value}"]
    for volume in volumes:
        cmd += ["--volume", volume.flag()]
    if workdir is not None:
        cmd += ["--workingdir", workdir]
    return [*cmd, container, "--", *command]


# --------------------------------------------------------------------------------------------
# Side effects: storage, the base, builds, containers.
# --------------------------------------------------------------------------------------------


def _stderr_progress(message: str) -> None:
    print(f"[resultstore-image] {message}", file=sys.stderr, flush=True)


@contextmanager
def _lock(cache_dir: Path, name: str) -> Iterator[None]:
    """Serialise base and image builds between concurrent sessions (tests, CI steps)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def engine() -> Literal["docker", "buildah"]:
    chosen = settings().engine
    if chosen == "auto":
        return "docker" if docker_available() else "buildah"
    return chosen


def _overlay_mounts(scratch: Path) -> bool:
    """Can this kernel/namespace mount overlayfs (the fast buildah storage driver)?"""
    dirs = {name: scratch / name for name in ("lower", "upper", "work", "merged")}
    try:
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
        mounted = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts,
                                  str(dirs["merged"])], capture_output=True, timeout=20)
        if mounted.returncode != 0:
            return False
        subprocess.run(["umount", str(dirs["merged"])], capture_output=True, timeout=20)
        return True
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@functools.cache
def storage() -> list[str]:
    """buildah's global storage flags for this project's store (decided once per process).

    The run root holds mount and lock state that must not survive a reboot, so it goes to
    /run (a tmpfs) when writable.
    """
    conf = settings()
    driver = conf.driver
    if driver == "auto":
        probe = conf.cache_dir / "containers" / f".overlay-probe-{os.getpid()}"
        driver = "overlay" if _overlay_mounts(probe) else "vfs"
    root = conf.cache_dir / "containers" / driver
    run_base = Path("/run") if os.access("/run", os.W_OK) else conf.cache_dir / "containers"
    runroot = run_base / f"celery-resultstore-containers-{driver}"
    root.mkdir(parents=True, exist_ok=True)
    runroot.mkdir(parents=True, exist_ok=True)
    return storage_flags(root, runroot, driver)


def buildah(*args: str, check: bool = True, timeout: float = 600) -> str:
    """One buildah call against the project store; its stdout."""
    result = subprocess.run(["buildah", *storage(), *args], capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args)} failed (exit {result.returncode}):\n"
                           f"{result.stderr.strip()}")
    return result.stdout


def image_exists(image: str) -> bool:
    result = subprocess.run(["buildah", *storage(), "inspect", "--type", "image", image],
                            capture_output=True, timeout=120)
    return result.returncode == 0


def image_label(image: str, label: str) -> str | None:
    if not image_exists(image):
        return None
    data = json.loads(buildah("inspect", "--type", "image", image))
    labels = (data.get("OCIv1", {}).get("config", {}) or {}).get("Labels") or {}
    value = labels.get(label)
    return str(value) if value is not None else None


def _machine_sources() -> list[AptSource]:
    texts: list[str] = []
    main = Path("/etc/apt/sources.list")
    if main.is_file():
        texts.append(main.read_text())
    extra = Path("/etc/apt/sources.list.d")
    if extra.is_dir():
        texts += [p.read_text() for p in sorted(extra.iterdir())
                  if p.suffix in (".list", ".sources")]
    return [source for text in texts for source in parse_apt_sources(text)]


def _dpkg_arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()


def _run_logged(cmd: Sequence[str], what: str, env: Mapping[str, str] | None = None,
                timeout: float = 1800) -> None:
    """Run a long step; on failure, the last lines of its output are the error."""
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        raise RuntimeError(f"{what} failed (exit {result.returncode}):\n{tail}")


DPKG_EXCLUDES = """\
# Like Debian's slim images: packages installed later leave out docs and translations too.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""


def _slim(rootfs: Path) -> None:
    """Drop what the official slim images leave out: apt's package caches and indexes
    (~120 MB after an update), docs except copyright files, man pages, translations, logs;
    and the build host's resolver config (the container runtime provides its own)."""
    (rootfs / "etc/dpkg/dpkg.cfg.d/resultstore-slim").write_text(DPKG_EXCLUDES)
    doomed: list[Path] = []
    for pattern in ("var/cache/apt/*.bin", "var/cache/apt/archives/*.deb",
                    "var/lib/apt/lists/*", "usr/share/man/*", "usr/share/info/*",
                    "var/log/*.log", "var/log/apt/*", "etc/resolv.conf", "etc/hostname"):
        doomed += rootfs.glob(pattern)
    doomed += [p for p in rootfs.glob("usr/share/locale/*") if p.name != "locale.alias"]
    doomed += [p for p in rootfs.glob("usr/share/doc/*/*") if p.name != "copyright"]
    for path in doomed:
        if path.name == "lock" or path.name == "partial":
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def build_base_rootfs(archive: str, security: str, tarball: Path, progress: Progress) -> None:
    """debootstrap + security updates + the /usr/local venv, packed as a tarball."""
    for tool in ("debootstrap", "chroot", "tar"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: apt-get install debootstrap")
    if os.geteuid() != 0:
        raise RuntimeError("debootstrap needs root")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=tarball.parent))
    rootfs = work / "rootfs"
    apt_env = {"DEBIAN_FRONTEND": "noninteractive"}
    try:
        started = time.monotonic()
        progress(f"debootstrap {DEBIAN_SUITE} (minbase + {', '.join(BASE_PACKAGES)}) "
                 f"from {archive}")
        _run_logged(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                     DEBIAN_SUITE, str(rootfs), archive], "debootstrap")
        progress(f"debootstrap done in {time.monotonic() - started:.0f}s; applying updates")
        (rootfs / "etc/apt/sources.list").write_text(base_sources_list(archive, security))
        _run_logged(["chroot", str(rootfs), "apt-get", "-q", "update"], "apt-get update",
                    apt_env)
        _run_logged(["chroot", str(rootfs), "apt-get", "-q", "-y", "upgrade"],
                    "apt-get upgrade", apt_env)
        progress("creating the /usr/local virtual environment")
        _run_logged(["chroot", str(rootfs), "python3", "-m", "venv", "/usr/local"],
                    "python3 -m venv /usr/local")
        (rootfs / "etc/pip.conf").write_text(PIP_CONF)
        _slim(rootfs)
        staging = tarball.with_name(tarball.name + ".tmp")
        _run_logged(["tar", "-C", str(rootfs), "--numeric-owner", "--xattrs", "-czf",
                     str(staging), "."], "tar")
        os.replace(staging, tarball)
        progress(f"rootfs cached at {tarball} ({tarball.stat().st_size / 1e6:.0f} MB) "
                 f"after {time.monotonic() - started:.0f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_base(progress: Progress | None = None, rebuild: bool = False) -> str:
    """The stand-in ``python:3.11-slim-bookworm`` in the project store; returns its name.

    Cheap when current: the image carries its input hash as a label, so an unchanged recipe
    costs one ``buildah inspect``; a missing image with a cached tarball costs an import.
    """
    report = progress or _stderr_progress
    conf = settings()
    archive, security = debian_mirrors(_machine_sources())
    key = base_key(base_inputs(archive, security, _dpkg_arch()))
    if not rebuild and image_label(STANDIN_PYTHON_IMAGE, BASE_KEY_LABEL) == key:
        return STANDIN_PYTHON_IMAGE
    with _lock(conf.cache_dir, "image-base"):
        if not rebuild and image_label(STANDIN_PYTHON_IMAGE, BASE_KEY_LABEL) == key:
            return STANDIN_PYTHON_IMAGE
        tarball = conf.cache_dir / "images" / f"resultstore-python-3.11-{DEBIAN_SUITE}-{key}.tgz"
        if rebuild or not tarball.is_file():
            build_base_rootfs(archive, security, tarball, report)
        started = time.monotonic()
        container = buildah("from", "scratch").strip()
        try:
            buildah("add", container, str(tarball), "/")
            config = ["config", "--cmd", "python3", "--label", f"{BASE_KEY_LABEL}={key}"]
            for name, value in BASE_ENV.items():
                config += ["--env", f"{name}={value}"]
            buildah(*config, container)
            buildah("commit", "--quiet", container, STANDIN_PYTHON_IMAGE)
        finally:
            buildah("rm", container, check=False)
        report(f"{STANDIN_PYTHON_IMAGE} imported in {time.monotonic() - started:.1f}s")
    return STANDIN_PYTHON_IMAGE


def python_image(progress: Progress) -> str:
    """The base for the buildah path: forced, official if in the store or pullable, else
    the stand-in. A refused pull (no registry access) fails fast, so trying costs little."""
    forced = settings().python_image
    if forced:
        return forced
    if image_exists(OFFICIAL_PYTHON_IMAGE):
        return OFFICIAL_PYTHON_IMAGE
    try:
        pulled = subprocess.run(["buildah", *storage(), "pull", "--quiet",
                                 OFFICIAL_PYTHON_IMAGE], capture_output=True, text=True,
                                timeout=PULL_TIMEOUT)
        if pulled.returncode == 0:
            return OFFICIAL_PYTHON_IMAGE
        reason = (pulled.stderr.strip().splitlines() or ["unknown error"])[-1]
    except subprocess.TimeoutExpired:
        reason = f"no answer in {PULL_TIMEOUT:.0f}s"
    progress(f"cannot pull {OFFICIAL_PYTHON_IMAGE} ({reason[:160]}); using the local stand-in")
    return ensure_base(progress)


@dataclass(frozen=True)
class BuildResult:
    engine: str
    python_image: str
    operator: str
    worker: str
    seconds: float


def build(progress: Progress | None = None, context: Path = ROOT,
          force: bool = False) -> BuildResult:
    """Both targets (skipped when the images already carry this context's key)."""
    report = progress or _stderr_progress
    version = project_version(context)
    targets = Targets(version)
    started = time.monotonic()
    if engine() == "docker":
        base = settings().python_image or OFFICIAL_PYTHON_IMAGE
        operator, worker = f"{OPERATOR_REPOSITORY}:{version}", f"{WORKER_REPOSITORY}:{version}"
        for tag, target in ((worker, "worker"), (operator, None)):
            report(f"docker build {tag}")
            subprocess.run(docker_build_command(context, tag, base, version, target),
                           check=True)
        return BuildResult("docker", base, operator, worker, time.monotonic() - started)
    if shutil.which("buildah") is None:
        raise RuntimeError("neither a Docker engine nor buildah: apt-get install buildah")
    base = python_image(report)
    base_id = json.loads(buildah("inspect", "--type", "image", base)).get("FromImageID", "")
    key = context_key(context, {"base": f"{base}@{base_id}", "version": version})
    with _lock(settings().cache_dir, "image-build"):
        for tag, target in ((targets.worker, "worker"), (targets.operator, None)):
            if not force and image_label(tag, CONTEXT_KEY_LABEL) == key:
                report(f"{tag} is current (context {key})")
                continue
            step = time.monotonic()
            report(f"buildah bud {tag} (base {base})")
            _run_logged(bud_command(storage(), context, tag, base, version, target,
                                    settings().ca_bundle, key), f"buildah bud {tag}")
            report(f"{tag} built in {time.monotonic() - step:.0f}s")
        # Rebuilds leave the previous images untagged; this store is ours, so drop them.
        buildah("rmi", "--prune", check=False)
    return BuildResult("buildah", base, targets.operator, targets.worker,
                       time.monotonic() - started)


def image_size(image: str) -> str:
    """Uncompressed size as ``buildah images`` reports it (e.g. ``506 MB``)."""
    rows = json.loads(buildah("images", "--json", image))
    return str(rows[0]["size"]) if rows else ""


def export(image: str, destination: Path, fmt: Literal["docker", "oci"] = "docker") -> Path:
    """An archive ``kind load image-archive`` / ``docker load`` / ``podman load`` accept."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists():
        destination.unlink()
    reference = Targets("").archive_reference(image)
    transport = "docker-archive" if fmt == "docker" else "oci-archive"
    buildah("push", "--quiet", image, f"{transport}:{destination}:{reference}")
    return destination


# Running commands in an image ----------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """What one supervised container run needs; JSON-serialisable (passed to the child)."""

    image: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    volumes: list[tuple[str, str, bool]] = field(default_factory=list)
    workdir: str | None = None
    read_only: bool = False
    storage: list[str] = field(default_factory=list)


def run_in_image(
    image: str,
    command: Sequence[str],
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    volumes: Sequence[Volume] = (),
    workdir: str | None = None,
    read_only: bool = False,
    **popen: Any,
) -> subprocess.Popen[Any]:
    """Start ``command`` in a fresh container of ``image``; the Popen is its supervisor.

    The supervisor (this module's ``_supervise`` entry, a child process) creates the
    container, runs the command with chroot isolation on the host network, forwards
    SIGTERM/SIGINT to the command itself (so a grace period means something: ``buildah
    run`` would SIGKILL it), exits with the command's status and removes the container.
    Containers whose supervisor died without cleaning up (SIGKILL) are removed by the next
    run. ``popen`` goes to :class:`subprocess.Popen` (stdout, stderr, ...).
    """
    spec = RunSpec(image=image, command=list(command), env=dict(env or {}), user=user,
                   volumes=[(str(v.host), v.container, v.read_only) for v in volumes],
                   workdir=workdir, read_only=read_only, storage=storage())
    return subprocess.Popen(
        [sys.executable, "-m", "resultstore_devtools.image", "_supervise",
         json.dumps(spec.__dict__)],
        **popen,
    )


def prune_orphans(storage_flags_: Sequence[str]) -> None:
    """Remove run containers whose supervisor is gone (killed before it could clean up)."""
    listed = subprocess.run(["buildah", *storage_flags_, "containers", "--json"],
                            capture_output=True, text=True, timeout=120)
    if listed.returncode != 0 or not listed.stdout.strip():
        return
    for row in json.loads(listed.stdout) or []:
        name = str(row.get("containername", ""))
        match = re.match(rf"^{RUN_PREFIX}(\d+)-", name)
        if match and not pid_alive(int(match.group(1))):
            subprocess.run(["buildah", *storage_flags_, "rm", name], capture_output=True,
                           timeout=120)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    queue = [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            out.append(child)
            queue.append(child)
    return out


def _container_process(runner: int) -> int | None:
    """The command's own process: the first descendant of ``buildah run`` that is not one of
    buildah's helpers (buildah-chroot-runtime, buildah-chroot-exec)."""
    for pid in _descendants(runner):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, UnicodeDecodeError):
            continue
        # The helpers are re-executions of buildah itself (comm "exe"); argv[0] names them.
        if argv0 and not Path(argv0).name.startswith("buildah"):
            return pid
    return None


def _set_parent_death_signal() -> None:
    """If the supervisor is SIGKILLed, ``buildah run`` gets SIGTERM and stops its child."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def supervise(spec: RunSpec) -> int:
    storage_ = spec.storage
    prune_orphans(storage_)
    name = f"{RUN_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    created = subprocess.run(["buildah", *storage_, "from", "--pull=false", "--name", name,
                              spec.image], capture_output=True, text=True, timeout=600)
    if created.returncode != 0:
        print(f"[resultstore-image] cannot create a container of {spec.image}: "
              f"{created.stderr.strip()}", file=sys.stderr, flush=True)
        return 125
    try:
        volumes = [Volume(Path(h), c, ro) for h, c, ro in spec.volumes]
        command, user = list(spec.command), spec.user
        if spec.read_only:
            if user is None:
                inspected = json.loads(subprocess.run(
                    ["buildah", *storage_, "inspect", "--type", "container", name],
                    capture_output=True, text=True, check=True, timeout=120).stdout)
                user = inspected.get("OCIv1", {}).get("config", {}).get("User") or "0"
            mount = subprocess.run(["buildah", *storage_, "mount", name], capture_output=True,
                                   text=True, check=True, timeout=120).stdout.strip()
            rootfs = Path(mount)
            uid, gid = resolve_user(user, (rootfs / "etc/passwd").read_text(),
                                    (rootfs / "etc/group").read_text())
            command = read_only_wrapper(uid, gid, command)
            user = "0:0"
        cmd = run_command(storage_, name, command, spec.env, user, volumes, spec.workdir,
                          cap_add=["CAP_SYS_ADMIN"] if spec.read_only else [])
        runner = subprocess.Popen(cmd, preexec_fn=_set_parent_death_signal)

        def forward(signum: int, _frame: object) -> None:
            target = _container_process(runner.pid)
            try:
                os.kill(target if target is not None else runner.pid, signum)
            except ProcessLookupError:
                pass

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, forward)
        return runner.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        subprocess.run(["buildah", *storage_, "rm", name], capture_output=True, timeout=600)


def run(image: str, command: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run to completion and capture the output (what ``verify`` uses)."""
    timeout = kwargs.pop("timeout", 300)
    proc = run_in_image(image, command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True, **kwargs)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# Verification --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def verify(operator: str, worker: str, scratch: Path | None = None) -> list[Check]:
    """What the manifests and the chart rely on, checked in the built images."""
    checks: list[Check] = []
    tmp = Path(tempfile.mkdtemp(prefix="resultstore-verify-", dir=scratch))
    tmp.chmod(0o1777)
    try:
        ro = {"read_only": True, "volumes": [Volume(tmp, "/tmp")]}

        def expect(name: str, image: str, command: Sequence[str], ok: Callable[
                [subprocess.CompletedProcess[str]], bool], **kwargs: Any) -> None:
            result = run(image, command, **kwargs)
            text = (result.stdout + result.stderr).strip()
            checks.append(Check(name, ok(result), text.splitlines()[0] if text else
                                f"exit {result.returncode}"))

        def succeeds(r: subprocess.CompletedProcess[str]) -> bool:
            return r.returncode == 0

        expect("operator: resultstore-operator --help (read-only root)", operator,
               ["resultstore-operator", "--help"], succeeds, **ro)
        expect("operator: resultstore --help (read-only root)", operator,
               ["resultstore", "--help"], succeeds, **ro)
        expect("operator: celery --version", operator, ["celery", "--version"], succeeds, **ro)
        expect("operator: imports resultstore_backend, resultstore_operator, kopf", operator,
               ["python", "-c", "import resultstore_backend, resultstore_operator, kopf; "
                "print('imports ok')"], succeeds, **ro)
        for label, image in (("operator", operator), ("worker", worker)):
            expect(f"{label}: default user is {IMAGE_USER}", image, ["id"],
                   lambda r: r.returncode == 0 and "uid=10001" in r.stdout
                   and "gid=10001" in r.stdout)
        expect("worker: celery --version", worker, ["celery", "--version"], succeeds, **ro)
        expect("worker: resultstore backend importable", worker,
               ["python", "-c", "import resultstore_backend; print('imports ok')"], succeeds,
               **ro)
        # The examples' broker: kombu's Redis transport needs redis and packaging.
        expect("worker: Redis broker transport importable", worker,
               ["python", "-c", "import kombu.transport.redis; print('imports ok')"],
               succeeds, **ro)
        expect("worker: kopf NOT importable", worker, ["python", "-c", "import kopf"],
               lambda r: r.returncode != 0 and "ModuleNotFoundError" in r.stderr)
        # The development tooling is its own distribution (devtools/pyproject.toml).
        for label, image in (("operator", operator), ("worker", worker)):
            expect(f"{label}: no development tooling (resultstore-dev, resultstore_devtools)",
                   image, ["sh", "-c", "! command -v resultstore-dev && ! python -c "
                           "'import resultstore_devtools' 2>/dev/null && echo no devtools"],
                   lambda r: r.returncode == 0 and "no devtools" in r.stdout, **ro)
        expect("operator: root filesystem really read-only", operator,
               ["sh", "-c", "touch /usr/local/x 2>&1; test ! -e /usr/local/x && "
                "touch /tmp/ok && echo read-only root, /tmp writable"],
               lambda r: r.returncode == 0 and "Read-only file system" in r.stdout, **ro)
        for label, image in (("operator", operator), ("worker", worker)):
            size = image_size(image)
            checks.append(Check(f"{label}: size", bool(size), f"{size} ({image})"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return checks


# CLI -----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m resultstore_devtools.image build|base|run|verify|export``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_supervise"]:
        data = json.loads(args[1])
        return supervise(RunSpec(**data))
    parser = argparse.ArgumentParser(prog="python -m resultstore_devtools.image",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="action", required=True)
    base_p = sub.add_parser("base", help="build or reuse the stand-in python base image")
    base_p.add_argument("--rebuild", action="store_true", help="ignore the cached rootfs")
    build_p = sub.add_parser("build", help="build both targets (docker or buildah)")
    build_p.add_argument("--force", action="store_true",
                         help="rebuild even when the images match the context")
    build_p.add_argument("--export", metavar="DIR", type=Path,
                         help="also write docker-archive files to DIR")
    run_p = sub.add_parser("run", help="run a command in an image (buildah, chroot)")
    run_p.add_argument("image")
    run_p.add_argument("--user")
    run_p.add_argument("--read-only", action="store_true")
    run_p.add_argument("--env", action="append", default=[], metavar="K=V")
    run_p.add_argument("--volume", "-v", action="append", default=[],
                       metavar="HOST:CONTAINER[:ro]")
    run_p.add_argument("--workdir")
    run_p.add_argument("command", nargs="*", help="after --")
    sub.add_parser("verify", help="check the built images (buildah)")
    export_p = sub.add_parser("export", help="write docker-archive (or OCI) files")
    export_p.add_argument("--dir", type=Path, default=ROOT / "dist" / "images")
    export_p.add_argument("--format", choices=("docker", "oci"), default="docker")
    # Everything after the first `--` is the command, options included.
    after = args.index("--") if "--" in args else len(args)
    ns = parser.parse_args(args[:after])
    if ns.action == "run":
        ns.command = [*ns.command, *args[after + 1:]]
    targets = Targets(project_version())

    if ns.action == "base":
        print(ensure_base(rebuild=ns.rebuild))
        return 0
    if ns.action == "build":
        result = build(force=ns.force)
        print(f"{result.operator}\n{result.worker}")
        _stderr_progress(f"{result.engine} build on {result.python_image} "
                         f"in {result.seconds:.0f}s")
        if ns.export and result.engine == "buildah":
            for image in (result.operator, result.worker):
                print(export(image, _archive_path(ns.export, image)))
        return 0
    if ns.action == "run":
        command = ns.command
        if not command:
            parser.error("run needs a command after --")
        env = dict(item.split("=", 1) for item in ns.env)
        proc = run_in_image(ns.image, command, env=env, user=ns.user,
                            volumes=[Volume.parse(v) for v in ns.volume], workdir=ns.workdir,
                            read_only=ns.read_only)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            return proc.wait()
    if ns.action == "verify":
        checks = verify(targets.operator, targets.worker)
        for check in checks:
            print(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
        return 0 if all(c.ok for c in checks) else 1
    if ns.action == "export":
        for image in (targets.operator, targets.worker):
            print(export(image, _archive_path(ns.dir, image), ns.format))
        return 0
    return 2


def _archive_path(directory: Path, image: str) -> Path:
    repository, _, tag = image.removeprefix("localhost/").partition(":")
    return directory / f"{repository}-{tag}.tar"


if __name__ == "__main__":
    raise SystemExit(main())
