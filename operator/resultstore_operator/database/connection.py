"""The admin connection's target, security and errors: how the operator connects at all.

Why its own module: these are the rules every connection with a password follows (the admin
session and the login check of a store role alike): libpq is told
`require_auth=scram-sha-256` (a server, or an impostor on the named host, asking for a
cleartext or MD5 password gets nothing), channel binding is required whenever TLS is
(`connection_security`), and every driver error becomes a `DatabaseError` with a distinct
reason per cause (admin password wrong, host unreachable, role lacks CREATEROLE, ...) and a
redacted message: no password can reach a log line, an Event or the status through an
exception.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.pool import QueuePool

from resultstore_backend.config import redact

from ..builders import reasons as r


class DatabaseError(Exception):
    """A failure with a user-facing reason; the message never contains a password."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Target:
    """Where to connect (the store's database) and how (sslmode, CA, timeout).

    `tls_pinned`: an earlier admin session to this server ran over TLS (recorded in the
    store's status), so a `prefer`/`allow` connection now insists on it.
    """

    host: str
    port: int
    database: str
    sslmode: str = "prefer"
    ca_cert: str | None = field(default=None, repr=False)
    connect_timeout: int = 5
    tls_pinned: bool = False


#: the only password exchange the operator takes part in: the password never leaves
REQUIRE_AUTH = "scram-sha-256"
_TLS_MODES = ("require", "verify-ca", "verify-full")


def connection_security(sslmode: str, tls_pinned: bool = False) -> dict[str, str]:
    """libpq options for a connection that may carry a password.

    - SCRAM-SHA-256 always (`require_auth`): the password itself is never sent.
    - A mode that demands TLS also demands channel binding (SCRAM-SHA-256-PLUS), so a
      man in the middle holding some certificate cannot relay the exchange.
    - `prefer` (the default) and `allow` mean "TLS when the server offers it": libpq
      tries TLS first, with channel binding when the exchange supports it; once a TLS
      session has been seen (`tls_pinned`) they behave as `require`, so a later downgrade
      to plaintext is refused instead of followed. `allow` is not tried plaintext-first
      for the admin connection.
    - `disable` is for servers without TLS (local development): SCRAM still applies.
    """
    if sslmode in _TLS_MODES:
        return {"sslmode": sslmode, "channel_binding": "require", "require_auth": REQUIRE_AUTH}
    if sslmode in ("prefer", "allow"):
        if tls_pinned:
            return {"sslmode": "require", "channel_binding": "require",
                    "require_auth": REQUIRE_AUTH}
        return {"sslmode": "prefer", "channel_binding": "prefer",
                "require_auth": REQUIRE_AUTH}
    return {"sslmode": "disable", "channel_binding": "disable", "require_auth": REQUIRE_AUTH}


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)




def _message_of(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    base = orig if isinstance(orig, BaseException) else exc
    text = str(base).strip().replace("\n", " ")
    return " ".join(text.split())


def classify(exc: BaseException, *secrets: str | None) -> DatabaseError:
    """Map a driver/SQLAlchemy exception onto one of the documented reasons."""
    orig = getattr(exc, "orig", None)
    base = orig if isinstance(orig, BaseException) else exc
    message = redact(_message_of(exc), *secrets)
    lowered = message.lower()
    sqlstate = getattr(base, "sqlstate", None)
    if sqlstate == "42501" or "permission denied" in lowered or "must be" in lowered and (
            "superuser" in lowered or "createrole" in lowered):
        return DatabaseError(r.INSUFFICIENT_PRIVILEGE, message)
    if isinstance(base, psycopg.OperationalError | psycopg.InterfaceError) or isinstance(
            exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        if ("authentication method requirement" in lowered
                or "channel binding" in lowered
                or "server does not support ssl" in lowered):
            return DatabaseError(
                r.INSECURE_CONNECTION,
                f"{message} (the operator only authenticates with SCRAM-SHA-256, with "
                f"channel binding over TLS; nothing was sent)")
        if ("password authentication failed" in lowered
                or "no pg_hba.conf entry" in lowered
                or ("role" in lowered and "does not exist" in lowered)
                or "authentication failed" in lowered):
            return DatabaseError(r.ADMIN_AUTH_FAILED, message)
        if "database" in lowered and "does not exist" in lowered:
            return DatabaseError(r.DATABASE_UNREACHABLE, message)
        return DatabaseError(r.DATABASE_UNREACHABLE, message)
    return DatabaseError(r.DATABASE_ERROR, message)


class CaFile:
    """The CA certificate as a file for libpq's sslrootcert, removed on close."""

    def __init__(self, pem: str | None) -> None:
        self.path: str | None = None
        if pem:
            fd, path = tempfile.mkstemp(prefix="resultstore-ca-", suffix=".crt")
            with os.fdopen(fd, "w") as fh:
                fh.write(pem)
            self.path = path

    def close(self) -> None:
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None


def connect_args(target: Target, ca: CaFile) -> dict[str, Any]:
    args: dict[str, Any] = {
        **connection_security(target.sslmode, target.tls_pinned),
        "connect_timeout": target.connect_timeout,
        "application_name": "resultstore-operator",
    }
    if ca.path:
        args["sslrootcert"] = ca.path
    return args


def check_login(target: Target, creds: Credentials) -> bool:
    """True when `creds` can log in; False on an authentication failure.

    Other failures (host down) raise DatabaseError: "cannot tell" must not be mistaken for
    "wrong password", or the operator would reset a valid password during an outage.
    """
    ca = CaFile(target.ca_cert)
    try:
        with psycopg.connect(host=target.host, port=target.port, dbname=target.database,
                             user=creds.username, password=creds.password,
                             **connect_args(target, ca)):
            return True
    except psycopg.Error as exc:
        err = classify(exc, creds.password)
        if err.reason == r.ADMIN_AUTH_FAILED:
            return False
        raise err from None
    finally:
        ca.close()



@dataclass
class _Kept:
    engine: sa.Engine
    ca: CaFile
    last_used: float


class AdminEngines:
    """The admin connections of a running operator, kept from one reconcile to the next.

    Why: a reconcile used to build a SQLAlchemy engine, initialise its dialect (server
    version, string settings) and authenticate a new backend, and throw all of it away a
    second later; at 1000 stores that was done for every provisioning and every drift check,
    and the engine's compiled-statement cache went with it, so the schema migration's
    catalog queries were compiled again for every store (a third of the operator's CPU in a
    1000-store profile). Here there is one engine per (target, admin credentials) and a pool
    of its connections:

    - at most `size` idle connections per engine, `size + overflow` in use (the reconcile
      threads are the only users);
    - a connection is pinged at checkout (a server restart costs no failed reconcile) and
      replaced once older than `max_age` seconds, so a password or TLS setting changed on the
      server side is met within that time by a fresh authentication (a changed Secret is a
      new key, so a new engine, at once);
    - an engine unused for `idle` seconds is disposed: its connections close and its CA file
      is removed, so stores that went away leave no session open on their server;
    - automatic server-side statement preparation is off (as it was for a connection that
      lived one reconcile): a long-lived session must not keep plans of objects that
      migrations change.

    The session a reconcile gets is reset (rolled back) when returned; nothing of one
    reconcile's transaction state reaches the next. Thread-safe.
    """

    def __init__(self, size: int = 4, overflow: int = 16, idle: float = 30.0,
                 max_age: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.overflow = overflow
        self.idle = idle
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._kept: dict[tuple[Target, Credentials], _Kept] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def _engine(self, target: Target, admin: Credentials) -> sa.Engine:
        now = self._clock()
        with self._lock:
            self._reap(now)
            kept = self._kept.get((target, admin))
            if kept is None:
                ca = CaFile(target.ca_cert)
                url = URL.create("postgresql+psycopg", username=admin.username,
                                 password=admin.password, host=target.host,
                                 port=target.port, database=target.database)
                engine = sa.create_engine(
                    url, poolclass=QueuePool, pool_size=self.size,
                    max_overflow=self.overflow, pool_pre_ping=True,
                    pool_recycle=max(1, int(self.max_age)),
                    connect_args={**connect_args(target, ca), "prepare_threshold": None})
                kept = self._kept[(target, admin)] = _Kept(engine, ca, now)
            kept.last_used = now
            return kept.engine

    def _reap(self, now: float) -> None:
        """Dispose of the engines nobody used for `idle` seconds (none checked out)."""
        for key, kept in list(self._kept.items()):
            if now - kept.last_used < self.idle:
                continue
            pool = kept.engine.pool
            if isinstance(pool, QueuePool) and pool.checkedout():
                continue
            del self._kept[key]
            kept.engine.dispose()
            kept.ca.close()

    def connect(self, target: Target, admin: Credentials) -> sa.Connection:
        """A pooled admin connection (return it with `close()`); driver errors propagate."""
        engine = self._engine(target, admin)
        try:
            return engine.connect()
        finally:
            with self._lock:
                kept = self._kept.get((target, admin))
                if kept is not None:
                    kept.last_used = self._clock()

    def reap(self) -> None:
        with self._lock:
            self._reap(self._clock())

    def close(self) -> None:
        """Dispose of every engine (operator shutdown, tests)."""
        with self._lock:
            for kept in self._kept.values():
                kept.engine.dispose()
                kept.ca.close()
            self._kept.clear()
