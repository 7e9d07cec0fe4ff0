"""A real, local Kubernetes control plane: etcd + kube-apiserver + kube-controller-manager.

Why: the operator, the injection webhook, the manifests and the chart must be tested against
a real API server (admission, RBAC, CRD validation, garbage collection, CronJob -> Job), and
this machine has no container engine, so kind/k3d are not an option. The binaries are built
once from the Go module proxy (see :mod:`resultstore_devtools.binaries`), then every start is
a few seconds: generate a throwaway PKI, pick free loopback ports, start the three
processes, write an admin kubeconfig and wait until the API server is ready and the
controller-manager has done its first work (the ``default`` ServiceAccount exists).

There is no kubelet and no scheduler: Pods are stored but never run. That is expected; the
tests observe API objects, not containers.

Users with a cluster of their own (kind, k3d, ...) set ``RESULTSTORE_E2E_KUBECONFIG`` or pass
``--kubeconfig``; :func:`cluster_from_environment` then returns an :class:`ExistingCluster`
whose start/stop leave that cluster alone, and the same e2e tests run against it.

Command line (``python -m resultstore_devtools.controlplane``, also ``resultstore-dev
controlplane``)::

    build                       build or reuse the cached binaries
    start [--state-dir DIR]     start a daemonised control plane (outlives the command)
    stop  [--state-dir DIR]     stop it and remove its state
    env   [--state-dir DIR]     print ``export KUBECONFIG=...`` lines for a shell
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from . import binaries as binaries_mod
from .binaries import Binaries
from .pki import CertificateAuthority, service_account_key_pem
from .procs import LOOPBACK, free_port, pid_alive

KUBECONFIG_ENV = "RESULTSTORE_E2E_KUBECONFIG"
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
CONTEXT_NAME = "resultstore-local"
TEMP_PREFIX = "resultstore-cp-"

# Controller names as kube-controller-manager 1.34 spells them. Besides the ones the tests
# and the operator need (cronjob, job, garbage collector, namespace, service accounts and
# their tokens), kube-root-ca.crt publishing and ClusterRole aggregation make namespaces and
# the built-in admin/edit/view roles behave like a real cluster's, and deployment/replicaset
# let a `kubectl apply` of the operator manifests produce the usual (pending) Pods.
CONTROLLERS = (
    "cronjob-controller",
    "job-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
    "ttl-after-finished-controller",
    "deployment-controller",
    "replicaset-controller",
)

Progress = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"[controlplane] {message}", file=sys.stderr, flush=True)


def default_state_dir() -> Path:
    return binaries_mod.settings().cache_dir / "run" / "controlplane"


# --------------------------------------------------------------------------------------------
# Pure builders: kubeconfig text and command lines.
# --------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def kubeconfig_text(
    server: str,
    ca_pem: bytes,
    *,
    user: str,
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
    token: str | None = None,
    namespace: str | None = None,
    context: str = CONTEXT_NAME,
) -> str:
    """A self-contained kubeconfig (certificates embedded, so it can be copied anywhere).

    Written as JSON, which is valid YAML and needs no YAML library to produce safely.
    """
    credentials: dict[str, str] = {}
    if cert_pem is not None and key_pem is not None:
        credentials["client-certificate-data"] = _b64(cert_pem)
        credentials["client-key-data"] = _b64(key_pem)
    if token is not None:
        credentials["token"] = token
    ctx: dict[str, str] = {"cluster": context, "user": user}
    if namespace:
        ctx["namespace"] = namespace
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": context, "cluster": {"server": server,
                                          "certificate-authority-data": _b64(ca_pem)}}
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": context, "context": ctx}],
        "current-context": context,
    }
    return json.dumps(document, indent=2) + "\n"


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int

    @classmethod
    def pick(cls) -> Ports:
        chosen: set[int] = set()
        values: list[int] = []
        while len(values) < 4:
            port = free_port()
            if port not in chosen:
                chosen.add(port)
                values.append(port)
        return cls(*values)


@dataclass(frozen=True)
class Layout:
    """File locations inside a state directory."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd-data"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "admin.kubeconfig"

    @property
    def controller_manager_kubeconfig(self) -> Path:
        return self.root / "controller-manager.kubeconfig"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def pem(self, name: str) -> Path:
        return self.pki / name


def etcd_command(etcd: Path, layout: Layout, ports: Ports) -> list[str]:
    client = f"http://{LOOPBACK}:{ports.etcd_client}"
    peer = f"http://{LOOPBACK}:{ports.etcd_peer}"
    return [
        str(etcd),
        "--name=resultstore",
        f"--data-dir={layout.etcd_data}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=resultstore={peer}",
        "--initial-cluster-state=new",
        # Throwaway data: skipping fsync makes the API server several times faster on
        # slow CI disks, and a crash only loses a test cluster.
        "--unsafe-no-fsync=true",
        "--quota-backend-bytes=2147483648",
        "--log-level=warn",
    ]


def apiserver_command(apiserver: Path, layout: Layout, ports: Ports) -> list[str]:
    pem = layout.pem
    return [
        str(apiserver),
        f"--etcd-servers=http://{LOOPBACK}:{ports.etcd_client}",
        f"--bind-address={LOOPBACK}",
        f"--advertise-address={LOOPBACK}",
        f"--secure-port={ports.apiserver}",
        f"--cert-dir={layout.pki}",
        f"--tls-cert-file={pem('apiserver.crt')}",
        f"--tls-private-key-file={pem('apiserver.key')}",
        f"--client-ca-file={pem('ca.crt')}",
        "--authorization-mode=RBAC",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={pem('sa.pub')}",
        f"--service-account-signing-key-file={pem('sa.key')}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        # The default plugin set already contains these; naming them documents that the
        # webhook tests depend on them.
        "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,"
        "MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy",
        "--allow-privileged=true",
        # Endpoints may not point at loopback, so the lease reconciler would only log errors.
        "--endpoint-reconciler-type=none",
        "--profiling=false",
        "--v=1",
    ]


def controller_manager_command(kcm: Path, layout: Layout, ports: Ports) -> list[str]:
    kubeconfig = layout.controller_manager_kubeconfig
    return [
        str(kcm),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        f"--bind-address={LOOPBACK}",
        f"--secure-port={ports.controller_manager}",
        f"--cert-dir={layout.root / 'controller-manager-certs'}",
        f"--service-account-private-key-file={layout.pem('sa.key')}",
        f"--root-ca-file={layout.pem('ca.crt')}",
        "--use-service-account-credentials=true",
        f"--controllers={','.join(CONTROLLERS)}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--leader-elect=false",
        "--v=1",
    ]


# --------------------------------------------------------------------------------------------
# Process helpers
# --------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Child-side hook: get SIGTERM if the test process dies, so nothing is left behind.

    A pytest run that is killed with SIGKILL never runs its finalizers; the kernel's
    parent-death signal still reaches the children.
    """
    os.setsid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _pid_runs(pid: int, executable: str) -> bool:
    """Guard against pid reuse: only signal a pid that still runs our binary."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode()
    except OSError:
        return False
    return pid_alive(pid) and argv0 == executable


def _terminate(pid: int, executable: str, popen: subprocess.Popen[bytes] | None,
               timeout: float = 15.0) -> None:
    """SIGTERM the process group, wait, then SIGKILL; reap it if it is our child."""
    if popen is not None and popen.poll() is not None:
        return
    if popen is None and not _pid_runs(pid, executable):
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if popen is not None:
                if popen.poll() is not None:
                    return
            elif not pid_alive(pid):
                return
            time.sleep(0.05)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------------------------
# The cluster interface shared by the local control plane and an existing cluster.
# --------------------------------------------------------------------------------------------


class Cluster(Protocol):
    kubeconfig: Path
    server: str

    @property
    def env(self) -> dict[str, str]: ...

    @property
    def local(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def service_account_kubeconfig(
        self, namespace: str, name: str, path: Path, duration: str = "1h"
    ) -> Path: ...


def _kubectl() -> str:
    cached = binaries_mod.cached_binaries().kubectl
    if cached.exists():
        return str(cached)
    found = shutil.which("kubectl")
    if found:
        return found
    return str(binaries_mod.ensure_all().kubectl)


def _sa_kubeconfig(
    kubeconfig: Path, server: str, ca_pem: bytes, namespace: str, name: str, path: Path,
    duration: str,
) -> Path:
    """Mint a TokenRequest token for a ServiceAccount and write a kubeconfig using it.

    RBAC tests use this to act *as* the operator's ServiceAccount, which is the only honest
    way to prove a Role grants exactly enough.
    """
    result = subprocess.run(
        [_kubectl(), "--kubeconfig", str(kubeconfig), "create", "token", name,
         "-n", namespace, f"--duration={duration}"],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl create token {namespace}/{name} failed: {result.stderr}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(kubeconfig_text(server, ca_pem, user=f"{namespace}-{name}",
                                    token=result.stdout.strip(), namespace=namespace))
    return path


@dataclass
class ExistingCluster:
    """A cluster the user already runs (kind, k3d, ...): we use it and never stop it."""

    kubeconfig: Path
    server: str = ""
    ca_pem: bytes = b""

    def __post_init__(self) -> None:
        self.kubeconfig = self.kubeconfig.expanduser().resolve()
        if not self.kubeconfig.is_file():
            raise FileNotFoundError(f"kubeconfig {self.kubeconfig} does not exist")
        result = subprocess.run(
            [_kubectl(), "--kubeconfig", str(self.kubeconfig), "config", "view", "--minify",
             "--raw", "-o", "json"],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"cannot read {self.kubeconfig}: {result.stderr}")
        cluster = json.loads(result.stdout)["clusters"][0]["cluster"]
        self.server = cluster["server"]
        data = cluster.get("certificate-authority-data")
        if data:
            self.ca_pem = base64.b64decode(data)
        elif cluster.get("certificate-authority"):
            self.ca_pem = Path(cluster["certificate-authority"]).read_bytes()

    @property
    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": str(self.kubeconfig)}

    @property
    def local(self) -> bool:
        return False

    def start(self) -> None:
        """Nothing to start; fail early if the cluster does not answer."""
        result = subprocess.run(
            [_kubectl(), "--kubeconfig", str(self.kubeconfig), "get", "--raw", "/readyz"],
            capture_output=True, text=True, check=False, timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"cluster at {self.server} is not ready: {result.stderr}")

    def stop(self) -> None:
        """Leave the user's cluster running."""

    def service_account_kubeconfig(
        self, namespace: str, name: str, path: Path, duration: str = "1h"
    ) -> Path:
        return _sa_kubeconfig(self.kubeconfig, self.server, self.ca_pem, namespace, name,
                              path, duration)

    def __enter__(self) -> ExistingCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class _Proc:
    name: str
    command: list[str]
    pid: int = 0
    popen: subprocess.Popen[bytes] | None = None


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on free loopback ports.

    ``ControlPlane()`` is for one test session: state in a fresh temporary directory that
    :meth:`stop` removes, and children that die with the parent. ``daemon=True`` with a
    ``state_dir`` is for humans and the demo: processes outlive the command, and a later
    :meth:`attach` + :meth:`stop` (possibly from another process) finds them via state.json.
    """

    state_dir: Path | None = None
    daemon: bool = False
    progress: Progress = _stderr
    binaries: Binaries | None = None
    ready_timeout: float = 120.0
    server: str = ""
    ports: Ports | None = None
    _procs: list[_Proc] = field(default_factory=list)
    _owns_dir: bool = False
    _ca_pem: bytes = b""
    _admin: tuple[bytes, bytes] = (b"", b"")

    # Public attributes --------------------------------------------------------------------

    @property
    def layout(self) -> Layout:
        assert self.state_dir is not None, "control plane not started"
        return Layout(self.state_dir)

    @property
    def kubeconfig(self) -> Path:
        return self.layout.kubeconfig

    @property
    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": str(self.kubeconfig)}

    @property
    def local(self) -> bool:
        return True

    @property
    def ca_pem(self) -> bytes:
        return self._ca_pem

    # Lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start everything and return once the API is ready; on failure, clean up."""
        if self._procs:
            return
        started = time.monotonic()
        self.binaries = self.binaries or binaries_mod.ensure_all(self.progress)
        if self.state_dir is None:
            _sweep_abandoned_dirs()
            self.state_dir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
            self._owns_dir = True
        last_error: Exception | None = None
        for attempt in range(3):
            try:
                self._start_once()
                self.progress(
                    f"ready at {self.server} in {time.monotonic() - started:.1f}s "
                    f"(KUBECONFIG={self.kubeconfig})"
                )
                return
            except _PortClash as exc:  # another process grabbed a port we picked: retry
                last_error = exc
                self.progress(f"port clash on attempt {attempt + 1}, retrying: {exc}")
                self._stop_processes()
            except BaseException:
                self.stop()
                raise
        self.stop()
        raise RuntimeError(f"control plane failed to start: {last_error}")

    def _start_once(self) -> None:
        assert self.binaries is not None and self.state_dir is not None
        layout = self.layout
        if layout.etcd_data.exists():
            shutil.rmtree(layout.etcd_data)
        self.ports = ports = Ports.pick()
        self.server = f"https://{LOOPBACK}:{ports.apiserver}"
        self._write_pki_and_kubeconfigs(layout)
        self._spawn("etcd", etcd_command(self.binaries.etcd, layout, ports))
        self._wait(lambda: self._etcd_healthy(ports.etcd_client), 30, "etcd health")
        self._spawn("kube-apiserver",
                    apiserver_command(self.binaries.kube_apiserver, layout, ports))
        self._wait(lambda: self._get("/readyz")[0] == 200, self.ready_timeout,
                   "kube-apiserver /readyz")
        self._spawn("kube-controller-manager", controller_manager_command(
            self.binaries.kube_controller_manager, layout, ports))
        # The serviceaccount controller creating `default` proves the controller-manager
        # is connected and its controllers run; Pods need that ServiceAccount anyway.
        self._wait(
            lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
            self.ready_timeout, "kube-controller-manager (default ServiceAccount)",
        )
        self._write_state()

    def stop(self) -> None:
        """Stop every process (reverse order) and remove a temporary state directory."""
        self._stop_processes()
        if self.state_dir is not None:
            if self._owns_dir:
                shutil.rmtree(self.state_dir, ignore_errors=True)
            else:
                # A user-chosen directory: drop state, keys and data, keep the logs.
                layout = self.layout
                for path in (layout.state_file, layout.kubeconfig,
                             layout.controller_manager_kubeconfig):
                    path.unlink(missing_ok=True)
                for directory in (layout.etcd_data, layout.pki,
                                  layout.root / "controller-manager-certs"):
                    shutil.rmtree(directory, ignore_errors=True)

    def _stop_processes(self) -> None:
        for proc in reversed(self._procs):
            _terminate(proc.pid, proc.command[0], proc.popen)
            if proc.popen is not None:
                try:
                    proc.popen.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        self._procs = []

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # Daemon state -------------------------------------------------------------------------

    def _write_state(self) -> None:
        state = {
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "processes": [{"name": p.name, "pid": p.pid, "executable": p.command[0]}
                          for p in self._procs],
            "ports": self.ports.__dict__ if self.ports else {},
        }
        self.layout.state_file.write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def attach(cls, state_dir: Path) -> ControlPlane | None:
        """Re-open a daemonised control plane from its state.json, if it is still running."""
        layout = Layout(state_dir)
        try:
            state = json.loads(layout.state_file.read_text())
        except (OSError, ValueError):
            return None
        plane = cls(state_dir=state_dir, daemon=True)
        plane.server = state["server"]
        plane._procs = [_Proc(p["name"], [p["executable"]], pid=p["pid"])
                        for p in state["processes"]]
        plane._ca_pem = layout.pem("ca.crt").read_bytes()
        plane._admin = (layout.pem("admin.crt").read_bytes(), layout.pem("admin.key").read_bytes())
        return plane

    def running(self) -> bool:
        return bool(self._procs) and all(
            (p.popen.poll() is None) if p.popen is not None else _pid_runs(p.pid, p.command[0])
            for p in self._procs
        )

    # Service-account credentials ------------------------------------------------------------

    def service_account_kubeconfig(
        self, namespace: str, name: str, path: Path, duration: str = "1h"
    ) -> Path:
        return _sa_kubeconfig(self.kubeconfig, self.server, self._ca_pem, namespace, name,
                              path, duration)

    # Internals ------------------------------------------------------------------------------

    def _write_pki_and_kubeconfigs(self, layout: Layout) -> None:
        ca = CertificateAuthority("resultstore-local-ca")
        self._ca_pem = ca.cert_pem
        layout.pki.mkdir(parents=True, exist_ok=True)
        os.chmod(layout.root, 0o700)
        (layout.pki / "ca.crt").write_bytes(ca.cert_pem)
        ca.issue(
            "kube-apiserver", server=True, ips=(LOOPBACK, "10.0.0.1"),
            dns_names=("localhost", "kubernetes", "kubernetes.default",
                       "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"),
        ).write(layout.pki, "apiserver")
        admin = ca.issue("resultstore-admin", organization="system:masters", client=True)
        admin.write(layout.pki, "admin")
        self._admin = (admin.cert_pem, admin.key_pem)
        kcm = ca.issue("system:kube-controller-manager", client=True)
        private, public = service_account_key_pem()
        key_file = layout.pem("sa.key")
        key_file.touch(mode=0o600)
        key_file.write_bytes(private)
        layout.pem("sa.pub").write_bytes(public)
        for path, user, pair in (
            (layout.kubeconfig, "resultstore-admin", admin),
            (layout.controller_manager_kubeconfig, "system:kube-controller-manager", kcm),
        ):
            path.touch(mode=0o600)
            path.write_text(kubeconfig_text(self.server, ca.cert_pem, user=user,
                                            cert_pem=pair.cert_pem, key_pem=pair.key_pem))

    def _spawn(self, name: str, command: list[str]) -> None:
        log_path = self.layout.log(name)
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.layout.root,
                close_fds=True,
                # Daemons get their own session and survive us; session children get the
                # parent-death signal too.
                start_new_session=self.daemon,
                preexec_fn=None if self.daemon else _die_with_parent,
            )
        self._procs.append(_Proc(name, command, pid=popen.pid, popen=popen))

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.popen is not None and proc.popen.poll() is not None:
                    log = _tail(self.layout.log(proc.name))
                    if "address already in use" in log:
                        raise _PortClash(f"{proc.name}: address already in use")
                    raise RuntimeError(
                        f"{proc.name} exited with {proc.popen.returncode} while waiting for "
                        f"{what}; last log lines ({self.layout.log(proc.name)}):\n{log}"
                    )
            if predicate():
                return
            time.sleep(0.2)
        logs = "\n".join(f"--- {p.name} ---\n{_tail(self.layout.log(p.name), 15)}"
                         for p in self._procs)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")

    def _etcd_healthy(self, port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/health", timeout=2) as resp:
                body: dict[str, Any] = json.loads(resp.read())
                return body.get("health") == "true"
        except (OSError, ValueError):
            return False

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=self._ca_pem.decode())
        context.load_cert_chain(self.layout.pem("admin.crt"), self.layout.pem("admin.key"))
        return context

    def _get(self, path: str) -> tuple[int, bytes]:
        """GET as the admin user; (0, b"") while the server is not accepting connections."""
        try:
            with urllib.request.urlopen(
                self.server + path, timeout=5, context=self._ssl_context()
            ) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), b""
        except (OSError, ssl.SSLError):
            return 0, b""


class _PortClash(RuntimeError):
    pass


def _sweep_abandoned_dirs(max_age: float = 3600.0) -> None:
    """Remove session directories left by a killed test run (no finalizer ran).

    Its processes already died with it (parent-death signal); only files remain. A directory
    is abandoned when none of its recorded processes runs, or, if it never recorded any,
    when it is older than ``max_age`` (a concurrent session may still be starting).
    """
    for candidate in Path(tempfile.gettempdir()).glob(TEMP_PREFIX + "*"):
        try:
            state = json.loads(Layout(candidate).state_file.read_text())
            alive = any(_pid_runs(p["pid"], p["executable"]) for p in state["processes"])
        except (OSError, ValueError, KeyError, TypeError):
            try:
                alive = time.time() - candidate.stat().st_mtime < max_age
            except OSError:
                continue
        if not alive:
            shutil.rmtree(candidate, ignore_errors=True)


def cluster_from_environment(
    kubeconfig: str | None = None, *, state_dir: Path | None = None, daemon: bool = False,
    progress: Progress = _stderr,
) -> ControlPlane | ExistingCluster:
    """An existing cluster if one is configured (argument or env), else a local one."""
    chosen = kubeconfig or os.environ.get(KUBECONFIG_ENV)
    if chosen:
        return ExistingCluster(Path(chosen))
    return ControlPlane(state_dir=state_dir, daemon=daemon, progress=progress)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _env_lines(kubeconfig: Path, tools: Binaries | None) -> list[str]:
    lines = [f"export KUBECONFIG={kubeconfig}"]
    if tools is not None:
        dirs = sorted({str(tools.kubectl.parent), str(tools.helm.parent)})
        lines.append(f"export PATH={':'.join(dirs)}:\"$PATH\"")
    return lines


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, default=None,
                        help="where pids, logs and the kubeconfig live "
                             "(default ~/.cache/celery-resultstore/run/controlplane)")
    common.add_argument("--kubeconfig", default=None,
                        help=f"use this existing cluster instead (or set {KUBECONFIG_ENV})")
    parser = argparse.ArgumentParser(
        prog="resultstore-dev controlplane",
        description="A local etcd + kube-apiserver + kube-controller-manager for tests/demos.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build or reuse the cached binaries and print their paths")
    sub.add_parser("start", parents=[common], help="start a daemonised control plane")
    sub.add_parser("stop", parents=[common], help="stop it and remove its state")
    sub.add_parser("env", parents=[common], help="print export lines for a shell")
    sub.add_parser("status", parents=[common], help="exit 0 if running, 1 otherwise")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "build":
        started = time.monotonic()
        tools = binaries_mod.ensure_all()
        for name, path in tools.all().items():
            print(f"{name}: {path}")
        _stderr(f"binaries ready in {time.monotonic() - started:.1f}s")
        return 0

    existing = args.kubeconfig or os.environ.get(KUBECONFIG_ENV)
    if existing:
        cluster = ExistingCluster(Path(existing))
        if args.command == "start":
            cluster.start()
            _stderr(f"using the existing cluster at {cluster.server}; nothing started")
        elif args.command == "stop":
            _stderr("using an existing cluster; nothing to stop")
        elif args.command == "status":
            cluster.start()
        else:
            print("\n".join(_env_lines(cluster.kubeconfig, None)))
        return 0

    state_dir: Path = (args.state_dir or default_state_dir()).expanduser().resolve()
    plane = ControlPlane.attach(state_dir)
    if args.command == "start":
        if plane is not None and plane.running():
            _stderr(f"already running at {plane.server}")
        else:
            if plane is not None:  # stale or half-dead: clean it up first
                plane.stop()
            state_dir.mkdir(parents=True, exist_ok=True)
            plane = ControlPlane(state_dir=state_dir, daemon=True)
            plane.start()
        print("\n".join(_env_lines(plane.kubeconfig, binaries_mod.cached_binaries())))
        return 0
    if args.command == "stop":
        if plane is None:
            _stderr(f"no control plane recorded in {state_dir}")
            return 0
        plane.stop()
        _stderr("stopped")
        return 0
    if args.command == "status":
        running = plane is not None and plane.running()
        _stderr(f"running at {plane.server}" if running and plane else "not running")
        return 0 if running else 1
    # env
    if plane is None or not plane.running():
        _stderr(f"no running control plane in {state_dir}; run `start` first")
        return 1
    print("\n".join(_env_lines(plane.kubeconfig, binaries_mod.cached_binaries())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
