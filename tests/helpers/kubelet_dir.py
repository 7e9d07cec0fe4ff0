"""Write a directory exactly the way the kubelet's atomic writer updates a Secret volume.

Layout (k8s.io/kubernetes/pkg/volume/util/atomic_writer.go)::

    DIR/..2024_01_01_00_00_00.123456789/<key>   the payload of one version
    DIR/..data -> ..2024_01_01_00_00_00.123456789
    DIR/<key>  -> ..data/<key>

An update writes a new timestamped directory, points ``..data_tmp`` at it,
renames ``..data_tmp`` over ``..data`` (the one atomic step), then adds/removes
the user-visible ``<key>`` symlinks and deletes the old timestamped directory.
Readers that resolve ``..data`` once therefore always see one consistent
version, which is what the backend's hot reload relies on.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["KubeletDir", "write_kubelet_dir"]

DATA = "..data"
DATA_TMP = "..data_tmp"


def _timestamped_name() -> str:
    now = time.time()
    stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime(now))
    return f"..{stamp}.{time.monotonic_ns() % 10**9:09d}"


class KubeletDir:
    """A Secret/ConfigMap volume directory updated like the kubelet does."""

    def __init__(self, path: str | os.PathLike[str], mode: int = 0o644) -> None:
        self.path = Path(path)
        self.mode = mode

    def current_target(self) -> str | None:
        try:
            return os.readlink(self.path / DATA)
        except OSError:
            return None

    def write(self, payload: Mapping[str, str | bytes]) -> str:
        """Publish ``payload`` (key -> content) as the new version; return its dir name."""
        self.path.mkdir(parents=True, exist_ok=True)
        old = self.current_target()
        new = _timestamped_name()
        while (self.path / new).exists():
            new = _timestamped_name()
        tsdir = self.path / new
        tsdir.mkdir(mode=0o755)
        for key, content in payload.items():
            if "/" in key or key.startswith(".."):
                raise ValueError(f"invalid key {key!r}")
            data = content.encode("utf-8") if isinstance(content, str) else content
            file = tsdir / key
            file.write_bytes(data)
            file.chmod(self.mode)
        tmp = self.path / DATA_TMP
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(new, tmp)
        os.rename(tmp, self.path / DATA)  # the atomic swap
        # user-visible symlinks: add new keys, drop keys that disappeared
        for key in payload:
            link = self.path / key
            if not link.is_symlink():
                os.symlink(f"{DATA}/{key}", link)
        if old is not None:
            for entry in os.listdir(self.path / old):
                if entry not in payload:
                    link = self.path / entry
                    if link.is_symlink():
                        link.unlink()
            shutil.rmtree(self.path / old, ignore_errors=True)
        return new


def write_kubelet_dir(path: str | os.PathLike[str], payload: Mapping[str, str | bytes]) -> str:
    """One-shot helper: publish ``payload`` into ``path`` (creating or updating it)."""
    return KubeletDir(path).write(payload)
