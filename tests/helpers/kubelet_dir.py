"""Write a directory exactly the way the kubelet's atomic writer updates a Secret volume.

The writer lives in ``resultstore_devtools.kubelet`` (the demo uses it too); tests import it
from here so they read as test helpers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from resultstore_devtools.kubelet import KubeletDir

__all__ = ["KubeletDir", "write_kubelet_dir"]


def write_kubelet_dir(path: str | os.PathLike[str], payload: Mapping[str, str | bytes]) -> str:
    """One-shot helper: publish ``payload`` into ``path`` (creating or updating it)."""
    return KubeletDir(path).write(payload)
