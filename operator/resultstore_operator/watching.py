"""Kopf's watch-stream timeouts, chosen so that a silent stream is noticed and replaced.

Why: a watch can go silent without closing (a load balancer or NAT drops the idle TCP
flow, an API server restarts behind a proxy); Kopf then waits forever and the operator stops
seeing changes (nolar/kopf#585, #957, #1276). Each value below bounds one way of hanging:

- `server_timeout` 300 s: the API server ends each watch request after at most 5 min
  (`timeoutSeconds`), so every stream is renewed regularly, well inside the API server's own
  random 30..60 min and below the default etcd compaction interval (5 min) plus slack, so the
  resourceVersion Kopf resumes from is still in the watch cache.
- `client_timeout` 330 s: the whole request on our side; 30 s above `server_timeout`, so the
  server normally ends the stream first, and a stream the server forgot is cut by us.
- `connect_timeout` 10 s: a TCP/TLS connect that takes longer is a dead path; retry at once
  (Kopf's `reconnect_backoff`) instead of waiting for the OS's two minutes.
- `inactivity_timeout` 70 s (Kopf's default, kept and said here): the API server sends a
  BOOKMARK at least every 60 s on a watch that asks for them; 70 s without any event means
  the stream is dead even though the socket is open.
"""

from __future__ import annotations

from typing import Any

SERVER_TIMEOUT = 300  # an int: the API server parses timeoutSeconds=300.0 as a 400
CLIENT_TIMEOUT = SERVER_TIMEOUT + 30.0
CONNECT_TIMEOUT = 10.0
INACTIVITY_TIMEOUT = 70.0


def configure_watching(watching: Any) -> None:
    """Set the timeouts on `kopf.OperatorSettings.watching` (duck-typed: no Kopf import)."""
    watching.server_timeout = SERVER_TIMEOUT
    watching.client_timeout = CLIENT_TIMEOUT
    watching.connect_timeout = CONNECT_TIMEOUT
    if hasattr(watching, "inactivity_timeout"):  # kopf >= 1.45
        watching.inactivity_timeout = INACTIVITY_TIMEOUT


def register(registry: Any, settings: Any) -> None:
    """A Kopf startup handler that applies the timeouts (registered after the handlers')."""
    import kopf

    @kopf.on.startup(registry=registry, id="resultstore-watching")
    def _watching(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_watching(settings.watching)
