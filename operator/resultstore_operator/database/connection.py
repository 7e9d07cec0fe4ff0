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
from dataclasses import dataclass, field
from typing import Any

import psycopg
import sqlalchemy as sa

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

