"""A private PgBouncer in front of a private PostgreSQL (tests, the benchmark, developers).

Why it exists: PgBouncer in transaction mode is what many fleets put between Celery and
PostgreSQL (CloudNativePG's ``Pooler``, Crunchy's pgbouncer), and it breaks what a
client takes for granted of a session: a server session is handed out per transaction,
so server-side prepared statements, ``SET``, session advisory locks and ``LISTEN`` do not
survive from one transaction to the next. The backend's claim to work through it is only
worth something when the tests run through a real one, started like the project's
PostgreSQL and Redis: Debian's ``pgbouncer`` on a free 127.0.0.1 port.

Authentication never sends a password in cleartext and the clients' passwords are stored
nowhere: clients authenticate to PgBouncer with SCRAM-SHA-256 against the verifier PgBouncer
reads from the server (``auth_query``, through a SECURITY DEFINER function that only a
dedicated lookup role may call), and PgBouncer logs in to PostgreSQL with the client's own
SCRAM keys (SCRAM pass-through: the verifier it checked is the server's). Roles a test
creates, and rotated passwords, work at once. The ``auth_file`` holds the admin console
user's SCRAM verifier and the lookup role's password (PgBouncer must log in as that role
to run the lookup; the role can do nothing else), in a directory only PgBouncer's user
reads. PgBouncer runs ``auth_query`` inside the database a client asks for, so the
function is installed per database (:meth:`PgBouncer.install_lookup`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .postgres import PostgresServer
from .procs import (
    LOOPBACK,
    chown_tree,
    clear_stale_record,
    disarm_watchdog,
    find_binary,
    free_port,
    kill_group,
    port_open,
    read_record,
    record_answers,
    service_user,
    start_watchdog,
    stop_recorded,
    wait_for,
)

#: protocol-level prepared statements in transaction mode (``max_prepared_statements``)
PREPARED_STATEMENTS_SINCE = (1, 21)
LOOKUP_ROLE = "resultstore_pgbouncer_lookup"
LOOKUP_SCHEMA = "resultstore_pgbouncer"
ADMIN_USER = "resultstore_pgbouncer_admin"
ADMIN_DATABASE = "pgbouncer"

_VERSION_RE = re.compile(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?")


def scram_verifier(password: str, *, iterations: int = 4096, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores (``rolpassword``), computed here.

    Used for the admin console's entry in the auth_file and for the lookup role's password
    on the server, so neither password crosses the wire or lands in a file in clear.
    """
    salt = salt or secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def pgbouncer_version(binary: str) -> tuple[int, int, int]:
    """``pgbouncer --version`` as a tuple (the first line reads ``PgBouncer 1.18.0``)."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    match = _VERSION_RE.search(out.stdout + out.stderr)
    if match is None:
        raise RuntimeError(f"cannot read the version of {binary}: {out.stdout.strip()!r}")
    return int(match[1]), int(match[2]), int(match[3] or 0)


def prepared_statements_in(version: tuple[int, ...]) -> bool:
    """Whether a PgBouncer of ``version`` keeps protocol-level prepared statements in
    transaction mode (``max_prepared_statements``, 1.21)."""
    return tuple(version[:2]) >= PREPARED_STATEMENTS_SINCE


def _quote_auth(value: str) -> str:
    """An auth_file field: double quotes, a literal quote doubled."""
    return '"' + value.replace('"', '""') + '"'


def _lookup_sql() -> list[str]:
    """The SECURITY DEFINER lookup auth_query calls (PgBouncer's documented pattern).

    Only roles that can log in and have a SCRAM verifier are answered: an MD5 or empty
    password would let PgBouncer fall back to weaker authentication.
    """
    return [
        f"CREATE SCHEMA IF NOT EXISTS {LOOKUP_SCHEMA}",
        f"REVOKE ALL ON SCHEMA {LOOKUP_SCHEMA} FROM PUBLIC",
        f"""CREATE OR REPLACE FUNCTION {LOOKUP_SCHEMA}.lookup(
                p_user text, OUT usename text, OUT passwd text)
            RETURNS record LANGUAGE sql SECURITY DEFINER
            SET search_path = pg_catalog AS $$
                SELECT rolname::text, rolpassword::text FROM pg_authid
                WHERE rolname = p_user AND rolcanlogin
                  AND rolpassword LIKE 'SCRAM-SHA-256$%'
                  AND (rolvaliduntil IS NULL OR rolvaliduntil > now())
            $$""",
        f"REVOKE ALL ON FUNCTION {LOOKUP_SCHEMA}.lookup(text) FROM PUBLIC",
        f"GRANT USAGE ON SCHEMA {LOOKUP_SCHEMA} TO {LOOKUP_ROLE}",
        f"GRANT EXECUTE ON FUNCTION {LOOKUP_SCHEMA}.lookup(text) TO {LOOKUP_ROLE}",
    ]


def _die_with_parent_as(ids: tuple[int, int] | None, detached: bool) -> Any:
    """preexec_fn: leave root (PgBouncer refuses it), then tie our life to the parent's.

    The parent-death signal is cleared when the credentials change, so it is set after
    the setuid.
    """
    def _preexec() -> None:
        if ids is not None:
            os.setgid(ids[1])
            os.setuid(ids[0])
        if not detached:
            import ctypes
            import signal

            ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG

    return _preexec


@dataclass
class PgBouncer:
    """One PgBouncer in front of ``upstream``; start() is idempotent, stop() leaves nothing.

    Every database of the upstream server is reachable under its own name (a ``*``
    entry); a client's role and password are the server's.
    """

    upstream: PostgresServer
    pool_mode: str = "transaction"
    port: int = 0
    host: str = LOOPBACK
    base_dir: Path | None = None
    #: server connections per (database, role) pair
    default_pool_size: int = 20
    max_client_conn: int = 1000
    #: keep running after this process exits (``resultstore-dev pgbouncer start``)
    detached: bool = False
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(18),
                                repr=False)
    lookup_password: str = field(default_factory=lambda: secrets.token_urlsafe(18),
                                 repr=False)

    def __post_init__(self) -> None:
        if self.pool_mode not in ("session", "transaction", "statement"):
            raise ValueError(f"pool_mode must be session, transaction or statement, "
                             f"got {self.pool_mode!r}")
        if not self.port:
            self.port = free_port()
        self._owns_dir = self.base_dir is None
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="resultstore-pgbouncer-"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._ids = service_user()
        self.binary = find_binary("pgbouncer", ["/usr/sbin", "/usr/bin"])
        self.version = pgbouncer_version(self.binary)
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    # -- facts ------------------------------------------------------------------------

    @property
    def version_text(self) -> str:
        return ".".join(str(part) for part in self.version)

    @property
    def supports_prepared_statements(self) -> bool:
        """Whether this PgBouncer keeps protocol-level prepared statements in transaction
        mode (1.21's ``max_prepared_statements``); when not, clients must not prepare."""
        return prepared_statements_in(self.version)

    @property
    def config_file(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "pgbouncer.ini"

    @property
    def log_file(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "pgbouncer.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- set-up -----------------------------------------------------------------------

    def _write_config(self) -> None:
        assert self.base_dir is not None
        auth_file = self.base_dir / "userlist.txt"
        auth_file.write_text(
            f"{_quote_auth(ADMIN_USER)} {_quote_auth(scram_verifier(self.admin_password))}\n"
            f"{_quote_auth(LOOKUP_ROLE)} {_quote_auth(self.lookup_password)}\n")
        auth_file.chmod(0o600)
        up = self.upstream
        settings = {
            "listen_addr": self.host,
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "pidfile": str(self.base_dir / "pgbouncer.pid"),
            "logfile": str(self.log_file),
            "auth_type": "scram-sha-256",
            "auth_file": str(auth_file),
            "auth_user": LOOKUP_ROLE,
            "auth_query": f"SELECT usename, passwd FROM {LOOKUP_SCHEMA}.lookup($1)",
            "admin_users": ADMIN_USER,
            "stats_users": ADMIN_USER,
            "pool_mode": self.pool_mode,
            "default_pool_size": str(self.default_pool_size),
            "max_client_conn": str(self.max_client_conn),
            # psycopg sends none of these, SQLAlchemy's psycopg2 dialect may
            "ignore_startup_parameters": "extra_float_digits",
            "server_login_retry": "1",
            "log_connections": "0",
            "log_disconnections": "0",
        }
        if self.supports_prepared_statements:
            settings["max_prepared_statements"] = "200"
        self.config_file.write_text(
            "[databases]\n"
            f"* = host={up.host} port={up.port}\n\n"
            "[pgbouncer]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        self.base_dir.chmod(0o700)
        chown_tree(self.base_dir, self._ids)

    def _ensure_lookup_role(self) -> None:
        import psycopg
        from psycopg import sql

        verifier = scram_verifier(self.lookup_password)
        with psycopg.connect(self.upstream.dsn(), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                                  (LOOKUP_ROLE,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(sql.SQL(verb + " ROLE {} LOGIN NOINHERIT PASSWORD {}").format(
                sql.Identifier(LOOKUP_ROLE), sql.Literal(verifier)))

    def install_lookup(self, database: str) -> None:
        """Make ``database`` reachable through this PgBouncer (auth_query's function)."""
        import psycopg

        with psycopg.connect(self.upstream.dsn(database), autocommit=True) as conn:
            for statement in _lookup_sql():
                conn.execute(statement)

    # -- life -------------------------------------------------------------------------

    def start(self) -> None:
        if self.running():
            return
        self.upstream.start()
        self._ensure_lookup_role()
        self._write_config()
        assert self.base_dir is not None
        if not self.detached and self._owns_dir and (
                self._watchdog is None or self._watchdog.poll() is not None):
            # PgBouncer itself dies with us (parent-death signal); its directory, which
            # holds the auth_file, is removed by a watchdog if we are SIGKILLed
            self._watchdog = start_watchdog(["true"], self.base_dir)
        log = (self.base_dir / "stdout.log").open("ab")
        self._proc = subprocess.Popen(
            [self.binary, str(self.config_file)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd="/",
            preexec_fn=_die_with_parent_as(self._ids, self.detached),  # noqa: PLW1509
        )
        try:
            wait_for(lambda: port_open(self.port, self.host) or self._proc is None
                     or self._proc.poll() is not None, 20, f"pgbouncer on {self.port}")
        finally:
            log.close()
        if self._proc.poll() is not None:
            raise RuntimeError(f"pgbouncer exited with {self._proc.returncode}:"
                               f"{self._log_tail()}")

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _log_tail(self) -> str:
        assert self.base_dir is not None
        lines: list[str] = []
        for name in ("stdout.log", "pgbouncer.log"):
            path = self.base_dir / name
            if path.exists():
                lines += path.read_text(errors="replace").splitlines()[-15:]
        return ("\n--- pgbouncer log ---\n" + "\n".join(lines)) if lines else ""

    def stop(self) -> None:
        if self._proc is not None:
            kill_group(self._proc)
            self._proc = None

    def destroy(self) -> None:
        self.stop()
        disarm_watchdog(self._watchdog)
        self._watchdog = None
        if self._owns_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # -- addresses --------------------------------------------------------------------

    def url(self, database: str, user: str | None = None, password: str | None = None,
            driver: str = "postgresql+psycopg") -> str:
        """The upstream's URL for ``database`` with this PgBouncer's host and port."""
        direct = self.upstream.url(database, user, password, driver)
        return direct.replace(f"@{self.upstream.host}:{self.upstream.port}/",
                              f"@{self.host}:{self.port}/", 1)

    # -- the admin console --------------------------------------------------------------

    @contextmanager
    def admin(self) -> Iterator[Any]:
        """A connection to the admin console (``SHOW POOLS``, ``SHOW STATS``, ...).

        The console speaks only the simple query protocol: use :meth:`show`.
        """
        import psycopg

        conn = psycopg.connect(host=self.host, port=self.port, dbname=ADMIN_DATABASE,
                               user=ADMIN_USER, password=self.admin_password,
                               autocommit=True, connect_timeout=5)
        try:
            yield conn
        finally:
            conn.close()

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on the admin console, as one dict per row."""
        import psycopg

        if not re.fullmatch(r"[A-Za-z_]+", what):
            raise ValueError(f"not a SHOW command: {what!r}")
        with self.admin() as conn:
            cur = psycopg.ClientCursor(conn)
            cur.execute(f"SHOW {what.upper()}")
            names = [col.name for col in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


# --------------------------------------------------------------------------- the command


def _upstream_from_state(state_root: Path) -> PostgresServer | None:
    """The ``resultstore-dev postgres`` server this PgBouncer goes in front of."""
    import json

    state = state_root / "postgres.json"
    if not state.exists():
        return None
    data = json.loads(state.read_text())
    server = PostgresServer(base_dir=state_root / "postgres", port=int(data["port"]),
                            password=data["password"], detached=True)
    server._initialised = True
    return server if port_open(server.port) else None


def _connectable_databases(upstream: PostgresServer) -> list[str]:
    import psycopg

    with psycopg.connect(upstream.dsn(), autocommit=True) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datallowconn").fetchall()
    return [str(row[0]) for row in rows]


def run_cli(action: str, state_root: Path) -> int:
    """``resultstore-dev pgbouncer start|stop|status|env`` (see cli.py).

    ``start`` puts a transaction-mode PgBouncer in front of the running
    ``resultstore-dev postgres`` and leaves it running; the lookup function goes into every
    database there and into ``template1``, so databases created later are reachable too.
    """
    import json
    import sys

    state = state_root / "pgbouncer.json"
    if action == "start":
        if not clear_stale_record(state, state_root / "pgbouncer"):
            return 1
        upstream = _upstream_from_state(state_root)
        if upstream is None:
            print("postgres is not running: run `resultstore-dev postgres start` first",
                  file=sys.stderr)
            return 1
        bouncer = PgBouncer(upstream, base_dir=state_root / "pgbouncer", detached=True)
        bouncer.start()
        for database in _connectable_databases(upstream):
            bouncer.install_lookup(database)
        state.write_text(json.dumps({
            "port": bouncer.port, "pid": bouncer.pid, "pool_mode": bouncer.pool_mode,
            "version": bouncer.version_text, "admin_user": ADMIN_USER,
            "admin_password": bouncer.admin_password,
            "prepared_statements": bouncer.supports_prepared_statements}))
        state.chmod(0o600)
        print(f"export RESULTSTORE_PGBOUNCER_URL='{bouncer.url('postgres')}'")
        return 0
    data = read_record(state, "pgbouncer")
    if data is None:
        return 1
    port = int(data["port"])
    if action == "stop":
        stop_recorded(port, int(data["pid"]), "pgbouncer")
        state.unlink()
        shutil.rmtree(state_root / "pgbouncer", ignore_errors=True)
        return 0
    if not record_answers(state, "pgbouncer", port):
        return 1
    upstream = _upstream_from_state(state_root)
    if action == "status":
        print(f"pgbouncer {data['version']} on {LOOPBACK}:{port}, pool_mode={data['pool_mode']}, "
              f"prepared statements in transaction mode: "
              f"{'yes' if data['prepared_statements'] else 'no (before 1.21)'}")
        print(f"admin console: psql 'host={LOOPBACK} port={port} dbname={ADMIN_DATABASE} "
              f"user={data['admin_user']}' (password in {state})")
        return 0
    if upstream is None:
        print("postgres is not running", file=sys.stderr)
        return 1
    url = upstream.url("postgres").replace(f"@{upstream.host}:{upstream.port}/",
                                           f"@{LOOPBACK}:{port}/", 1)
    print(f"export RESULTSTORE_PGBOUNCER_URL='{url}'")
    return 0
