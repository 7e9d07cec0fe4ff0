"""The operator's admin connection never sends a password the server could read.

A fake PostgreSQL listener on 127.0.0.1 asks for the password in the clear (and, second
case, as MD5). The operator's own connection code (database.AdminSession and check_login,
with the options every reconcile uses) must hang up without sending a PasswordMessage and
report InsecureConnection (also when TLS, once seen, is suddenly not offered); a control
connection without `require_auth` shows the listener
really does collect a password from a client that complies, so the test can fail.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from resultstore_devtools.pki import KeyPair, loopback_server_pair
from resultstore_devtools.postgres import PostgresServer
from resultstore_operator import database as dbio
from resultstore_operator.builders import reasons as r
from tests.helpers.fake_postgres import CLEARTEXT, MD5, TRUST, FakePostgres

PASSWORD = "admin-password-that-must-stay-home"


@pytest.mark.parametrize("auth_code", [CLEARTEXT, MD5])
@pytest.mark.parametrize("sslmode", ["disable", "prefer", "allow"])
def test_admin_session_refuses_to_send_the_password(auth_code: int, sslmode: str) -> None:
    with FakePostgres(auth_code=auth_code) as fake:
        target = dbio.Target("127.0.0.1", fake.port, "postgres", sslmode, connect_timeout=3)
        with pytest.raises(dbio.DatabaseError) as info:
            with dbio.AdminSession(target, dbio.Credentials("someone", PASSWORD)):
                pass
        assert fake.connections >= 1, "the operator never reached the fake listener"
        assert fake.passwords == [], f"the operator sent a password: {fake.passwords!r}"
    err = info.value
    assert err.reason == r.INSECURE_CONNECTION, f"{err.reason}: {err.message}"
    assert PASSWORD not in err.message and PASSWORD not in str(err)


def test_admin_session_refuses_a_server_that_skips_authentication() -> None:
    """An impostor answering "trust" would receive the DDL and the store roles' SCRAM
    verifiers that follow; SCRAM's server signature is what proves the real server."""
    with FakePostgres(auth_code=TRUST) as fake:
        target = dbio.Target("127.0.0.1", fake.port, "postgres", "disable", connect_timeout=3)
        with pytest.raises(dbio.DatabaseError) as info:
            with dbio.AdminSession(target, dbio.Credentials("someone", PASSWORD)):
                pass
        assert fake.connections >= 1 and fake.passwords == []
    assert info.value.reason == r.INSECURE_CONNECTION, info.value.message


def test_control_a_client_without_require_auth_accepts_trust() -> None:
    with FakePostgres(auth_code=TRUST) as fake:
        with psycopg.connect(host="127.0.0.1", port=fake.port, dbname="postgres",
                             user="someone", password=PASSWORD, sslmode="disable",
                             connect_timeout=3, autocommit=True) as conn:
            assert not conn.closed
        assert any(a.accepted for a in fake.attempts)


def test_check_login_refuses_to_send_a_store_password() -> None:
    with FakePostgres() as fake:
        target = dbio.Target("127.0.0.1", fake.port, "postgres", "disable", connect_timeout=3)
        with pytest.raises(dbio.DatabaseError) as info:
            dbio.check_login(target, dbio.Credentials("rs_x_a", PASSWORD))
        assert fake.connections >= 1 and fake.passwords == []
    assert info.value.reason == r.INSECURE_CONNECTION


def test_control_a_client_without_require_auth_does_send_it() -> None:
    """Proves the listener works: the refusal above is the operator's doing."""
    with FakePostgres() as fake:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(host="127.0.0.1", port=fake.port, dbname="postgres",
                            user="someone", password=PASSWORD, sslmode="disable",
                            connect_timeout=3)
        assert fake.passwords == [PASSWORD.encode() + b"\0"], fake.attempts


def test_admin_session_still_logs_in_with_scram(postgres: PostgresServer) -> None:
    """The real (SCRAM) server of the test suite: the same options connect fine."""
    target = dbio.Target(postgres.host, postgres.port, "postgres", "prefer", connect_timeout=5)
    admin = dbio.Credentials(postgres.superuser, postgres.password)
    with dbio.AdminSession(target, admin) as db:
        assert db.tls_in_use is False  # the private test server has no TLS
        assert db.raw.info.parameter_status("server_version")


def test_tls_once_seen_is_insisted_on() -> None:
    """`prefer` after a TLS session (status.database.tls): a listener that declines TLS, as
    an impostor stripping it would, gets neither a plaintext session nor the password."""
    with FakePostgres() as fake:
        target = dbio.Target("127.0.0.1", fake.port, "postgres", "prefer", connect_timeout=3,
                             tls_pinned=True)
        with pytest.raises(dbio.DatabaseError) as info:
            with dbio.AdminSession(target, dbio.Credentials("someone", PASSWORD)):
                pass
        assert fake.passwords == [] and fake.connections >= 1
    assert info.value.reason == r.INSECURE_CONNECTION, info.value.message


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[tuple[PostgresServer, KeyPair]]:
    """A private PostgreSQL serving TLS (a throwaway CA) with SCRAM authentication."""
    server = PostgresServer(durable=False)
    pair = loopback_server_pair()
    assert server.base_dir is not None
    cert, key = pair.write(server.base_dir / "tls", "server")
    server.extra_settings.update({"ssl": "on", "ssl_cert_file": f"'{cert}'",
                                  "ssl_key_file": f"'{key}'"})
    try:
        server.start()
        yield server, pair
    finally:
        server.destroy()


@pytest.mark.parametrize(("sslmode", "with_ca"), [
    ("prefer", False), ("require", False), ("verify-ca", True), ("verify-full", True)])
def test_admin_session_over_tls_uses_channel_binding(
        tls_postgres: tuple[PostgresServer, KeyPair], sslmode: str, with_ca: bool) -> None:
    """A TLS server: `prefer` takes TLS, and every TLS-requiring mode connects with
    channel_binding=require (SCRAM-SHA-256-PLUS), so the binding really is negotiated."""
    server, pair = tls_postgres
    target = dbio.Target(server.host, server.port, "postgres", sslmode,
                         pair.ca_pem.decode() if with_ca else None, connect_timeout=5)
    assert dbio.connection_security(sslmode)["channel_binding"] == (
        "prefer" if sslmode == "prefer" else "require")
    with dbio.AdminSession(target, dbio.Credentials(server.superuser, server.password)) as db:
        assert db.tls_in_use, f"sslmode={sslmode}: the admin session did not use TLS"
    pinned = dbio.Target(server.host, server.port, "postgres", sslmode,
                         pair.ca_pem.decode() if with_ca else None, connect_timeout=5,
                         tls_pinned=True)
    with dbio.AdminSession(pinned, dbio.Credentials(server.superuser, server.password)) as db:
        assert db.tls_in_use
