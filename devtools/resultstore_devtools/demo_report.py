"""What the demo shows and what it leaves behind: SQL rows as tables, its work directory.

The demo's work directory holds secrets: the demo client's mirror of the store's Secret (a
database password), the worker pod's Secret volume, and the operator's ServiceAccount
kubeconfig (a bearer token valid for two hours). A run removes it at the end, on failure
and on Ctrl-C too; with ``--keep`` it stays and its last lines say where and what it holds,
so nothing with a credential is left in /tmp without a word. The formatting here is pure so
that it is unit-tested; :func:`remove_workdir` is the one side effect.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["WORKDIR_CONTENTS", "describe_workdir", "format_table", "kube_client",
           "leave_workdir", "remove_workdir"]

#: what each entry of the work directory is (the names demo.py and demo_cluster.py write)
WORKDIR_CONTENTS = {
    "client-binding": "the demo client's mirror of the store's Secret (database password)",
    "kube-client": "the demo's kubernetes client certificate and key (cluster admin)",
    "kubeconfig": "the merged kubeconfig of --kubeconfig/--context (cluster credentials)",
    "operator.kubeconfig": "the operator's ServiceAccount token (valid 2 hours)",
    "operator.log": "the operator's log",
    "worker-pod": "the worker pod's volumes: its mounted Secret (database password)",
    "worker.log": "the Celery worker's log",
}


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Rows as psql prints them (header, rule, one line per row), instead of raw tuples."""
    text = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in text)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [line(headers), "-+-".join("-" * w for w in widths)]
    out.extend(line(r) for r in text)
    plural = "" if len(text) == 1 else "s"
    out.append(f"({len(text)} row{plural})")
    return out


def describe_workdir(path: Path, names: Iterable[str]) -> list[str]:
    """The ``--keep`` closing lines: where the work directory is and what it holds."""
    lines = [f"Temporary files kept in {path} (remove with: rm -rf {path}):"]
    for name in sorted(names):
        lines.append(f"  {name}: {WORKDIR_CONTENTS.get(name, 'a file of the demo')}")
    return lines


def remove_workdir(path: Path) -> bool:
    """Delete the work directory and everything in it; True if it existed.

    Raises OSError when something cannot be removed, so that the demo says so instead of
    leaving a password behind silently.
    """
    if not path.exists():
        return False
    # a read-only directory (a Secret volume's) would stop rmtree: open them all first,
    # top-down, so that os.walk can enter each one after it was opened
    os.chmod(path, stat.S_IRWXU)
    for root, dirs, _files in os.walk(path):
        for name in dirs:
            sub = os.path.join(root, name)
            if not os.path.islink(sub):
                os.chmod(sub, stat.S_IRWXU)
    shutil.rmtree(path)
    return True


def leave_workdir(path: Path, *, keep: bool, failed: bool) -> list[str]:
    """At the end of a run: remove the work directory, or keep it (``--keep``) and name it.

    Returns the closing lines that say which, so that a kept password or token is never
    left without a word.
    """
    if keep:
        return describe_workdir(path, os.listdir(path) if path.is_dir() else [])
    remove_workdir(path)
    line = (f"Removed the demo's temporary directory {path} (its Secret copies, the "
            "operator's token, the logs).")
    if failed:
        line += " Run with --keep to keep it for a look at the logs."
    return [line]


def kube_client(kubeconfig: Path, work: Path) -> Any:
    """A kubernetes ApiClient whose certificate files are written under ``work``.

    The kubernetes client writes a kubeconfig's embedded client key and certificates to
    files in the system temp directory and deletes them only at a clean interpreter exit;
    under the work directory they go with it (or are named by ``--keep``) however the demo
    ends.
    """
    from kubernetes import client
    from kubernetes import config as kconfig

    configuration = client.Configuration()
    kconfig.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration,
                             temp_file_path=str(work / "kube-client"))
    return client.ApiClient(configuration)
