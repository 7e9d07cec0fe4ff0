"""The operator's admin connection never sends a password the server could read.

A fake PostgreSQL listener on 127.0.0.1 asks for the password in the clear (and, second
case, as MD5). The operator's own connection code (database.AdminSession and check_login,
with the options every reconcile uses) must hang up without sending a PasswordMessage and
report InsecureConnection; a control connection without `require_auth` shows the listener
really does collect a password from a client that complies, so the test can fail.
"""

from __future__ import annotations

import psycopg
import pytest

from resultstore_devtools.postgres import PostgresServer
from resultstore_operator import database as dbio
from resultstore_operator.builders import reasons as r
from tests.helpers.fake_postgres import CLEARTEXT, MD5, FakePostgres

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
