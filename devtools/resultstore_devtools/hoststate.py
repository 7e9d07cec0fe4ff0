"""What a real node may change on this machine: snapshot it, compare it, plan its undoing.

Why this exists: the real node (:mod:`resultstore_devtools.realnode`) runs a kubelet and
containerd as root on a machine several people share. Left alone, those daemons change the
host: the kubelet writes kernel sysctls (``vm.overcommit_memory=1``, ``kernel.panic=10``,
``kernel.panic_on_oops=1``, ...), bind-mounts its root directory and mounts tmpfs volumes,
creates cgroups (``kubepods``) in every hierarchy and ``/var/log/containers``; containerd
mounts container root filesystems and creates ``/run/containerd``; a CNI plugin could add
iptables chains, network devices and network namespaces. ``node stop`` must leave the machine
as ``node start`` found it, and the e2e test proves it, so both need the same picture of
"the host" and the same comparison.

:class:`HostSnapshot` is that picture (read by :func:`snapshot`, JSON-serialisable so the
``start`` snapshot survives until ``stop`` in another process); :func:`differences` says
what changed, in words a failing test can print; :func:`restore_plan` is the pure decision
of what ``stop`` undoes. It only ever touches what the node can have made: mounts under the
node's own directories (or new network namespaces), ``KUBE-``/``CNI-`` chains, ``cni``/
``veth`` devices, cgroups and paths absent before; anything else that changed meanwhile (a
concurrent test's buildah mount, say) is reported by :func:`differences` but never undone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# What the kubelet's container manager writes when protectKernelDefaults is false (see
# setupKernelTunables in pkg/kubelet/cm/container_manager_linux.go), plus the forwarding
# switches that must stay off (nothing may be routed off this machine).
KUBELET_SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
)
FORWARDING_SYSCTLS = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")
WATCHED_SYSCTLS = KUBELET_SYSCTLS + FORWARDING_SYSCTLS

# Host paths a kubelet or containerd creates outside the directories we give them.
WATCHED_PATHS = (
    "/var/log/containers",
    "/var/log/pods",
    "/run/containerd",
    "/run/netns",
    "/var/run/netns",
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/opt/containerd",
    "/etc/cni/net.d",
)
NETNS_DIRS = ("/run/netns", "/var/run/netns")
CGROUP_ROOT = Path("/sys/fs/cgroup")
OWNED_CHAIN_PREFIXES = ("KUBE-", "CNI-")
OWNED_LINK_PREFIXES = ("cni", "veth")
# The kubelet's cgroupfs hierarchy (cgroupsPerQOS): every pod and container lives below it.
OWNED_CGROUP_PREFIXES = ("kubepods",)


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo, without the ids that change on every mount."""

    mount_point: str
    root: str
    fstype: str
    source: str

    def describe(self) -> str:
        return f"{self.mount_point} ({self.fstype} {self.source}, root {self.root})"


@dataclass(frozen=True)
class PathState:
    exists: bool
    mode: int | None = None


@dataclass(frozen=True)
class HostSnapshot:
    """The parts of the host a node can change. ``None`` for a tool that is not installed."""

    sysctls: dict[str, str]
    mounts: tuple[Mount, ...]
    iptables: dict[str, tuple[str, ...] | None]  # "ipv4"/"ipv6" -> normalised rules
    links: tuple[str, ...]
    cgroups: tuple[str, ...]  # first-level directories of every cgroup hierarchy
    paths: dict[str, PathState] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HostSnapshot:
        data: dict[str, Any] = json.loads(text)
        return cls(
            sysctls=dict(data["sysctls"]),
            mounts=tuple(Mount(**m) for m in data["mounts"]),
            iptables={k: (tuple(v) if v is not None else None)
                      for k, v in data["iptables"].items()},
            links=tuple(data["links"]),
            cgroups=tuple(data["cgroups"]),
            paths={k: PathState(**v) for k, v in data.get("paths", {}).items()},
        )


# --------------------------------------------------------------------------------------------
# Pure parsing and decisions (unit tested)
# --------------------------------------------------------------------------------------------


def _unescape_mount(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(code, char)
    return text


def parse_mountinfo(text: str) -> tuple[Mount, ...]:
    mounts: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields_left, fields_right = left.split(), right.split()
        if len(fields_left) < 5 or len(fields_right) < 2:
            continue
        mounts.append(Mount(mount_point=_unescape_mount(fields_left[4]),
                            root=_unescape_mount(fields_left[3]),
                            fstype=fields_right[0], source=_unescape_mount(fields_right[1])))
    return tuple(sorted(set(mounts), key=lambda m: (m.mount_point, m.fstype, m.source, m.root)))


def normalise_iptables_save(text: str) -> tuple[str, ...]:
    """Rules and chain declarations without comments, timestamps or packet counters."""
    lines: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(":"):  # ":CHAIN POLICY [packets:bytes]"
            line = " ".join(line.split()[:2])
        lines.append(line)
    return tuple(lines)


def iptables_chains(rules: Sequence[str]) -> set[tuple[str, str]]:
    """(table, chain) pairs declared in normalised iptables-save output."""
    table = ""
    chains: set[tuple[str, str]] = set()
    for line in rules:
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            chains.add((table, line[1:].split()[0]))
    return chains


def parse_links(text: str) -> tuple[str, ...]:
    """Interface names from ``ip -o link show`` (``2: eth0@if3: <...>`` -> ``eth0``)."""
    names = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2 and parts[1].strip():
            names.append(parts[1].strip().split("@", 1)[0])
    return tuple(sorted(set(names)))


def _under(path: str, roots: Iterable[Path]) -> bool:
    return any(path == str(root) or path.startswith(str(root).rstrip("/") + "/")
               for root in roots)


def differences(before: HostSnapshot, after: HostSnapshot) -> list[str]:
    """Every change from ``before`` to ``after``, one readable line each ([] when equal)."""
    found: list[str] = []
    for key in sorted(set(before.sysctls) | set(after.sysctls)):
        old, new = before.sysctls.get(key), after.sysctls.get(key)
        if old != new:
            found.append(f"sysctl {key}: {old} -> {new}")
    old_mounts, new_mounts = set(before.mounts), set(after.mounts)
    found += [f"mount added: {m.describe()}" for m in sorted(new_mounts - old_mounts,
                                                              key=lambda m: m.mount_point)]
    found += [f"mount removed: {m.describe()}" for m in sorted(old_mounts - new_mounts,
                                                                key=lambda m: m.mount_point)]
    for family in sorted(set(before.iptables) | set(after.iptables)):
        old_rules, new_rules = before.iptables.get(family), after.iptables.get(family)
        if old_rules == new_rules:
            continue
        if old_rules is None or new_rules is None:
            found.append(f"{family} iptables: {'absent' if old_rules is None else 'present'}"
                         f" -> {'absent' if new_rules is None else 'present'}")
            continue
        found += [f"{family} iptables added: {line}" for line in new_rules
                  if line not in old_rules]
        found += [f"{family} iptables removed: {line}" for line in old_rules
                  if line not in new_rules]
    found += [f"network device added: {name}" for name in after.links
              if name not in before.links]
    found += [f"network device removed: {name}" for name in before.links
              if name not in after.links]
    found += [f"cgroup added: {name}" for name in after.cgroups if name not in before.cgroups]
    found += [f"cgroup removed: {name}" for name in before.cgroups
              if name not in after.cgroups]
    for path in sorted(set(before.paths) | set(after.paths)):
        old_state, new_state = before.paths.get(path), after.paths.get(path)
        if old_state != new_state:
            found.append(f"path {path}: {old_state} -> {new_state}")
    return found


@dataclass(frozen=True)
class RestorePlan:
    """What ``node stop`` undoes, in the order it must be done."""

    unmount: tuple[str, ...] = ()  # deepest first
    delete_chains: tuple[tuple[str, str, str], ...] = ()  # (family, table, chain)
    delete_links: tuple[str, ...] = ()
    remove_cgroups: tuple[str, ...] = ()  # first-level dirs, removed depth-first
    sysctls: dict[str, str] = field(default_factory=dict)
    remove_paths: tuple[str, ...] = ()
    restore_modes: dict[str, int] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.unmount or self.delete_chains or self.delete_links
                    or self.remove_cgroups or self.sysctls or self.remove_paths
                    or self.restore_modes)


def restore_plan(before: HostSnapshot, now: HostSnapshot, owned: Sequence[Path]) -> RestorePlan:
    """Undo what the node can have done since ``before``, and nothing else.

    ``owned`` are the node's own directories (state dir, kubelet root, containerd root):
    every mount below them is the node's. New mounts elsewhere are undone only in the
    network-namespace directories (a CNI sandbox's netns); iptables chains and devices only
    when named as Kubernetes and CNI name theirs; cgroups and host paths only when they did
    not exist before.
    """
    old_mounts = {m.mount_point for m in before.mounts}
    unmount = sorted(
        {m.mount_point for m in now.mounts
         if m.mount_point not in old_mounts
         and (_under(m.mount_point, owned) or _under(m.mount_point, map(Path, NETNS_DIRS)))},
        key=lambda p: (-p.count("/"), p),
    )
    chains: list[tuple[str, str, str]] = []
    for family, rules in now.iptables.items():
        old_rules = before.iptables.get(family)
        if rules is None:
            continue
        old = iptables_chains(old_rules or ())
        for table, chain in sorted(iptables_chains(rules) - old):
            if chain.startswith(OWNED_CHAIN_PREFIXES):
                chains.append((family, table, chain))
    links = tuple(name for name in now.links
                  if name not in before.links and name.startswith(OWNED_LINK_PREFIXES))
    cgroups = tuple(name for name in now.cgroups if name not in before.cgroups
                    and Path(name).name.startswith(OWNED_CGROUP_PREFIXES))
    sysctls = {key: value for key, value in before.sysctls.items()
               if now.sysctls.get(key) not in (None, value)}
    remove_paths: list[str] = []
    modes: dict[str, int] = {}
    for path, state in before.paths.items():
        current = now.paths.get(path)
        if current is None or not current.exists:
            continue
        if not state.exists:
            remove_paths.append(path)
        elif state.mode is not None and current.mode != state.mode:
            modes[path] = state.mode
    return RestorePlan(unmount=tuple(unmount), delete_chains=tuple(chains), delete_links=links,
                       remove_cgroups=cgroups, sysctls=sysctls,
                       remove_paths=tuple(remove_paths), restore_modes=modes)


# --------------------------------------------------------------------------------------------
# Reading the host
# --------------------------------------------------------------------------------------------


def sysctl_path(key: str) -> Path:
    return Path("/proc/sys") / key.replace(".", "/")


def read_sysctls(keys: Sequence[str] = WATCHED_SYSCTLS) -> dict[str, str]:
    values: dict[str, str] = {}
    for key in keys:
        try:
            values[key] = sysctl_path(key).read_text().strip()
        except OSError:
            continue
    return values


def _iptables_save(family: str) -> tuple[str, ...] | None:
    tool = shutil.which("iptables-save" if family == "ipv4" else "ip6tables-save")
    if tool is None:
        return None
    result = subprocess.run([tool], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return None
    return normalise_iptables_save(result.stdout)


def _links() -> tuple[str, ...]:
    result = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                            timeout=30)
    return parse_links(result.stdout) if result.returncode == 0 else ()


def _cgroups() -> tuple[str, ...]:
    found: list[str] = []
    try:
        hierarchies = sorted(CGROUP_ROOT.iterdir())
    except OSError:
        return ()
    for hierarchy in hierarchies:
        try:
            children = [p for p in hierarchy.iterdir() if p.is_dir() and not p.is_symlink()]
        except OSError:
            continue
        found += [str(child) for child in children]
    return tuple(sorted(found))


def _path_state(path: str) -> PathState:
    try:
        info = os.lstat(path)
    except OSError:
        return PathState(exists=False)
    return PathState(exists=True, mode=info.st_mode & 0o7777)


def snapshot(paths: Sequence[str] = WATCHED_PATHS) -> HostSnapshot:
    return HostSnapshot(
        sysctls=read_sysctls(),
        mounts=parse_mountinfo(Path("/proc/self/mountinfo").read_text()),
        iptables={"ipv4": _iptables_save("ipv4"), "ipv6": _iptables_save("ipv6")},
        links=_links(),
        cgroups=_cgroups(),
        paths={path: _path_state(path) for path in paths},
    )


def ignoring(snap: HostSnapshot, mount_roots: Sequence[Path]) -> HostSnapshot:
    """The snapshot without mounts below ``mount_roots`` (another tool's, used concurrently)."""
    kept = tuple(m for m in snap.mounts if not _under(m.mount_point, mount_roots))
    return HostSnapshot(sysctls=snap.sysctls, mounts=kept, iptables=snap.iptables,
                        links=snap.links, cgroups=snap.cgroups, paths=snap.paths)


def write_sysctls(values: Mapping[str, str]) -> None:
    for key, value in values.items():
        sysctl_path(key).write_text(value + "\n")
