"""A real node for the local control plane: containerd + kubelet + kube-scheduler.

Why this exists: the stand-in node (:mod:`resultstore_devtools.node`) emulates the kubelet,
so Secret refresh latency, probes, security contexts, read-only root filesystems, the
projected ServiceAccount token and the images' contents and users are never really
enforced. This module runs the real thing on this machine, as the project's own processes
under its state directory (no systemd here): Debian's containerd and runc, and the kubelet
and kube-scheduler of the pinned Kubernetes build (:func:`binaries.ensure_node`).

What this machine needs, found in a spike (issue 18):

* containerd config v2, overlayfs snapshotter, ``SystemdCgroup = false`` and
  ``restrict_oom_score_adj = true``: root here lacks CAP_SYS_RESOURCE, so a negative
  oom_score_adj (what CRI gives a sandbox) makes every ``runc create`` fail with
  ``can't get final child's PID from pipe: EOF``.
* The sandbox (pause) image is built locally (``buildah from scratch`` plus a tiny static
  Go binary): no registry is reachable.
* kubelet: ``failCgroupV1: false`` (the machine has cgroup v1), ``cgroupDriver: cgroupfs``.
* Images are imported from buildah (``buildah push ... oci-archive:`` then ``ctr -n k8s.io
  images import``); pods use ``imagePullPolicy: Never`` on ``localhost/`` names.

Network: **all traffic stays on this machine.** Pods that talk to PostgreSQL, Redis or the
API server use ``hostNetwork: true`` and 127.0.0.1, the way the services already listen.
The CNI configuration is loopback-only (the ``loopback`` plugin, nothing else): it makes the
runtime report its network ready, creates no device, no bridge, no route, no iptables rule,
and needs neither ``ip_forward`` nor masquerading. A pod without hostNetwork gets nothing
but its own ``lo`` (containerd then refuses the sandbox: there is no ``eth0`` address to
report), which is the point: nothing here can reach or be reached from off the machine. A
private bridge without a gateway was the alternative; it would add a device and iptables
rules to undo, and pods still could not reach services bound to 127.0.0.1.

The kubelet serves on 127.0.0.1 only, with anonymous access and ``AlwaysAllow``
authorization (the API server calls it for ``kubectl logs``/``exec`` without a client
certificate); it, the scheduler and containerd's streaming server bind loopback ports only.
The kubelet and scheduler authenticate with the control plane's admin certificate: the
local control plane keeps no CA key, so no node certificate can be issued.

Host changes and their undoing: ``start`` records a :class:`hoststate.HostSnapshot` in the
state directory; ``stop`` stops the daemons and their containers, then applies
:func:`hoststate.restore_plan` (unmounts, cgroups, sysctls the kubelet rewrote,
``/var/log/containers``, ``/run/containerd``, and any ``KUBE-``/``CNI-`` chain or device).
The kubelet does not touch iptables here (``makeIPTablesUtilChains: false``).

Why one module: start and stop are one lifecycle whose order is the point (claim the
machine, snapshot the host, then daemons; stop in reverse, then undo from that snapshot),
and the configs, the image import and the processes share one layout; split, each piece
would need the others' internals. The host-state decisions are in :mod:`hoststate`.

Command line (``resultstore-dev node start|stop|status``)::

    start [--state-dir DIR] [--kubeconfig ADMIN] [--image IMG ...] [--no-project-images]
    stop  [--state-dir DIR]
    status [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import binaries as binaries_mod
from . import hoststate
from .procs import LOOPBACK, disarm_watchdog, free_port, pid_alive, start_watchdog

Progress = Callable[[str], None]

PAUSE_IMAGE = "localhost/resultstore-pause:1"
PAUSE_SOURCE = """package main

// The sandbox's first process: hold the namespaces, reap orphans, exit on TERM/INT.
import (
\t"os"
\t"os/signal"
\t"syscall"
)

func main() {
\tsignals := make(chan os.Signal, 8)
\tsignal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
\tfor sig := range signals {
\t\tif sig != syscall.SIGCHLD {
\t\t\tos.Exit(0)
\t\t}
\t\tfor {
\t\t\tvar status syscall.WaitStatus
\t\t\tpid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
\t\t\tif pid <= 0 || err != nil {
\t\t\t\tbreak
\t\t\t}
\t\t}
\t}
}
"""
CNI_NETWORK = "resultstore-loopback"
# No image pull ever leaves the machine: containerd's registry client goes through this
# proxy, a closed loopback port, so a pod whose image was not imported fails at once with
# ErrImagePull. (Registry mirrors cannot do it: CRI always falls back to the real host.)
NO_PULL_PROXY = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
                 "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
                 "NO_PROXY": "", "no_proxy": ""}
NODE_ENV = "RESULTSTORE_NODE"  # "real" (default) or "standin", read by the e2e tests
READY_TIMEOUT = 120.0


def _stderr(message: str) -> None:
    print(f"[node] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Settings, layout, ports
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSettings:
    """Read once: where things live and which host tools to use."""

    cache_dir: Path
    containerd: str | None
    runc: str | None
    ctr: str | None
    cni_bin_dir: Path

    @classmethod
    def from_env(cls) -> NodeSettings:
        def which(name: str, *extra: str) -> str | None:
            found = shutil.which(name)
            if found:
                return found
            return next((path for path in extra if os.access(path, os.X_OK)), None)

        return cls(
            cache_dir=binaries_mod.settings().cache_dir,
            containerd=which("containerd", "/usr/bin/containerd"),
            runc=which("runc", "/usr/sbin/runc", "/usr/bin/runc"),
            ctr=which("ctr", "/usr/bin/ctr"),
            cni_bin_dir=Path(os.environ.get("RESULTSTORE_CNI_BIN_DIR", "/usr/lib/cni")),
        )


def default_state_dir() -> Path:
    return binaries_mod.settings().cache_dir / "run" / "node"


def default_controlplane_kubeconfig() -> Path:
    return binaries_mod.settings().cache_dir / "run" / "controlplane" / "admin.kubeconfig"


@dataclass(frozen=True)
class NodeLayout:
    """Files of one node. ``root`` is removed at stop (logs kept); ``images`` persists, so
    a warm start finds its images already unpacked."""

    root: Path
    images: Path

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def host_file(self) -> Path:
        return self.root / "host-before.json"

    @property
    def containerd_config(self) -> Path:
        return self.root / "containerd.toml"

    @property
    def containerd_state(self) -> Path:
        return self.root / "containerd-state"

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd.sock"

    @property
    def runc_root(self) -> Path:
        return self.root / "runc"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def pod_logs(self) -> Path:
        return self.root / "pod-logs"

    @property
    def kubelet_config(self) -> Path:
        return self.root / "kubelet-config.json"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "node.kubeconfig"

    @property
    def claim_file(self) -> Path:
        """Which node owns this machine now (see RealNode._claim)."""
        return self.images / "claim.json"

    @property
    def imported_file(self) -> Path:
        return self.images / "imported.json"

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def owned(self) -> tuple[Path, ...]:
        """Directories whose mounts are all the node's (see hoststate.restore_plan)."""
        return (self.root, self.images)


@dataclass(frozen=True)
class NodePorts:
    kubelet: int
    kubelet_healthz: int
    scheduler: int

    @classmethod
    def pick(cls) -> NodePorts:
        chosen: list[int] = []
        while len(chosen) < 3:
            port = free_port()
            if port not in chosen:
                chosen.append(port)
        return cls(*chosen)


# --------------------------------------------------------------------------------------------
# Pure builders (unit tested)
# --------------------------------------------------------------------------------------------


def choose_node_name(hostname: str, addresses: Sequence[str]) -> str:
    """The node's name, which the API server also dials for ``kubectl logs``/``exec``.

    The API server prefers a node's Hostname address, and the kubelet listens on 127.0.0.1
    only, so the name must resolve to loopback: the machine's hostname when it does (as
    Debian's /etc/hosts makes it), else ``localhost``.
    """
    name = hostname.lower()
    if name and addresses and all(a.startswith("127.") or a == "::1" for a in addresses):
        return name
    return "localhost"


def containerd_config(layout: NodeLayout, runc: str, cni_bin_dir: Path,
                      sandbox_image: str = PAUSE_IMAGE) -> str:
    """containerd config v2 (TOML) keeping every path under the node's directories."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return "\n".join([
        "version = 2",
        f'root = "{layout.images / "containerd"}"',
        f'state = "{layout.containerd_state}"',
        # Plugins that would create host directories or are useless here.
        'disabled_plugins = ["io.containerd.snapshotter.v1.btrfs",'
        ' "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",'
        ' "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp",'
        ' "io.containerd.internal.v1.tracing"]',
        "",
        "[grpc]",
        f'  address = "{layout.containerd_socket}"',
        "[ttrpc]",
        f'  address = "{layout.containerd_socket}.ttrpc"',
        "[debug]",
        '  address = ""',
        "[metrics]",
        '  address = ""',
        "",
        '[plugins."io.containerd.internal.v1.opt"]',
        f'  path = "{layout.root / "opt"}"',
        f"[{cri}]",
        f'  sandbox_image = "{sandbox_image}"',
        # Root here lacks CAP_SYS_RESOURCE: without this every sandbox fails in runc.
        "  restrict_oom_score_adj = true",
        f'  stream_server_address = "{LOOPBACK}"',
        '  stream_server_port = "0"',
        "  enable_selinux = false",
        "  disable_apparmor = true",
        "  enable_cdi = false",
        f"[{cri}.containerd]",
        '  snapshotter = "overlayfs"',
        '  default_runtime_name = "runc"',
        f"[{cri}.containerd.runtimes.runc]",
        '  runtime_type = "io.containerd.runc.v2"',
        f"[{cri}.containerd.runtimes.runc.options]",
        "  SystemdCgroup = false",
        f'  BinaryName = "{runc}"',
        f'  Root = "{layout.runc_root}"',
        f"[{cri}.cni]",
        f'  bin_dir = "{cni_bin_dir}"',
        f'  conf_dir = "{layout.cni_conf_dir}"',
        "  max_conf_num = 1",
        "",
    ])


def cni_config() -> dict[str, Any]:
    """Loopback only: the runtime's network is 'ready', and no packet can leave a pod."""
    return {"cniVersion": "0.4.0", "name": CNI_NETWORK, "plugins": [{"type": "loopback"}]}


def kubelet_config(layout: NodeLayout, ports: NodePorts,
                   sync_frequency: str | None = None) -> dict[str, Any]:
    """KubeletConfiguration (JSON is YAML) for this machine; defaults kept where they matter.

    ``syncFrequency`` stays at the kubelet's default (1 min) unless ``sync_frequency`` is
    given: how late a real kubelet refreshes a mounted Secret is exactly what the rotation
    tests must live with. Only the demo shortens it (to show a rotation in seconds, not
    minutes), and says so.
    """
    extra = {"syncFrequency": sync_frequency} if sync_frequency else {}
    return {
        **extra,
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": LOOPBACK,
        "port": ports.kubelet,
        "readOnlyPort": 0,
        "healthzBindAddress": LOOPBACK,
        "healthzPort": ports.kubelet_healthz,
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "containerRuntimeEndpoint": f"unix://{layout.containerd_socket}",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "podLogsDir": str(layout.pod_logs),
        # No iptables chains at all (KUBE-KUBELET-CANARY and friends): nothing to undo.
        "makeIPTablesUtilChains": False,
        # The kubelet rewrites a few kernel sysctls; stop restores them (hoststate).
        "protectKernelDefaults": False,
        "oomScoreAdj": 0,
        "serializeImagePulls": False,
        # Never evict or garbage-collect on a shared developer disk.
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                         "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "maxPods": 50,
        "registerNode": True,
        "shutdownGracePeriod": "0s",
        "volumePluginDir": str(layout.kubelet_root / "volume-plugins"),
    }


def containerd_command(containerd: str, layout: NodeLayout) -> list[str]:
    return [containerd, "--config", str(layout.containerd_config)]


def containerd_env(environ: Mapping[str, str]) -> dict[str, str]:
    """containerd's environment: ours, with every registry request sent to a dead end."""
    env = {k: v for k, v in environ.items() if k.lower() not in ("all_proxy",)}
    env.update(NO_PULL_PROXY)
    return env


def kubelet_command(kubelet: Path, layout: NodeLayout, node_name: str) -> list[str]:
    return [
        str(kubelet),
        f"--config={layout.kubelet_config}",
        f"--kubeconfig={layout.kubeconfig}",
        f"--root-dir={layout.kubelet_root}",
        f"--cert-dir={layout.kubelet_root / 'pki'}",
        f"--hostname-override={node_name}",
        "--v=1",
    ]


def scheduler_command(scheduler: Path, layout: NodeLayout, ports: NodePorts) -> list[str]:
    kubeconfig = layout.kubeconfig
    return [
        str(scheduler),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        f"--bind-address={LOOPBACK}",
        f"--secure-port={ports.scheduler}",
        f"--cert-dir={layout.root / 'scheduler-certs'}",
        "--leader-elect=false",
        "--v=1",
    ]


def node_ready(node: dict[str, Any]) -> bool:
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


@dataclass
class _Proc:
    name: str
    pid: int
    executable: str
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            argv0 = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode()
        except OSError:
            return False
        return pid_alive(self.pid) and argv0 == self.executable


def _terminate(proc: _Proc, timeout: float = 20.0) -> None:
    """SIGTERM the daemon's process group, wait, then SIGKILL (pid checked against reuse)."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not proc.alive():
            break
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and proc.alive():
            time.sleep(0.05)
    if proc.popen is not None:
        try:
            proc.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _short_name_alias(name: str) -> str | None:
    """``localhost/x:t`` is also ``docker.io/library/x:t``: what a short name such as the
    manifests' ``celery-resultstore:0.1.0`` (and the operator's default cleanup image)
    means to the kubelet, so those pods find the image without a registry."""
    if not name.startswith("localhost/"):
        return None
    return "docker.io/library/" + name.removeprefix("localhost/")


def _claim_owner(claim_file: Path) -> dict[str, Any] | None:
    """The live claim in ``claim_file``, or None when absent or its node is gone."""
    try:
        owner: dict[str, Any] = json.loads(claim_file.read_text())
    except (OSError, ValueError):
        return None
    if pid_alive(int(owner.get("pid", 0) or 0)):
        return owner  # its starter still runs (a test session, a start in progress)
    node = RealNode.attach(Path(owner.get("state_dir", "/nonexistent")))
    if node is not None and any(p.alive() for p in node._procs):
        return owner  # a daemonised node (`resultstore-dev node start`)
    return None


def _https_ok(url: str) -> bool:
    """A health endpoint behind a self-signed serving certificate answers 200."""
    import ssl
    import urllib.request

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


_OUR_EXECUTABLES = ("containerd", "containerd-shim-runc-v2", "kubelet", "kube-scheduler")


def _leftover_pids(root: Path) -> list[int]:
    """Our daemons and shims still running: one of our executables naming our state dir.

    Shims outlive containerd by design, and a start killed before it recorded a pid leaves
    an unrecorded daemon; both carry a path under the state dir on their command line
    (``--config``, ``-address``), which no one else's process does.
    """
    found = []
    needle = str(root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0].decode(errors="replace")) in _OUR_EXECUTABLES and any(
                needle in arg for arg in argv[1:]):
            found.append(int(entry.name))
    return found


def _unmount(plan: hoststate.RestorePlan) -> list[str]:
    problems = []
    for mount_point in plan.unmount:
        if subprocess.run(["umount", mount_point], capture_output=True).returncode != 0 and \
                subprocess.run(["umount", "-l", mount_point], capture_output=True).returncode:
            problems.append(f"could not unmount {mount_point}")
    return problems


def _undo_network(plan: hoststate.RestorePlan) -> list[str]:
    problems = []
    for family, table, chain in plan.delete_chains:  # flush all first: chains may jump
        tool = "iptables" if family == "ipv4" else "ip6tables"
        subprocess.run([tool, "-t", table, "-F", chain], capture_output=True)
    for family, table, chain in plan.delete_chains:
        tool = "iptables" if family == "ipv4" else "ip6tables"
        if subprocess.run([tool, "-t", table, "-X", chain], capture_output=True).returncode:
            problems.append(f"could not delete {family} chain {table}/{chain}")
    for link in plan.delete_links:
        if subprocess.run(["ip", "link", "delete", link], capture_output=True).returncode:
            problems.append(f"could not delete network device {link}")
    return problems


def _remove_cgroups(plan: hoststate.RestorePlan) -> list[str]:
    """rmdir, deepest first (a cgroup's files cannot be removed, only empty directories)."""
    problems = []
    for top in plan.remove_cgroups:
        directories = sorted((p for p in Path(top).rglob("*") if p.is_dir()),
                             key=lambda p: -len(p.parts)) + [Path(top)]
        for directory in directories:
            for _ in range(50):
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                problems.append(f"could not remove cgroup {directory}")
    return problems


class NodeError(RuntimeError):
    """The node cannot start here; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------------------------


@dataclass
class RealNode:
    """containerd + kubelet + kube-scheduler registered to a control plane.

    ``admin_kubeconfig`` is the control plane's admin kubeconfig. ``images`` are buildah
    images imported into containerd at start (skipped when already imported unchanged).
    With ``watchdog`` (tests), a watchdog runs ``stop`` if this process dies without it.
    """

    admin_kubeconfig: Path
    state_dir: Path = field(default_factory=default_state_dir)
    images: Sequence[str] = ()
    watchdog: bool = False
    claim_wait: float = 0.0
    progress: Progress = _stderr
    sync_frequency: str | None = None
    settings: NodeSettings = field(default_factory=NodeSettings.from_env)
    node_name: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    _procs: list[_Proc] = field(default_factory=list)
    _watchdog: subprocess.Popen[bytes] | None = None

    @property
    def layout(self) -> NodeLayout:
        return NodeLayout(self.state_dir, self.settings.cache_dir / "node")

    # Preconditions --------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Why a real node cannot start here ([] when it can)."""
        found = []
        if os.geteuid() != 0:
            found.append("not running as root (the kubelet and containerd need root)")
        for name, path in (("containerd", self.settings.containerd),
                           ("runc", self.settings.runc), ("ctr", self.settings.ctr)):
            if path is None:
                found.append(f"{name} not installed (apt-get install containerd runc, or "
                             "bash scripts/bootstrap)")
        if not (self.settings.cni_bin_dir / "loopback").exists():
            found.append(f"no CNI loopback plugin in {self.settings.cni_bin_dir} "
                         "(apt-get install containernetworking-plugins)")
        if shutil.which("buildah") is None:
            found.append("buildah not installed (the pause image is built with it)")
        return found

    # Start ------------------------------------------------------------------------------------

    def start(self) -> None:
        problems = self.problems()
        if problems:
            raise NodeError("a real node cannot start on this machine: " + "; ".join(problems)
                            + f" (set {NODE_ENV}=standin to use the stand-in node instead)")
        started = time.monotonic()
        layout = self.layout
        if layout.state_file.exists():
            raise NodeError(f"a node is already recorded in {layout.root}; run "
                            "`resultstore-dev node stop` first")
        layout.images.mkdir(parents=True, exist_ok=True)
        self._claim()
        layout.root.mkdir(parents=True, exist_ok=True)
        os.chmod(layout.root, 0o700)
        # The snapshot is written before anything touches the host, so even a start that
        # fails half-way (or a killed test) can be undone by `stop`.
        layout.host_file.write_text(hoststate.snapshot().to_json())
        if self.watchdog:
            self._watchdog = start_watchdog(
                [sys.executable, "-m", "resultstore_devtools.realnode", "stop",
                 "--state-dir", str(layout.root)])
        try:
            self._start(layout, started)
        except BaseException:
            self.stop()
            raise

    def _claim(self) -> None:
        """One real node per machine: wait up to ``claim_wait`` seconds for another to stop.

        Two would share containerd's image store (its database admits one daemon), the
        kubelet's ``kubepods`` cgroups and its hard-coded host paths, and each one's host
        snapshot would hold the other's sysctls, so its ``stop`` would "restore" them.
        """
        layout = self.layout
        deadline = time.monotonic() + self.claim_wait
        announced = False
        while True:
            with open(layout.images / ".claim.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                owner = _claim_owner(layout.claim_file)
                if owner is None or Path(owner["state_dir"]) == layout.root:
                    layout.claim_file.write_text(json.dumps(
                        {"state_dir": str(layout.root), "pid": os.getpid()}))
                    return
            if time.monotonic() >= deadline:
                raise NodeError(f"another real node runs on this machine (state dir "
                                f"{owner['state_dir']}, started by pid {owner['pid']}); stop "
                                "it first: resultstore-dev node stop --state-dir "
                                f"{owner['state_dir']}")
            if not announced:
                self.progress(f"waiting for the real node of {owner['state_dir']} to stop")
                announced = True
            time.sleep(2)

    def _release(self) -> None:
        layout = self.layout
        if not layout.images.is_dir():
            return
        with open(layout.images / ".claim.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                owner = json.loads(layout.claim_file.read_text())
            except (OSError, ValueError):
                return
            if Path(owner.get("state_dir", "")) == layout.root:
                layout.claim_file.unlink(missing_ok=True)

    def _start(self, layout: NodeLayout, started: float) -> None:
        assert self.settings.containerd and self.settings.runc
        step = time.monotonic()
        tools = binaries_mod.ensure_node(self.progress)
        self.timings["binaries"] = time.monotonic() - step
        ports = NodePorts.pick()
        hostname = socket.gethostname()
        try:
            addresses = sorted({str(info[4][0]) for info in socket.getaddrinfo(hostname, None)})
        except OSError:
            addresses = []
        self.node_name = choose_node_name(hostname, addresses)
        layout.cni_conf_dir.mkdir(exist_ok=True)
        (layout.cni_conf_dir / f"10-{CNI_NETWORK}.conflist").write_text(
            json.dumps(cni_config(), indent=2) + "\n")
        layout.containerd_config.write_text(containerd_config(
            layout, self.settings.runc, self.settings.cni_bin_dir))
        layout.kubelet_config.write_text(json.dumps(
            kubelet_config(layout, ports, self.sync_frequency), indent=2))
        layout.kubeconfig.touch(mode=0o600)
        layout.kubeconfig.write_bytes(self.admin_kubeconfig.read_bytes())
        self._write_state(ports)

        step = time.monotonic()
        self._spawn("containerd", containerd_command(self.settings.containerd, layout),
                    env=containerd_env(os.environ))
        self._wait(lambda: self._ctr("version").returncode == 0, 60, "containerd's socket")
        self.timings["containerd"] = time.monotonic() - step
        step = time.monotonic()
        self._import_images([PAUSE_IMAGE, *self.images])
        self.timings["images"] = time.monotonic() - step
        step = time.monotonic()
        self._spawn("kubelet", kubelet_command(tools["kubelet"], layout, self.node_name))
        self._spawn("kube-scheduler", scheduler_command(tools["kube-scheduler"], layout, ports))
        self._write_state(ports)
        self._wait(self._ready, READY_TIMEOUT, f"node {self.node_name} Ready")
        # The kubelet registers with the not-ready taint; on a real cluster the node-lifecycle
        # controller lifts it once the node is Ready. The local control plane runs no such
        # controller, so the node does it, once.
        untaint = self._kubectl("taint", "node", self.node_name,
                                "node.kubernetes.io/not-ready:NoSchedule-")
        if untaint.returncode != 0 and "not found" not in untaint.stderr:
            raise NodeError(f"could not lift the not-ready taint: {untaint.stderr.strip()}")
        self._wait(lambda: _https_ok(f"https://{LOOPBACK}:{ports.scheduler}/readyz"), 60,
                   "kube-scheduler /readyz")
        self.timings["kubelet_ready"] = time.monotonic() - step
        self.timings["total"] = time.monotonic() - started
        self._write_state(ports)
        self.progress(f"node {self.node_name} Ready in {self.timings['total']:.1f}s ("
                      + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()
                                  if k != "total") + ")")

    def _ready(self) -> bool:
        result = self._kubectl("get", "node", self.node_name, "-o", "json")
        if result.returncode != 0:
            return False
        return node_ready(json.loads(result.stdout))

    # Images -----------------------------------------------------------------------------------

    def _pause_binary(self) -> Path:
        """A static pause binary, compiled once with the Go toolchain the build uses."""
        out = self.settings.cache_dir / "bin" / "pause-1" / "pause"
        if out.is_file():
            return out
        work = self.settings.cache_dir / "build" / "pause-1"
        work.mkdir(parents=True, exist_ok=True)
        (work / "go.mod").write_text("module resultstore.local/pause\n\ngo 1.21\n")
        (work / "main.go").write_text(PAUSE_SOURCE)
        go = shutil.which("go") or "/usr/local/go/bin/go"
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([go, "build", "-trimpath", "-ldflags", "-s -w", "-o", str(out) + ".tmp",
                        "."], cwd=work, check=True, capture_output=True,
                       env={**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-buildvcs=false"})
        os.replace(str(out) + ".tmp", out)
        return out

    def _ensure_pause_image(self) -> None:
        from . import image

        if image.image_exists(PAUSE_IMAGE):
            return
        binary = self._pause_binary()
        container = image.buildah("from", "scratch").strip()
        try:
            image.buildah("copy", container, str(binary), "/pause")
            image.buildah("config", "--entrypoint", '["/pause"]', "--user", "65535:65535",
                          container)
            image.buildah("commit", "--quiet", container, PAUSE_IMAGE)
        finally:
            image.buildah("rm", container, check=False)

    def _import_images(self, names: Sequence[str]) -> None:
        """buildah image -> OCI archive -> containerd's k8s.io namespace (when changed)."""
        from . import image

        self._ensure_pause_image()
        layout = self.layout
        try:
            imported: dict[str, str] = json.loads(layout.imported_file.read_text())
        except (OSError, ValueError):
            imported = {}
        present = set(self._ctr("-n", "k8s.io", "images", "ls", "-q").stdout.split())
        for name in names:
            info = json.loads(image.buildah("inspect", "--type", "image", name))
            image_id = str(info.get("FromImageID") or info.get("FromImageDigest") or "")
            alias = _short_name_alias(name)
            if imported.get(name) == image_id and name in present and (
                    alias is None or alias in present):
                continue
            archive = layout.root / "import.oci.tar"
            archive.unlink(missing_ok=True)
            try:
                image.buildah("push", "--quiet", name, f"oci-archive:{archive}:{name}")
                result = self._ctr("-n", "k8s.io", "images", "import", "--snapshotter",
                                   "overlayfs", "--base-name", name.rsplit(":", 1)[0],
                                   str(archive))
            finally:
                archive.unlink(missing_ok=True)
            if result.returncode != 0:
                raise NodeError(f"ctr images import {name} failed: {result.stderr.strip()}")
            if alias is not None:
                tagged = self._ctr("-n", "k8s.io", "images", "tag", "--force", name, alias)
                if tagged.returncode != 0:
                    raise NodeError(f"ctr images tag {alias} failed: {tagged.stderr.strip()}")
            imported[name] = image_id
            layout.imported_file.write_text(json.dumps(imported, indent=1))
            self.progress(f"imported {name} into containerd")

    # Stop -------------------------------------------------------------------------------------

    def stop(self) -> list[str]:
        """Stop everything and undo the host changes; returns what could not be undone."""
        layout = self.layout
        leftovers: list[str] = []
        self._delete_node_object()
        by_name = {p.name: p for p in self._procs}
        for name in ("kube-scheduler", "kubelet"):
            if name in by_name:
                _terminate(by_name[name])
        if "containerd" in by_name and by_name["containerd"].alive():
            self._remove_containers()
            _terminate(by_name["containerd"])
        for pid in _leftover_pids(layout.root):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._kill_cgroup_members()
        self._procs = []
        if layout.host_file.exists():
            before = hoststate.HostSnapshot.from_json(layout.host_file.read_text())
            leftovers = self._restore(before)
        disarm_watchdog(self._watchdog)
        self._watchdog = None
        self._clean_state_dir()
        self._release()
        return leftovers

    def _delete_node_object(self) -> None:
        if not self.node_name or not self.admin_kubeconfig.exists():
            return
        # Without the pod garbage collector (the local control plane runs none) the pods
        # bound to a deleted Node stay, and the next node of that name would run them again.
        self._kubectl("delete", "pods", "--all-namespaces", "--field-selector",
                      f"spec.nodeName={self.node_name}", "--force", "--grace-period=0",
                      "--wait=false", timeout=30)
        self._kubectl("delete", "node", self.node_name, "--ignore-not-found", "--wait=false",
                      timeout=20)

    def _remove_containers(self) -> None:
        """Kill and delete every container of the k8s.io namespace (their mounts go too)."""
        tasks = self._ctr("-n", "k8s.io", "tasks", "ls", "-q").stdout.split()
        for task in tasks:
            self._ctr("-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", task)
        for task in tasks:
            for _ in range(50):
                if self._ctr("-n", "k8s.io", "tasks", "delete", "-f", task).returncode == 0:
                    break
                time.sleep(0.1)
        for container in self._ctr("-n", "k8s.io", "containers", "ls", "-q").stdout.split():
            self._ctr("-n", "k8s.io", "containers", "delete", container)

    def _kill_cgroup_members(self) -> None:
        """Anything still in a cgroup the node created is one of its containers' processes."""
        if not self.layout.host_file.exists():
            return
        before = hoststate.HostSnapshot.from_json(self.layout.host_file.read_text())
        now = hoststate.snapshot()
        for top in hoststate.restore_plan(before, now, self.layout.owned()).remove_cgroups:
            for procs in Path(top).rglob("cgroup.procs"):
                try:
                    pids = [int(p) for p in procs.read_text().split()]
                except (OSError, ValueError):
                    continue
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    def _restore(self, before: hoststate.HostSnapshot) -> list[str]:
        plan = hoststate.restore_plan(before, hoststate.snapshot(), self.layout.owned())
        problems = _unmount(plan) + _undo_network(plan) + _remove_cgroups(plan)
        try:
            hoststate.write_sysctls(plan.sysctls)
        except OSError as exc:
            problems.append(f"could not restore sysctls {sorted(plan.sysctls)}: {exc}")
        self._remove_log_links(Path("/var/log/containers"))
        for path in plan.remove_paths:
            target = Path(path)
            if target.is_symlink() or target.is_file():
                target.unlink()
            else:
                shutil.rmtree(target, ignore_errors=True)
        for path, mode in plan.restore_modes.items():
            os.chmod(path, mode)
        for problem in problems:
            self.progress(problem)
        return problems

    def _remove_log_links(self, directory: Path) -> None:
        """The kubelet links container logs into /var/log/containers; drop links to ours."""
        if not directory.is_dir():
            return
        for link in directory.iterdir():
            try:
                if link.is_symlink() and os.readlink(link).startswith(str(self.layout.root)):
                    link.unlink()
            except OSError:
                continue

    def _clean_state_dir(self) -> None:
        """Drop everything but the logs (stop is idempotent: nothing left to undo twice)."""
        root = self.layout.root
        if not root.exists():
            return
        mounted = {m.mount_point for m in hoststate.parse_mountinfo(
            Path("/proc/self/mountinfo").read_text())}
        if any(point.startswith(str(root)) for point in mounted):
            self.progress(f"mounts remain under {root}; keeping it")
            return
        for entry in root.iterdir():
            if entry.suffix == ".log" and entry.is_file():
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    # State ------------------------------------------------------------------------------------

    def _write_state(self, ports: NodePorts) -> None:
        state = {
            "node_name": self.node_name,
            "admin_kubeconfig": str(self.admin_kubeconfig),
            "ports": ports.__dict__,
            "processes": [{"name": p.name, "pid": p.pid, "executable": p.executable}
                          for p in self._procs],
            "timings": self.timings,
        }
        self.layout.state_file.write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def attach(cls, state_dir: Path) -> RealNode | None:
        """Re-open a node from its state.json (running or half-dead) to stop or inspect it."""
        state_file = NodeLayout(state_dir, Path()).state_file
        host_file = NodeLayout(state_dir, Path()).host_file
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            if host_file.exists():  # a start that died before writing its state
                return cls(admin_kubeconfig=Path("/nonexistent"), state_dir=state_dir)
            return None
        node = cls(admin_kubeconfig=Path(state["admin_kubeconfig"]), state_dir=state_dir,
                   node_name=state.get("node_name", ""), timings=state.get("timings", {}))
        node._procs = [_Proc(p["name"], p["pid"], p["executable"])
                       for p in state.get("processes", [])]
        return node

    def running(self) -> bool:
        names = {p.name for p in self._procs if p.alive()}
        return {"containerd", "kubelet", "kube-scheduler"} <= names

    # Helpers ----------------------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str],
               env: Mapping[str, str] | None = None) -> None:
        with open(self.layout.log(name), "ab") as log:
            popen = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, env=env,
                                     stderr=subprocess.STDOUT, cwd=self.layout.root,
                                     close_fds=True, start_new_session=True)
        self._procs.append(_Proc(name, popen.pid, command[0], popen))

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self._procs:
                if not proc.alive():
                    raise NodeError(f"{proc.name} exited while waiting for {what}; last log "
                                    f"lines ({self.layout.log(proc.name)}):\n"
                                    f"{_tail(self.layout.log(proc.name))}")
            if predicate():
                return
            time.sleep(0.2)
        logs = "\n".join(f"--- {p.name} ---\n{_tail(self.layout.log(p.name), 15)}"
                         for p in self._procs)
        raise NodeError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")

    def _ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert self.settings.ctr
        return subprocess.run([self.settings.ctr, "--address", str(self.layout.containerd_socket),
                               *args], capture_output=True, text=True, timeout=300)

    def _kubectl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        kubectl = binaries_mod.cached_binaries().kubectl
        try:
            return subprocess.run([str(kubectl), "--kubeconfig", str(self.admin_kubeconfig),
                                   *args], capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return subprocess.CompletedProcess(args, 1, "", str(exc))


def wait_for_free_machine(timeout: float, progress: Progress = _stderr) -> None:
    """Wait until no real node runs on this machine (e.g. before snapshotting the host)."""
    claim_file = NodeLayout(Path(), NodeSettings.from_env().cache_dir / "node").claim_file
    deadline = time.monotonic() + timeout
    owner = _claim_owner(claim_file)
    if owner is not None:
        progress(f"waiting for the real node of {owner['state_dir']} to stop")
    while owner is not None:
        if time.monotonic() >= deadline:
            raise NodeError(f"another real node still runs from {owner['state_dir']}")
        time.sleep(2)
        owner = _claim_owner(claim_file)


def project_images() -> list[str]:
    """The project's operator and worker images, when buildah has them (built by image.py)."""
    from . import image

    targets = image.Targets(image.project_version())
    return [name for name in (targets.operator, targets.worker) if image.image_exists(name)]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, default=None,
                        help="the node's directory (default ~/.cache/celery-resultstore/run/node)")
    parser = argparse.ArgumentParser(prog="resultstore-dev node",
                                     description="A real node: containerd + kubelet + "
                                                 "kube-scheduler for the local control plane.")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", parents=[common], help="start and register the node")
    start.add_argument("--kubeconfig", type=Path, default=None,
                       help="the control plane's admin kubeconfig (default: the one "
                            "`resultstore-dev controlplane start` writes)")
    start.add_argument("--image", action="append", default=[],
                       help="a buildah image to import (repeatable)")
    start.add_argument("--no-project-images", action="store_true",
                       help="do not import the project's operator and worker images")
    sub.add_parser("stop", parents=[common], help="stop it and undo its host changes")
    sub.add_parser("status", parents=[common], help="exit 0 if running, 1 otherwise")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    state_dir: Path = (args.state_dir or default_state_dir()).expanduser().resolve()
    node = RealNode.attach(state_dir)
    if args.command == "start":
        if node is not None and node.running():
            _stderr(f"node {node.node_name} already running ({state_dir})")
            return 0
        if node is not None:
            node.stop()
        kubeconfig = (args.kubeconfig or default_controlplane_kubeconfig()).expanduser()
        if not kubeconfig.is_file():
            _stderr(f"no control-plane kubeconfig at {kubeconfig}; run "
                    "`resultstore-dev controlplane start` first or pass --kubeconfig")
            return 1
        images = list(args.image) + ([] if args.no_project_images else project_images())
        node = RealNode(admin_kubeconfig=kubeconfig.resolve(), state_dir=state_dir,
                        images=images)
        try:
            node.start()
        except NodeError as exc:
            _stderr(str(exc))
            return 1
        print(f"node {node.node_name} Ready; logs in {state_dir}")
        return 0
    if args.command == "stop":
        if node is None:
            _stderr(f"no node recorded in {state_dir}")
            return 0
        leftovers = node.stop()
        _stderr("stopped; host restored" if not leftovers else
                "stopped; NOT undone: " + "; ".join(leftovers))
        return 0 if not leftovers else 1
    running = node is not None and node.running()
    if node is not None and running:
        _stderr(f"node {node.node_name} running ({state_dir})")
    else:
        _stderr("not running")
    return 0 if running else 1


if __name__ == "__main__":
    raise SystemExit(main())
