"""Pinned Kubernetes control-plane binaries, obtained once and cached by version.

Why this exists: the e2e tests, the manifests, the chart and the demo must run against a
real kube-apiserver, but these machines have no container engine and no release downloads.
Only the Go module proxy, PyPI and Debian are reachable, and no package on PyPI or Debian
ships a current kube-apiserver. So we build from the module proxy:

* kube-apiserver, kube-controller-manager and kubectl come from ``k8s.io/kubernetes``. That
  module cannot be ``go install``-ed because its go.mod replaces the staging modules
  (``k8s.io/api``, ``k8s.io/client-go``, ...) with local paths. A throwaway module that
  requires ``k8s.io/kubernetes vX.Y.Z`` and replaces every staging module it requires with
  the published ``v0.Y.Z`` tag builds it. The staging list is taken from that version's own
  go.mod, so a version bump needs no code change.
* etcd comes from ``go.etcd.io/etcd/server/v3`` (its main package is the module root), built
  in a separate throwaway module so its dependency graph does not fight Kubernetes'.
* helm has no replace directives, so ``go install`` works.

For users with internet, an official release download is tried first with a short timeout;
CI (no internet) falls straight through to the proxy build. Binaries land in
``~/.cache/celery-resultstore/bin/<component>-<version>/`` (outside the repository, shared
by every checkout), so only the first start pays the multi-minute build.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# Pinned versions. etcd matches what Kubernetes 1.34 itself pins (go.etcd.io/etcd/* v3.6.4 in
# its go.mod, and build/dependencies.yaml); helm 3.19 is built against client-go 0.34.
KUBERNETES_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.4"
HELM_VERSION = "v3.19.5"

KUBERNETES_MODULE = "k8s.io/kubernetes"
ETCD_MODULE = "go.etcd.io/etcd/server/v3"
HELM_MODULE = "helm.sh/helm/v3"
KUBERNETES_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kubectl")
# The real node's binaries (resultstore_devtools.realnode): the same k8s.io/kubernetes build,
# built on demand only, so a control-plane-only machine never pays for them.
NODE_COMMANDS = ("kubelet", "kube-scheduler")

Source = Literal["auto", "download", "build"]
Progress = Callable[[str], None]

DOWNLOAD_TIMEOUT = 5.0  # seconds; a machine without internet must fall back quickly


@dataclass(frozen=True)
class Settings:
    """Read once from the environment.

    ``RESULTSTORE_CACHE_DIR`` moves the cache (default ``~/.cache/celery-resultstore``);
    ``RESULTSTORE_BINARIES_SOURCE`` is ``auto`` (try a release download, then build),
    ``download`` or ``build`` (what CI effectively gets, since it has no internet).
    """

    cache_dir: Path
    source: Source

    @classmethod
    def from_env(cls) -> Settings:
        raw = os.environ.get("RESULTSTORE_CACHE_DIR")
        base = Path(raw).expanduser() if raw else Path.home() / ".cache" / "celery-resultstore"
        source = os.environ.get("RESULTSTORE_BINARIES_SOURCE", "auto")
        if source not in ("auto", "download", "build"):
            raise ValueError(
                f"RESULTSTORE_BINARIES_SOURCE must be auto, download or build, not {source!r}"
            )
        return cls(cache_dir=base, source=source)  # type: ignore[arg-type]


@functools.cache
def settings() -> Settings:
    return Settings.from_env()


@dataclass(frozen=True)
class Binaries:
    """Absolute paths of the cached executables."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kubectl: Path
    helm: Path

    def all(self) -> dict[str, Path]:
        return {
            "etcd": self.etcd,
            "kube-apiserver": self.kube_apiserver,
            "kube-controller-manager": self.kube_controller_manager,
            "kubectl": self.kubectl,
            "helm": self.helm,
        }


# --------------------------------------------------------------------------------------------
# Pure helpers (unit tested): versions, go.mod text, ldflags, cache paths.
# --------------------------------------------------------------------------------------------

_SEMVER = re.compile(r"^v(\d+)\.(\d+)\.(\d+)$")


def parse_version(version: str) -> tuple[int, int, int]:
    match = _SEMVER.match(version)
    if not match:
        raise ValueError(f"expected a release version like v1.34.4, got {version!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch)


def staging_version(kubernetes_version: str) -> str:
    """k8s.io/kubernetes v1.Y.Z publishes its staging modules as v0.Y.Z."""
    _, minor, patch = parse_version(kubernetes_version)
    return f"v0.{minor}.{patch}"


def _gomod_entries(gomod_text: str, directive: str) -> list[str]:
    """Entries of ``directive ( ... )`` blocks and one-line ``directive x`` forms, sans comments."""
    entries: list[str] = []
    in_block = False
    for raw in gomod_text.splitlines():
        line = raw.split("//", 1)[0].strip()
        if not line:
            continue
        if in_block:
            if line == ")":
                in_block = False
            else:
                entries.append(line)
        elif line == f"{directive} (":
            in_block = True
        elif line.startswith(directive + " "):
            entries.append(line[len(directive) + 1 :].strip())
    return entries


def gomod_requirements(gomod_text: str) -> dict[str, str]:
    """Module path -> version from the require directives of a go.mod text."""
    result: dict[str, str] = {}
    for entry in _gomod_entries(gomod_text, "require"):
        parts = entry.split()
        if len(parts) >= 2:
            result[parts[0]] = parts[1]
    return result


def staging_modules(gomod_text: str) -> list[str]:
    """Staging modules that k8s.io/kubernetes both requires and replaces with a local path.

    Only required ones matter (and only those are published for every release: the sample
    plugins are replaced but not required, and the proxy does not have all of them).
    """
    required = gomod_requirements(gomod_text)
    staging: list[str] = []
    for entry in _gomod_entries(gomod_text, "replace"):
        left, sep, right = entry.partition("=>")
        if not sep:
            continue
        module = left.split()[0]
        target = right.split()[0]
        if target.startswith("./staging/") and module in required:
            staging.append(module)
    return sorted(staging)


def kubernetes_build_gomod(kubernetes_version: str, kubernetes_gomod: str) -> str:
    """The throwaway go.mod that makes k8s.io/kubernetes buildable outside its repository.

    The ``go`` and ``godebug`` lines are copied from Kubernetes' own go.mod: godebug defaults
    come from the *main* module, so without them the binaries would run with the build
    toolchain's defaults rather than the ones Kubernetes was released with.
    """
    staging = staging_modules(kubernetes_gomod)
    if not staging:
        raise ValueError("no staging replacements found in the k8s.io/kubernetes go.mod")
    target = staging_version(kubernetes_version)
    lines = ["module resultstore.local/kubernetes-build", ""]
    for directive in ("go", "godebug"):
        for value in _gomod_entries(kubernetes_gomod, directive):
            lines.append(f"{directive} {value}")
    lines += ["", f"require {KUBERNETES_MODULE} {kubernetes_version}", "", "replace ("]
    lines += [f"\t{module} => {module} {target}" for module in staging]
    lines += [")", ""]
    return "\n".join(lines)


def simple_build_gomod(name: str, module: str, version: str, upstream_gomod: str) -> str:
    """A throwaway go.mod requiring one module (used for etcd), keeping its go directive."""
    lines = [f"module resultstore.local/{name}-build", ""]
    lines += [f"go {value}" for value in _gomod_entries(upstream_gomod, "go")]
    lines += ["", f"require {module} {version}", ""]
    return "\n".join(lines)


def kubernetes_ldflags(kubernetes_version: str, build_date: str) -> list[str]:
    """Version stamps; without them /version says v0.0.0-master and Helm's kubeVersion breaks."""
    major, minor, _ = parse_version(kubernetes_version)
    values = {
        "gitVersion": kubernetes_version,
        "gitMajor": str(major),
        "gitMinor": str(minor),
        "gitTreeState": "clean",
        "buildDate": build_date,
    }
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {package}.{key}={value}" for key, value in values.items()]
    return flags


def etcd_ldflags() -> list[str]:
    return ["-s", "-w", "-X go.etcd.io/etcd/api/v3/version.GitSHA=modproxy"]


def helm_ldflags(helm_version: str, helm_gomod: str) -> list[str]:
    """Mirror helm's Makefile: version, and the default Kubernetes version for offline use.

    ``helm template`` without a cluster uses chartutil's default KubeVersion; the Makefile
    derives it from the client-go requirement (v0.34.x -> 1.34), so we do the same.
    """
    client_go = gomod_requirements(helm_gomod).get("k8s.io/client-go")
    flags = [
        "-s",
        "-w",
        f"-X helm.sh/helm/v3/internal/version.version={helm_version}",
        "-X helm.sh/helm/v3/internal/version.gitTreeState=clean",
    ]
    if client_go:
        major, minor, _ = parse_version(client_go.split("-")[0])
        for package in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
            flags += [
                f"-X {package}.k8sVersionMajor={major + 1}",
                f"-X {package}.k8sVersionMinor={minor}",
            ]
    return flags


def pinned_versions() -> dict[str, str]:
    return {
        "etcd": ETCD_VERSION,
        "kube-apiserver": KUBERNETES_VERSION,
        "kube-controller-manager": KUBERNETES_VERSION,
        "kubectl": KUBERNETES_VERSION,
        "helm": HELM_VERSION,
    }


def binary_path(cache_dir: Path, component: str, version: str) -> Path:
    return cache_dir / "bin" / f"{component}-{version}" / component


def cached_binaries(cache_dir: Path | None = None) -> Binaries:
    """Where the pinned binaries live (whether or not they exist yet)."""
    base = cache_dir if cache_dir is not None else settings().cache_dir
    paths = {name: binary_path(base, name, ver) for name, ver in pinned_versions().items()}
    return Binaries(
        etcd=paths["etcd"],
        kube_apiserver=paths["kube-apiserver"],
        kube_controller_manager=paths["kube-controller-manager"],
        kubectl=paths["kubectl"],
        helm=paths["helm"],
    )


def missing() -> list[str]:
    """Components not cached yet (cheap; used to decide whether a long build is coming)."""
    return [name for name, path in cached_binaries().all().items() if not _usable(path)]


def _usable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


# --------------------------------------------------------------------------------------------
# Side effects: lock, download, go build.
# --------------------------------------------------------------------------------------------


def _stderr_progress(message: str) -> None:
    print(f"[resultstore-binaries] {message}", file=sys.stderr, flush=True)


@contextmanager
def _cache_lock(cache_dir: Path) -> Iterator[None]:
    """Serialise builds between concurrent sessions (two pytest runs, CI steps, the demo)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _install(built: Path, destination: Path) -> None:
    """Atomic placement: a half-copied binary must never look cached."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.with_name(destination.name + ".tmp")
    shutil.copy2(built, staging)
    staging.chmod(0o755)
    os.replace(staging, destination)


def _go_binary() -> str:
    found = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists()
                                   else None)
    if not found:
        raise RuntimeError(
            "building the control-plane binaries needs a Go toolchain (go 1.24+) on PATH; "
            "install it from https://go.dev/dl or your distribution"
        )
    return found


def _go_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra or {})
    env["CGO_ENABLED"] = "0"  # static binaries; no C toolchain needed
    env.setdefault("GOFLAGS", "-buildvcs=false")
    if "-buildvcs" not in env["GOFLAGS"]:
        env["GOFLAGS"] += " -buildvcs=false"
    return env


def _run_go(args: Sequence[str], cwd: Path, progress: Progress, label: str) -> str:
    """Run a quick go command (mod download, get); fail with its output on error."""
    result = subprocess.run(
        [_go_binary(), *args], cwd=cwd, env=_go_env(), capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{label}: `go {' '.join(args)}` failed in {cwd} "
            f"(exit {result.returncode}):\n{result.stderr[-4000:]}"
        )
    return result.stdout


def _go_build_with_progress(
    args: Sequence[str],
    cwd: Path,
    progress: Progress,
    label: str,
    total: int,
    extra_env: dict[str, str] | None = None,
) -> None:
    """``go build -v`` prints each package it compiles; count them to show progress.

    Packages already in the Go build cache are not printed, so a rebuild finishes early
    and the percentage is only an upper-bound estimate; that is fine for a progress line.
    """
    started = time.monotonic()
    proc = subprocess.Popen(
        [_go_binary(), *args],
        cwd=cwd,
        env=_go_env(extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    tail: list[str] = []
    compiled = 0
    last_report = started
    for line in proc.stdout:
        line = line.rstrip()
        if re.match(r"^[\w.\-/]+$", line):
            compiled += 1
        else:
            tail.append(line)
            tail = tail[-60:]
        now = time.monotonic()
        if now - last_report >= 15:
            last_report = now
            share = f" (~{min(99, 100 * compiled // max(total, 1))}%)" if total else ""
            progress(f"{label}: compiled {compiled} packages{share}, {now - started:.0f}s elapsed")
    code = proc.wait()
    if code != 0:
        raise RuntimeError(
            f"{label}: `go {' '.join(args)}` failed in {cwd} (exit {code}):\n" + "\n".join(tail)
        )
    progress(f"{label}: built in {time.monotonic() - started:.0f}s")


def _module_download(module: str, version: str, workdir: Path) -> dict[str, str]:
    """``go mod download -json`` through the configured GOPROXY; returns paths to .mod/.info."""
    out = _run_go(["mod", "download", "-json", f"{module}@{version}"], workdir, _stderr_progress,
                  f"download {module}")
    info: dict[str, str] = json.loads(out)
    if info.get("Error"):
        raise RuntimeError(f"go mod download {module}@{version}: {info['Error']}")
    return info


def _release_time(info: dict[str, str]) -> str:
    info_file = info.get("Info")
    if info_file and Path(info_file).exists():
        stamp = json.loads(Path(info_file).read_text()).get("Time")
        if isinstance(stamp, str):
            return stamp
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _count_packages(workdir: Path, packages: Sequence[str]) -> int:
    try:
        out = _run_go(["list", "-deps", *packages], workdir, _stderr_progress, "go list")
    except RuntimeError:
        return 0
    return len(out.split())


def build_kubernetes(cache_dir: Path, progress: Progress,
                     commands: Sequence[str] = KUBERNETES_COMMANDS) -> None:
    version = KUBERNETES_VERSION
    workdir = cache_dir / "build" / f"kubernetes-{version}"
    workdir.mkdir(parents=True, exist_ok=True)
    progress(f"kubernetes {version}: fetching k8s.io/kubernetes through the Go module proxy")
    info = _module_download(KUBERNETES_MODULE, version, workdir.parent)
    gomod_text = Path(info["GoMod"]).read_text()
    (workdir / "go.mod").write_text(kubernetes_build_gomod(version, gomod_text))
    packages = [f"{KUBERNETES_MODULE}/cmd/{name}" for name in commands]
    progress(f"kubernetes {version}: resolving dependencies (go get)")
    _run_go(["get", *(f"{p}@{version}" for p in packages)], workdir, progress, "go get")
    total = _count_packages(workdir, packages)
    out_dir = workdir / "out"
    out_dir.mkdir(exist_ok=True)
    progress(
        f"kubernetes {version}: compiling {', '.join(commands)} "
        f"({total or 'many'} packages; the first build takes several minutes)"
    )
    ldflags = " ".join(kubernetes_ldflags(version, _release_time(info)))
    _go_build_with_progress(
        ["build", "-v", "-trimpath", "-ldflags", ldflags, "-o", str(out_dir) + "/", *packages],
        workdir,
        progress,
        f"kubernetes {version}",
        total,
    )
    for name in commands:
        _install(out_dir / name, binary_path(cache_dir, name, version))


def ensure_node(progress: Progress | None = None) -> dict[str, Path]:
    """kubelet and kube-scheduler of the pinned version, built once (same module build)."""
    report = progress or _stderr_progress
    conf = settings()
    paths = {name: binary_path(conf.cache_dir, name, KUBERNETES_VERSION) for name in NODE_COMMANDS}
    if all(_usable(path) for path in paths.values()):
        return paths
    with _cache_lock(conf.cache_dir):
        absent = [name for name, path in paths.items() if not _usable(path)]
        if absent:
            build_kubernetes(conf.cache_dir, report, absent)
    return paths


def build_etcd(cache_dir: Path, progress: Progress) -> None:
    version = ETCD_VERSION
    workdir = cache_dir / "build" / f"etcd-{version}"
    workdir.mkdir(parents=True, exist_ok=True)
    progress(f"etcd {version}: fetching {ETCD_MODULE} through the Go module proxy")
    info = _module_download(ETCD_MODULE, version, workdir.parent)
    upstream = Path(info["GoMod"]).read_text()
    (workdir / "go.mod").write_text(simple_build_gomod("etcd", ETCD_MODULE, version, upstream))
    _run_go(["get", f"{ETCD_MODULE}@{version}"], workdir, progress, "go get etcd")
    total = _count_packages(workdir, [ETCD_MODULE])
    out = workdir / "out" / "etcd"
    out.parent.mkdir(exist_ok=True)
    _go_build_with_progress(
        ["build", "-v", "-trimpath", "-ldflags", " ".join(etcd_ldflags()), "-o", str(out),
         ETCD_MODULE],
        workdir,
        progress,
        f"etcd {version}",
        total,
    )
    _install(out, binary_path(cache_dir, "etcd", version))


def build_helm(cache_dir: Path, progress: Progress) -> None:
    version = HELM_VERSION
    workdir = cache_dir / "build" / f"helm-{version}"
    workdir.mkdir(parents=True, exist_ok=True)
    progress(f"helm {version}: go install {HELM_MODULE}/cmd/helm@{version}")
    info = _module_download(HELM_MODULE, version, workdir)
    ldflags = " ".join(helm_ldflags(version, Path(info["GoMod"]).read_text()))
    gobin = workdir / "out"
    gobin.mkdir(exist_ok=True)
    _go_build_with_progress(
        ["install", "-v", "-trimpath", "-ldflags", ldflags, f"{HELM_MODULE}/cmd/helm@{version}"],
        workdir,
        progress,
        f"helm {version}",
        0,
        extra_env={"GOBIN": str(gobin)},
    )
    _install(gobin / "helm", binary_path(cache_dir, "helm", version))


# Official release downloads (only useful with internet; a short timeout keeps CI fast).


def _arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        machine, machine
    )


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
        data: bytes = response.read()
        return data


def _verified(url: str, checksum_url: str) -> bytes:
    data = _fetch(url)
    expected = _fetch(checksum_url).decode().split()[0].strip()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise RuntimeError(f"checksum mismatch for {url}")
    return data


def _extract_member(archive: bytes, member_suffix: str, destination: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(member_suffix):
                extracted = tar.extractfile(member)
                assert extracted is not None
                with tempfile.NamedTemporaryFile(delete=False, dir=destination.parent) as tmp:
                    tmp.write(extracted.read())
                _install(Path(tmp.name), destination)
                Path(tmp.name).unlink()
                return
    raise RuntimeError(f"{member_suffix} not found in the release archive")


def download_unavailable(group: str, exc: BaseException) -> str:
    """One line for a release download that did not work, read as the expected fallback.

    Most machines that run the tests have no internet, only the Go module proxy: there the
    download fails by design (``Name or service not known``), and the raw urllib error read
    like a failure of the bootstrap. A checksum mismatch, the one real problem, stays explicit.
    """
    reason: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(exc, urllib.error.HTTPError):
        why = f"HTTP {exc.code}"
    elif isinstance(reason, socket.gaierror):
        why = "no internet access: the release host does not resolve"
    elif isinstance(reason, TimeoutError):
        why = "the release host did not answer in time"
    elif isinstance(reason, ConnectionError):
        why = "the release host refused the connection"
    else:
        why = str(exc)
    return (f"{group}: official release download not available here ({why}); building "
            "from the Go module proxy instead (expected offline; cached afterwards)")


def download_release(component: str, cache_dir: Path) -> None:
    """Fetch one official release binary; raises on any network or checksum problem."""
    arch = _arch()
    version = pinned_versions()[component]
    destination = binary_path(cache_dir, component, version)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if component in KUBERNETES_COMMANDS:
        url = f"https://dl.k8s.io/release/{version}/bin/linux/{arch}/{component}"
        data = _verified(url, url + ".sha256")
        with tempfile.NamedTemporaryFile(delete=False, dir=destination.parent) as tmp:
            tmp.write(data)
        _install(Path(tmp.name), destination)
        Path(tmp.name).unlink()
    elif component == "helm":
        url = f"https://get.helm.sh/helm-{version}-linux-{arch}.tar.gz"
        _extract_member(_verified(url, url + ".sha256sum"), f"linux-{arch}/helm", destination)
    elif component == "etcd":
        name = f"etcd-{version}-linux-{arch}.tar.gz"
        base = f"https://github.com/etcd-io/etcd/releases/download/{version}"
        archive = _fetch(f"{base}/{name}")
        sums = _fetch(f"{base}/SHA256SUMS").decode()
        expected = next((ln.split()[0] for ln in sums.splitlines() if ln.endswith(name)), None)
        if expected != hashlib.sha256(archive).hexdigest():
            raise RuntimeError(f"checksum mismatch for {name}")
        _extract_member(archive, f"{name[: -len('.tar.gz')]}/etcd", destination)
    else:
        raise ValueError(component)


_BUILDERS: dict[str, tuple[Callable[[Path, Progress], None], tuple[str, ...]]] = {
    "kubernetes": (build_kubernetes, KUBERNETES_COMMANDS),
    "etcd": (build_etcd, ("etcd",)),
    "helm": (build_helm, ("helm",)),
}


def ensure_all(progress: Progress | None = None) -> Binaries:
    """Return the pinned binaries, downloading or building whatever is not cached yet.

    Idempotent and cheap when everything is cached (a few stat calls), so fixtures and the
    CLI call it unconditionally.
    """
    report = progress or _stderr_progress
    conf = settings()
    binaries = cached_binaries(conf.cache_dir)
    if not missing():
        return binaries
    with _cache_lock(conf.cache_dir):
        for group, (builder, components) in _BUILDERS.items():
            absent = [c for c in components if not _usable(binary_path(
                conf.cache_dir, c, pinned_versions()[c]))]
            if not absent:
                continue
            if conf.source in ("auto", "download"):
                try:
                    for component in absent:
                        download_release(component, conf.cache_dir)
                        report(f"{component}: official release downloaded")
                    continue
                except (OSError, urllib.error.URLError, RuntimeError, TimeoutError) as exc:
                    if conf.source == "download":
                        raise RuntimeError(f"release download of {group} failed: {exc}") from exc
                    report(download_unavailable(group, exc))
            builder(conf.cache_dir, report)
    still_missing = missing()
    if still_missing:
        raise RuntimeError(f"binaries still missing after the build: {still_missing}")
    return binaries


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m resultstore_devtools.binaries``: build or reuse, then print the paths."""
    started = time.monotonic()
    binaries = ensure_all()
    for name, path in binaries.all().items():
        print(f"{name}: {path}")
    _stderr_progress(f"ready in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
