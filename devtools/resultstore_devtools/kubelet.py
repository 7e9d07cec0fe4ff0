"""A minimal stand-in for the kubelet's part, for a control plane that has no nodes.

The local control plane stores Pods but never runs them. To show (and test) that a worker
works *as the admitted Pod describes it*, this module does the kubelet's relevant work on
the host: it publishes the Pod's Secret and ConfigMap volumes with the kubelet's atomic
writer layout (``..data`` symlink swap), keeps Secret volumes in sync like the kubelet's
periodic resync does, resolves the container's env (``value`` and ``valueFrom`` Secret/
ConfigMap keys), rewrites the container's mount paths to the host directories and starts
the container's command as a process.

Everything the Pod spec does not control (image, users, resources) is out of scope.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["KubeletDir", "PodRunner", "SecretMirror", "api_fetcher"]

DATA = "..data"
DATA_TMP = "..data_tmp"

Fetch = Callable[[str, str, str], dict[str, str] | None]  # (kind, namespace, name) -> data


def _timestamped_name() -> str:
    stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
    return f"..{stamp}.{time.monotonic_ns() % 10**9:09d}"


class KubeletDir:
    """A volume directory updated the way the kubelet's AtomicWriter does it.

    A new timestamped directory is written, ``..data_tmp`` is pointed at it and renamed
    over ``..data`` (the one atomic step), user-visible ``<key>`` symlinks point into
    ``..data``, and the previous version is removed.
    """

    def __init__(self, path: str | os.PathLike[str], mode: int = 0o644) -> None:
        self.path = Path(path)
        self.mode = mode

    def current_target(self) -> str | None:
        try:
            return os.readlink(self.path / DATA)
        except OSError:
            return None

    def write(self, payload: Mapping[str, str | bytes]) -> str:
        self.path.mkdir(parents=True, exist_ok=True)
        old = self.current_target()
        new = _timestamped_name()
        while (self.path / new).exists():
            new = _timestamped_name()
        tsdir = self.path / new
        tsdir.mkdir(mode=0o755)
        for key, content in payload.items():
            if "/" in key or key.startswith(".."):
                raise ValueError(f"invalid volume key {key!r}")
            data = content.encode() if isinstance(content, str) else content
            (tsdir / key).write_bytes(data)
            (tsdir / key).chmod(self.mode)
        tmp = self.path / DATA_TMP
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(new, tmp)
        os.rename(tmp, self.path / DATA)
        for key in payload:
            link = self.path / key
            if not link.is_symlink():
                os.symlink(f"{DATA}/{key}", link)
        if old is not None:
            for entry in os.listdir(self.path / old):
                if entry not in payload and (self.path / entry).is_symlink():
                    (self.path / entry).unlink()
            shutil.rmtree(self.path / old, ignore_errors=True)
        return new


def api_fetcher(api_client: Any) -> Fetch:
    """Read Secret/ConfigMap data (decoded to text) through a kubernetes ApiClient."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api_client)

    def fetch(kind: str, namespace: str, name: str) -> dict[str, str] | None:
        try:
            if kind == "secret":
                secret = core.read_namespaced_secret(name, namespace)
                return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
            config_map = core.read_namespaced_config_map(name, namespace)
            return {str(k): str(v) for k, v in (config_map.data or {}).items()}
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    return fetch


class SecretMirror:
    """One Secret kept published in a directory the way the kubelet keeps a Secret volume.

    For a process that is not a pod but must read the store's binding exactly as a worker does
    (the demo's own Celery client, the e2e tests' workers): ``resultstore:///<dir>`` on
    :attr:`path` follows every change through the ``..data`` swap, as the backend does in a
    pod. The kubelet refreshes Secret volumes periodically, not instantly; ``period`` plays
    that role. ``transform`` rewrites the data before it is published (the demo points the
    database address at the one reachable from this machine). Like the kubelet, a deleted
    Secret leaves the last published content in place.
    """

    def __init__(self, fetch: Fetch, namespace: str, name: str, path: str | os.PathLike[str],
                 *, period: float = 1.0, mode: int = 0o644,
                 transform: Callable[[dict[str, str]], dict[str, str]] | None = None) -> None:
        self.fetch, self.namespace, self.name = fetch, namespace, name
        self.dir = KubeletDir(path, mode=mode)
        self.period = period
        self.transform = transform
        #: The content last published (empty until the Secret was first read).
        self.data: dict[str, str] = {}
        #: How many versions were published (the first one included).
        self.versions = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self.dir.path

    def sync(self) -> bool:
        """Publish the Secret if it changed since the last publication; True if it did."""
        raw = self.fetch("secret", self.namespace, self.name)
        if raw is None:
            return False
        data = self.transform(raw) if self.transform is not None else raw
        if data == self.data:
            return False
        self.dir.write(data)
        self.data = data
        self.versions += 1
        return True

    def start(self) -> SecretMirror:
        """Publish now, then keep publishing every ``period`` seconds until :meth:`stop`."""
        self.sync()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="secret-mirror")
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - the kubelet keeps resyncing through API errors
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> SecretMirror:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class PodRunner:
    """Run one container of a stored Pod on this host, the way the kubelet would."""

    pod: dict[str, Any]
    fetch: Fetch
    container: str | None = None
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="resultstore-pod-")))
    resync_period: float = 1.0
    extra_env: Mapping[str, str] = field(default_factory=dict)
    # (namespace, service account, expiration seconds) -> a bound token; enables projected
    # serviceAccountToken sources (the in-cluster credentials of a pod run in its image).
    token: Callable[[str, str, int], str] | None = None

    def __post_init__(self) -> None:
        self.namespace: str = self.pod["metadata"]["namespace"]
        containers = self.pod["spec"]["containers"]
        self.spec: dict[str, Any] = next(
            (c for c in containers if c["name"] == self.container), containers[0]
        ) if self.container else containers[0]
        self._volumes: dict[str, tuple[str, str, KubeletDir]] = {}
        self._projected: dict[str, tuple[dict[str, Any], KubeletDir]] = {}
        self._last: dict[str, dict[str, str]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.proc: subprocess.Popen[Any] | None = None
        self.secret_updates = 0
        self.pod_ip = "127.0.0.1"  # every pod of this stand-in shares the host's loopback

    # volumes -------------------------------------------------------------------------------

    def host_path(self, volume_name: str) -> Path:
        return self.root / "volumes" / volume_name

    def _publish_volumes(self) -> None:
        for volume in self.pod["spec"].get("volumes") or []:
            name = volume["name"]
            path = self.host_path(name)
            if "secret" in volume:
                self._volumes[name] = ("secret", volume["secret"]["secretName"], KubeletDir(path))
            elif "configMap" in volume:
                self._volumes[name] = ("configmap", volume["configMap"]["name"], KubeletDir(path))
            elif "projected" in volume and self.token is not None:
                self._projected[name] = (volume["projected"], KubeletDir(path))
            else:  # emptyDir and anything else: a plain scratch directory
                path.mkdir(parents=True, exist_ok=True)
                path.chmod(0o777)  # as the kubelet makes an emptyDir: any pod user may write
        self.sync()
        self._publish_projected()

    def _publish_projected(self) -> None:
        """serviceAccountToken, configMap and downwardAPI sources, as in kube-api-access."""
        account = self.pod["spec"].get("serviceAccountName") or "default"
        for projected, kdir in self._projected.values():
            payload: dict[str, str] = {}
            for source in projected.get("sources") or []:
                if "serviceAccountToken" in source and self.token is not None:
                    sat = source["serviceAccountToken"]
                    payload[sat["path"]] = self.token(
                        self.namespace, account, int(sat.get("expirationSeconds", 3607)))
                elif "configMap" in source:
                    data = self.fetch("configmap", self.namespace,
                                      source["configMap"]["name"]) or {}
                    for item in source["configMap"].get("items") or [
                            {"key": k, "path": k} for k in data]:
                        if item["key"] in data:
                            payload[item["path"]] = data[item["key"]]
                elif "downwardAPI" in source:
                    for item in source["downwardAPI"].get("items") or []:
                        value = self.field((item.get("fieldRef") or {}).get("fieldPath", ""))
                        if value is not None:
                            payload[item["path"]] = value
            kdir.write(payload)

    def sync(self) -> bool:
        """Republish volumes whose source changed; True if any Secret changed."""
        changed = False
        for name, (kind, source, kdir) in self._volumes.items():
            data = self.fetch(kind, self.namespace, source)
            if data is None:
                if kdir.current_target() is None:
                    raise RuntimeError(f"{kind} {self.namespace}/{source} for volume {name} "
                                       "does not exist: the kubelet would keep the pod waiting")
                continue  # like the kubelet: a deleted source leaves the last content
            if data != self._last.get(name):
                kdir.write(data)
                if name in self._last and kind == "secret":
                    self.secret_updates += 1
                    changed = True
                self._last[name] = data
        return changed

    def _resync_loop(self) -> None:
        while not self._stop.wait(self.resync_period):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - the kubelet keeps resyncing through API errors
                pass

    # environment and command --------------------------------------------------------------

    def mount_map(self) -> dict[str, Path]:
        """Container mount path -> host directory."""
        mapping: dict[str, Path] = {}
        for mount in self.spec.get("volumeMounts") or []:
            mapping[mount["mountPath"]] = self.host_path(mount["name"])
        return mapping

    def translate(self, value: str) -> str:
        """Rewrite container paths that fall under a mount to their host directories.

        One regex pass (longest mount first), so a host path that itself contains a mount
        path (``/tmp/...`` for a ``/tmp`` mount) is never rewritten twice. A path counts where
        it starts a value, follows ``:``, ``=``, ``,``, whitespace or ``//`` (URLs), and ends
        at a path boundary.
        """
        mounts = self.mount_map()
        if not mounts:
            return value
        alternatives = "|".join(re.escape(m.rstrip("/")) for m in
                                sorted(mounts, key=len, reverse=True))
        pattern = re.compile(rf"(?:^|(?<=[:=,\s])|(?<=//))({alternatives})(?=/|$|[^\w.-])")
        hosts = {m.rstrip("/"): str(h) for m, h in mounts.items()}
        return pattern.sub(lambda match: hosts[match.group(1)], value)

    def environment(self, translate: bool = True) -> dict[str, str]:
        """The container's env; paths rewritten to host directories unless ``translate``
        is off (a container run in its image sees its mounts at their own paths)."""
        env: dict[str, str] = {}
        for item in self.spec.get("env") or []:
            if "value" in item:
                value = str(item["value"])
                env[item["name"]] = self.translate(value) if translate else value
                continue
            ref = item.get("valueFrom") or {}
            if "fieldRef" in ref:
                field_value = self.field(ref["fieldRef"]["fieldPath"])
                if field_value is not None:
                    env[item["name"]] = field_value
                continue
            for kind, key in (("secret", "secretKeyRef"), ("configmap", "configMapKeyRef")):
                if key in ref:
                    data = self.fetch(kind, self.namespace, ref[key]["name"]) or {}
                    if ref[key]["key"] in data:
                        env[item["name"]] = data[ref[key]["key"]]
        return env

    def field(self, path: str) -> str | None:
        """The downward-API fields a kubelet resolves for ``fieldRef`` env entries."""
        meta, spec = self.pod["metadata"], self.pod["spec"]
        fields = {
            "metadata.name": meta.get("name"),
            "metadata.namespace": meta.get("namespace"),
            "metadata.uid": meta.get("uid"),
            "spec.nodeName": spec.get("nodeName"),
            "spec.serviceAccountName": spec.get("serviceAccountName"),
            "status.podIP": self.pod_ip,
            "status.hostIP": self.pod_ip,
        }
        match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if match:
            return (meta.get(match.group(1)) or {}).get(match.group(2))
        return fields.get(path)

    def command(self) -> list[str]:
        return [self.translate(part) for part in
                list(self.spec.get("command") or []) + list(self.spec.get("args") or [])]

    def security(self) -> tuple[str | None, bool]:
        """(``uid[:gid]`` or None for the image's user, read-only root filesystem)."""
        pod_ctx = self.pod["spec"].get("securityContext") or {}
        ctx = {**pod_ctx, **(self.spec.get("securityContext") or {})}
        uid, gid = ctx.get("runAsUser"), ctx.get("runAsGroup")
        user = None if uid is None else (f"{uid}:{gid}" if gid is not None else str(uid))
        return user, bool(ctx.get("readOnlyRootFilesystem"))

    def start(self, log: Path | None = None,
              image: str | None = None) -> subprocess.Popen[Any]:
        """Start the container: from this host's PATH, or with ``image`` in that image
        (resultstore_devtools.image: chroot isolation, host network, the pod's volumes
        mounted at their paths, its user and read-only root filesystem)."""
        self._publish_volumes()
        self._thread = threading.Thread(target=self._resync_loop, daemon=True,
                                        name="kubelet-resync")
        self._thread.start()
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        if image is not None:
            from .image import Volume, run_in_image

            user, read_only = self.security()
            mounts = [Volume(self.host_path(m["name"]), m["mountPath"],
                             bool(m.get("readOnly"))) for m in self.spec.get("volumeMounts") or []]
            command = list(self.spec.get("command") or []) + list(self.spec.get("args") or [])
            self.proc = run_in_image(
                image, command, env={**self.environment(translate=False), **self.extra_env},
                user=user, volumes=mounts, workdir=self.spec.get("workingDir"),
                read_only=read_only, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
            return self.proc
        env = {**os.environ, **self.environment(), **self.extra_env}
        working_dir = self.spec.get("workingDir")
        workdir = self.translate(working_dir) if working_dir else str(self.root)
        self.proc = subprocess.Popen(self.command(), env=env, cwd=workdir, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self.proc

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            from .procs import kill_group

            kill_group(self.proc, timeout=20)
        if self._thread is not None:
            self._thread.join(timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)
