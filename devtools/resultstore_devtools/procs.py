"""Small process and port helpers shared by the local services.

The services here are started for one test session or one demo run and must never outlive
it, so every helper errs on the side of killing the whole process group.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

LOOPBACK = "127.0.0.1"
T = TypeVar("T")


def free_port(host: str = LOOPBACK) -> int:
    """Ask the kernel for a free port; the small race with other binders is acceptable here."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def eventually(
    probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.25,
    error: type[Exception] = TimeoutError,
) -> T:
    """Poll until probe() returns something truthy, and return it.

    Servers, controllers and the operator all converge asynchronously; the error names what
    we were waiting for (and the last value seen, when there was one).
    """
    deadline = time.monotonic() + timeout
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            seen = "" if last in (None, False) else f" (last: {last!r})"
            raise error(f"timed out after {timeout:.0f}s waiting for {what}{seen}")
        time.sleep(interval)


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
) -> None:
    eventually(predicate, timeout, what, interval)


def port_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie (containers may lack a reaping init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True if ``url`` answers 200 now; for polling health endpoints with eventually()."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def service_user() -> tuple[int, int] | None:
    """Return (uid, gid) to drop to when running as root.

    initdb and postgres refuse to run as root; Debian's postgresql package creates a
    `postgres` system user that we borrow. Non-root users run services as themselves.
    """
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError as exc:
        raise RuntimeError(
            "running as root but no 'postgres' system user exists; "
            "install Debian's postgresql package (apt-get install postgresql)"
        ) from exc
    return entry.pw_uid, entry.pw_gid


def demote(ids: tuple[int, int] | None) -> Callable[[], None] | None:
    if ids is None:
        return None
    uid, gid = ids

    def _drop() -> None:
        os.setgid(gid)
        os.setuid(uid)

    return _drop


def chown_tree(path: Path, ids: tuple[int, int] | None) -> None:
    if ids is None:
        return
    for root, dirs, files in os.walk(path):
        os.chown(root, *ids)
        for name in dirs + files:
            os.chown(os.path.join(root, name), *ids, follow_symlinks=False)


def find_binary(name: str, extra_dirs: list[str]) -> str:
    found = shutil.which(name)
    if found:
        return found
    for directory in extra_dirs:
        candidate = Path(directory) / name
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(
        f"{name} not found on PATH or in {extra_dirs}; run scripts/bootstrap to install it"
    )


def kill_group(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Terminate a process started with start_new_session=True and everything it spawned."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)


# A watchdog that outlives nothing: it sleeps until its parent (the test session, the demo)
# dies, then runs the service's stop command and removes its directory. It exists because a
# SIGKILLed pytest never runs fixture finalizers, and pg_ctl daemonises PostgreSQL out of
# reach of a parent-death signal. argv: uid gid directory-or-"" command...
_WATCHDOG = r"""
import ctypes, os, shutil, signal, subprocess, sys
uid, gid, directory, command = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
def drop():
    if uid >= 0:
        os.setgid(gid)
        os.setuid(uid)
def cleanup(*_):
    subprocess.run(command, preexec_fn=drop, capture_output=True, cwd="/", timeout=60)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
    os._exit(0)
signal.signal(signal.SIGTERM, cleanup)
ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != int(os.environ["WATCHDOG_PARENT"]):
    cleanup()  # the parent died before the prctl took effect
sys.stdout.write("armed\n")
sys.stdout.flush()
while True:
    signal.pause()
"""


def start_watchdog(command: list[str], directory: Path | None = None,
                   ids: tuple[int, int] | None = None) -> subprocess.Popen[bytes]:
    """Run ``command`` (as ``ids``) and remove ``directory`` when this process dies.

    The parent-death signal is tied to the thread that starts the watchdog, so call this
    from the main thread (fixtures and the demo do). Disarm with :func:`disarm_watchdog`.
    """
    import sys

    uid, gid = ids if ids is not None else (-1, -1)
    proc = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(uid), str(gid), str(directory or ""), *command],
        env={**os.environ, "WATCHDOG_PARENT": str(os.getpid())},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"armed":
        raise RuntimeError("the service watchdog did not start")
    return proc


def disarm_watchdog(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop a watchdog without running its cleanup (the owner is stopping the service)."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


# --- the state records of `resultstore-dev <service> start|stop|status|env` ----------------
# A detached service is recorded in <state root>/<name>.json (at least its port); the
# commands of every service read, check and clear that record the same way.


def clear_stale_record(state: Path, directory: Path | None = None) -> bool:
    """For ``start``: False, said on stderr, when the recorded service still answers.

    A stale record (the machine rebooted, the service was killed) is removed, with the
    service's ``directory``, so the service starts afresh.
    """
    import json
    import sys

    if state.exists():
        data = json.loads(state.read_text())
        if port_open(int(data["port"])):
            print(f"already running on port {data['port']}; see {state}", file=sys.stderr)
            return False
        state.unlink()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
    return True


def read_record(state: Path, name: str) -> dict[str, Any] | None:
    """For ``stop``/``status``/``env``: the record, or None, said on stderr, when none."""
    import json
    import sys

    if not state.exists():
        print(f"{name} is not started", file=sys.stderr)
        return None
    data: dict[str, Any] = json.loads(state.read_text())
    return data


def record_answers(state: Path, name: str, port: int) -> bool:
    """Whether the recorded service answers on its port; when not, says the record is stale."""
    import sys

    if port_open(port):
        return True
    print(f"{name} is not running (stale record {state}); run start again", file=sys.stderr)
    return False


def stop_recorded(port: int, pid: int, what: str) -> None:
    """Stop a detached service's process group and wait until its port closes.

    Only a service that still answers on its port is ours to stop (a stale record's pid may
    belong to anything by now).
    """
    try:
        if port_open(port):
            os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    else:
        wait_for(lambda: not port_open(port), 20, f"{what} on {port} to stop")
