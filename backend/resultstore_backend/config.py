"""Configuration of a result store: the Secret the operator writes and the backend reads.

The operator builds a :class:`Binding` and writes :func:`render_binding`'s keys into a
Secret; the kubelet mounts it as files; the backend reads it back with
:func:`read_binding_dir`. Both sides use this one module so the two can never
disagree about key names or formats. It imports SQLAlchemy (for URLs) but never
Celery, so the operator can use it without the worker stack.

Passwords never appear in reprs or error messages: every error is a
:class:`ConfigError` that names the file (and JSON key) at fault.

Why one module: the writing side (:func:`render_binding`) and the reading side
(:func:`read_binding_dir`, :func:`parse_backend_url`) of the Secret are kept together on
purpose, so key names, formats and their validation cannot drift apart between operator
and backend.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .identifiers import InvalidIdentifier, validate_identifier
from .schema import TableNames

__all__ = [
    "Binding",
    "BackendSource",
    "CelerySettings",
    "ConfigError",
    "DirectorySource",
    "EngineSettings",
    "POOLER_MODES",
    "PoolerSettings",
    "StoreConfig",
    "DEFAULT_SQLITE_URL",
    "binding_version",
    "parse_backend_url",
    "read_binding_dir",
    "parse_url",
    "redact",
    "render_binding",
    "safe_url",
    "validate_engine_options",
]

#: Where ``resultstore://`` (no path) and a missing URL put results.
DEFAULT_SQLITE_URL = "sqlite:///results.db"

PG_DRIVER = "postgresql+psycopg"
SECRET_TYPE = "postgresql"
SECRET_PROVIDER = "resultstore"

# Secret keys (docs/CONTRACTS.md, "The Secret the operator writes")
KEY_TYPE = "type"
KEY_PROVIDER = "provider"
KEY_HOST = "host"
KEY_PORT = "port"
KEY_DATABASE = "database"
KEY_USERNAME = "username"
KEY_PASSWORD = "password"
KEY_SSLMODE = "sslmode"
KEY_SCHEMA = "schema"
KEY_URI = "uri"
KEY_RESULT_BACKEND = "result_backend"
KEY_ENGINE_OPTIONS = "engine_options.json"
KEY_CELERY = "celery.json"
KEY_CA = "ca.crt"
# a pooler in front of the server (written only when the store names one)
KEY_POOLER_HOST = "pooler-host"
KEY_POOLER_PORT = "pooler-port"
KEY_POOLER_MODE = "pooler-mode"
KEY_POOLER_PREPARED = "pooler-prepared-statements"
KEY_POOLED_URI = "pooled-uri"
KEY_POOLED_RESULT_BACKEND = "pooled-result-backend"

DATA_LINK = "..data"


class ConfigError(Exception):
    """Invalid or unusable result-store configuration.

    ``path`` is the file at fault (or the directory/URL), ``key`` the JSON key
    inside it when there is one. The message never contains a password. A URL has no
    keys: with ``in_url`` the part at fault (port, host, a query parameter) is still
    ``key``, for callers, but the text names it in the message's own words rather than
    as "key 'port'", which reads as a Secret file's key.
    """

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None,
                 key: str | None = None, in_url: bool = False) -> None:
        self.message = message
        self.path = str(path) if path is not None else None
        self.key = key
        where = self.path or "result store configuration"
        if key is not None and not in_url:
            where = f"{where}: key {key!r}"
        super().__init__(f"{where}: {message}")


def redact(text: str, *secrets: str | None) -> str:
    """Return ``text`` with every non-empty secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
            quoted = quote(secret, safe="")
            if quoted != secret:
                text = text.replace(quoted, "***")
    return text


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class EngineSettings:
    """Connection-pool and session settings (the ``engine`` area of the spec).

    ``pool_size``/``max_overflow`` are for processes that store or read from many threads
    or greenlets at once (a threads/gevent worker, a web process). A prefork pool child
    runs one task at a time and never uses more than one connection, so it gets pool
    sizes of its own (``prefork_child`` in ``engine_options.json``): a budget computed
    from the Secret then reads what the children can really hold, not 15 each.
    """

    pool_size: int = 5
    max_overflow: int = 10
    pool_timeout: float = 30.0
    pool_recycle: int = 1800
    pool_pre_ping: bool = True
    connect_timeout: int = 10
    statement_timeout_ms: int | None = None
    application_name: str = "celery-resultstore"
    prefork_child_pool_size: int = 1
    prefork_child_max_overflow: int = 0

    def to_engine_options(self) -> dict[str, Any]:
        """The content of ``engine_options.json``: ``create_engine`` keyword arguments."""
        connect_args: dict[str, Any] = {
            "connect_timeout": self.connect_timeout,
            "application_name": self.application_name,
        }
        if self.statement_timeout_ms is not None:
            connect_args["options"] = f"-c statement_timeout={int(self.statement_timeout_ms)}"
        return {
            "pool_size": self.pool_size,
            "max_overflow": self.max_overflow,
            "pool_timeout": self.pool_timeout,
            "pool_recycle": self.pool_recycle,
            "pool_pre_ping": self.pool_pre_ping,
            "connect_args": connect_args,
            PREFORK_CHILD_KEY: {"pool_size": self.prefork_child_pool_size,
                                "max_overflow": self.prefork_child_max_overflow},
        }


#: engine_options.json: the pool sizes a prefork pool child uses instead of the top-level
#: ones (not a create_engine argument: the backend applies it and pops it)
PREFORK_CHILD_KEY = "prefork_child"

POOLER_MODES = ("session", "transaction")


@dataclass(frozen=True)
class PoolerSettings:
    """A connection pooler in front of the server (PgBouncer, CloudNativePG's Pooler).

    Stores and reads go through it with the store's own role, password and database; the
    LISTEN connection never does. The mode decides what the pool may rely on: in
    ``transaction`` mode the pooler hands out a server session per transaction, so no
    server-side prepared statement survives to the next statement unless the pooler
    keeps them itself (``prepared_statements``: PgBouncer >= 1.21 with
    ``max_prepared_statements``). ``host`` is a name or an address (IPv6 without brackets).
    """

    host: str
    port: int = 5432
    mode: str = "transaction"
    prepared_statements: bool = False

    def __post_init__(self) -> None:
        if self.mode not in POOLER_MODES:
            raise ValueError(f"pooler mode must be one of {', '.join(POOLER_MODES)}, "
                             f"got {self.mode!r}")
        if not self.host or not _HOST_RE.fullmatch(self.host if ":" not in self.host
                                                   else f"[{self.host}]"):
            raise ValueError("pooler host is not a valid host name or address")
        if isinstance(self.port, bool) or not 0 < int(self.port) < 65536:
            raise ValueError("pooler port is outside 1-65535")

    @property
    def server_prepares(self) -> bool:
        """Whether clients may use server-side prepared statements through it."""
        return self.mode == "session" or self.prepared_statements


@dataclass(frozen=True)
class CelerySettings:
    """Table placement and result settings (the content of ``celery.json``)."""

    schema: str | None
    task_table: str = "celery_taskmeta"
    group_table: str = "celery_tasksetmeta"
    extended: bool = False
    expires: int | None = 86400
    #: the store NOTIFYs waiters when it stores a state (PostgreSQL LISTEN/NOTIFY)
    notifications: bool = True

    def table_names(self) -> TableNames:
        return TableNames(self.schema, self.task_table, self.group_table)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": self.schema,
            "task_table": self.task_table,
            "group_table": self.group_table,
            "result_extended": self.extended,
            "result_expires": self.expires,
        }
        if not self.notifications:
            # written only when off: the Secrets of existing stores (and the pod
            # rollouts keyed on their hash) do not change for the default
            out["notifications"] = False
        return out


@dataclass(frozen=True)
class Binding:
    """Everything the operator hands to workers for one ResultStore."""

    host: str
    port: int
    database: str
    username: str
    password: str = field(repr=False)
    sslmode: str
    engine: EngineSettings
    celery: CelerySettings
    ca_cert: str | None = field(default=None, repr=False)
    #: stores and reads through this pooler (the Secret's pooler-* keys and pooled-uri)
    pooler: PoolerSettings | None = None


def _netloc(username: str, password: str, host: str, port: int) -> str:
    h = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{quote(username, safe='')}:{quote(password, safe='')}@{h}:{int(port)}"


def _query(sslmode: str, schema: str | None) -> str:
    parts = [f"sslmode={quote(sslmode, safe='')}"]
    if schema:
        # libpq "options" with search_path, so that unqualified names (psql,
        # stock Celery) resolve to the store's schema.
        parts.append("options=" + quote(f"-csearch_path={schema}", safe=""))
    return "&".join(parts)


def render_binding(b: Binding) -> dict[str, str]:
    """Every Secret key of docs/CONTRACTS.md, as strings, for the operator to write."""
    schema = b.celery.schema
    netloc = _netloc(b.username, b.password, b.host, b.port)
    db = quote(b.database, safe="")
    query = _query(b.sslmode, schema)
    out = {
        KEY_TYPE: SECRET_TYPE,
        KEY_PROVIDER: SECRET_PROVIDER,
        KEY_HOST: b.host,
        KEY_PORT: str(int(b.port)),
        KEY_DATABASE: b.database,
        KEY_USERNAME: b.username,
        KEY_PASSWORD: b.password,
        KEY_SSLMODE: b.sslmode,
        KEY_SCHEMA: schema or "",
        KEY_URI: f"postgresql://{netloc}/{db}?{query}",
        KEY_RESULT_BACKEND: f"db+{PG_DRIVER}://{netloc}/{db}?{query}",
        KEY_ENGINE_OPTIONS: json.dumps(b.engine.to_engine_options(), sort_keys=True),
        KEY_CELERY: json.dumps(b.celery.to_json(), sort_keys=True),
    }
    if b.ca_cert is not None:
        out[KEY_CA] = b.ca_cert
    if b.pooler is not None:
        out.update(_pooler_keys(b, db))
    return out


def _pooler_keys(b: Binding, db: str) -> dict[str, str]:
    """The pooler's Secret keys. The pooled URLs carry no ``options`` (search path):
    PgBouncer refuses that startup parameter, and would fail every connection; clients
    that need the search path get it from the role (``ALTER ROLE ... SET search_path``)."""
    pooler = b.pooler
    assert pooler is not None
    netloc = _netloc(b.username, b.password, pooler.host, pooler.port)
    query = f"sslmode={quote(b.sslmode, safe='')}"
    return {
        KEY_POOLER_HOST: pooler.host,
        KEY_POOLER_PORT: str(int(pooler.port)),
        KEY_POOLER_MODE: pooler.mode,
        KEY_POOLER_PREPARED: "true" if pooler.prepared_statements else "false",
        KEY_POOLED_URI: f"postgresql://{netloc}/{db}?{query}",
        KEY_POOLED_RESULT_BACKEND: f"db+{PG_DRIVER}://{netloc}/{db}?{query}",
    }


# --------------------------------------------------------------------------- StoreConfig


@dataclass(frozen=True)
class StoreConfig:
    """A resolved result store: where to connect and where the tables are.

    ``extended``/``expires`` are ``None`` when the source does not say (a URL),
    so that the Celery app's settings apply. ``version`` identifies the content
    of a config directory (the ``..data`` target) for hot reload.
    """

    url: URL
    names: TableNames
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    extended: bool | None = None
    expires: int | None = None
    source_dir: Path | None = None
    version: str | None = None
    #: None when the source does not say (then the app setting or the default applies)
    notifications: bool | None = None
    #: stores and reads go through this pooler; ``url`` stays the server (LISTEN)
    pooler: PoolerSettings | None = None

    def __repr__(self) -> str:
        return (
            f"StoreConfig(url={safe_url(self.url)!r}, "
            f"names={self.names!r}, extended={self.extended!r}, expires={self.expires!r}, "
            f"source_dir={self.source_dir!r}, version={self.version!r}, "
            f"pooler={self.pooler!r})"
        )

    @property
    def pool_url(self) -> URL:
        """Where the pool connects: the pooler when there is one, else the server.

        Through a pooler the libpq ``options`` parameter is left out: PgBouncer refuses
        it as a startup parameter (and a pooler could not keep its settings anyway).
        """
        if self.pooler is None:
            return self.url
        query = {k: v for k, v in self.url.query.items() if k != "options"}
        return self.url.set(host=self.pooler.host, port=self.pooler.port, query=query)

    __str__ = __repr__

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    @property
    def password(self) -> str | None:
        pw = self.url.password
        return None if pw is None else str(pw)

    def describe(self) -> str:
        """Where this config came from, for error messages (never the password)."""
        if self.source_dir is not None:
            return str(self.source_dir)
        return safe_url(self.url)


@dataclass(frozen=True)
class DirectorySource:
    """A mounted Secret directory (``resultstore:///path``)."""

    path: Path


BackendSource = DirectorySource | StoreConfig


# --------------------------------------------------------------------------- URLs


#: Query parameters libpq takes as secrets: never shown (``password`` is moved into the
#: URL's password, where SQLAlchemy hides it and error messages redact it).
_SECRET_QUERY_KEYS = frozenset({"password", "sslpassword"})
_HOST_RE = re.compile(r"[A-Za-z0-9._~%-]*|\[[0-9A-Za-z:.%]+\]")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_ENCODE_HINT = ("percent-encode '@', '/', '?', '#' and ':' in the user name and password "
                "(%40 %2F %3F %23 %3A)")


def safe_url(url: URL) -> str:
    """``url`` for messages and reprs: the password and secret query values hidden."""
    if any(k.lower() in _SECRET_QUERY_KEYS for k in url.query):
        url = url.set(query={k: ("***" if k.lower() in _SECRET_QUERY_KEYS else v)
                             for k, v in url.query.items()})
    return url.render_as_string(hide_password=True)


def _check_authority(url: str, where: str) -> str:
    """Validate a PostgreSQL URL's ``user:password@host:port`` and normalise its user info.

    A password may hold an unescaped ``@``: the user info ends at the *last* ``@``
    before the path (the first ``/`` or ``?`` after the first ``@``), so
    ``postgresql://u:p@ss@host/db`` means password ``p@ss`` on ``host``. SQLAlchemy
    would stop at the first ``@`` and take ``ss@host`` for the host, printing part
    of the password in every error. Anything still ambiguous is refused. Errors name
    the part at fault (host, port, password), never the URL.
    """
    scheme_end = url.find("://")
    if scheme_end < 0:
        return url
    start = scheme_end + 3
    rest = url[start:]
    userinfo: str | None = None
    first_at = rest.find("@")
    if first_at >= 0 and not any(c in rest[:first_at].split(":", 1)[0] for c in "/?"):
        ends = [p for p in (rest.find("/", first_at), rest.find("?", first_at)) if p >= 0]
        at = rest.rfind("@", 0, min(ends) if ends else len(rest))
        userinfo, rest = rest[:at], rest[at + 1:]
    ends = [p for p in (rest.find("/"), rest.find("?")) if p >= 0]
    end = min(ends) if ends else len(rest)
    hostport, tail = rest[:end], rest[end:]
    if userinfo is not None and "@" in tail.split("?", 1)[0]:
        raise ConfigError(f"ambiguous user info ('@' after the host): {_ENCODE_HINT}",
                          path=where, key="password", in_url=True)
    if hostport.startswith("["):
        close = hostport.find("]")
        host, port = hostport[:close + 1], hostport[close + 1:]
        if close < 0 or (port and not port.startswith(":")):
            raise ConfigError("the host is not a valid IPv6 address in brackets",
                              path=where, key="host", in_url=True)
        port = port[1:]
        has_port = bool(hostport[close + 1:])
    else:
        host, colon, port = hostport.partition(":")
        has_port = bool(colon)
    if not _HOST_RE.fullmatch(host):
        raise ConfigError(f"the host is not a valid host name or address ({_ENCODE_HINT})",
                          path=where, key="host", in_url=True)
    if has_port:
        if not _PORT_RE.fullmatch(port):
            raise ConfigError("the port is not a number", path=where, key="port", in_url=True)
        if not 0 < int(port) < 65536:
            raise ConfigError("the port is outside 1-65535", path=where, key="port", in_url=True)
    if userinfo is None:
        return url
    user, colon, password = userinfo.partition(":")
    encoded = quote(unquote(user), safe="")
    if colon:
        encoded += ":" + quote(unquote(password), safe="")
    return f"{url[:start]}{encoded}@{hostport}{tail}"


def parse_url(url: str, where: str) -> URL:
    """``make_url`` that never shows a password: see :func:`_check_authority`.

    A ``?password=`` parameter becomes the URL's password (hidden in reprs, redacted
    from connection errors); ``where`` names the source in errors (never the URL).
    """
    if url.lower().startswith("postgres"):
        url = _check_authority(url, where)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        # make_url's messages echo the URL (and its password)
        raise ConfigError("not a valid database URL", path=where) from None
    query = dict(parsed.query)
    password = query.pop("password", None)
    if password is not None:
        if parsed.password is not None:
            raise ConfigError("the password is given twice (in the user info and as "
                              "?password=)", path=where, key="password", in_url=True)
        if isinstance(password, tuple):
            raise ConfigError("?password= is given more than once", path=where,
                              key="password", in_url=True)
        parsed = parsed.set(password=password, query=query)
    return parsed


def _split_prefix(url: str) -> str:
    for prefix in ("resultstore+",):
        if url.startswith(prefix):
            return url[len(prefix):]
    return url


def parse_backend_url(url: str | None) -> BackendSource:
    """Resolve a backend URL (with or without the ``resultstore+`` prefix).

    - ``resultstore:///dir`` -> :class:`DirectorySource`
    - ``[resultstore+]postgresql[+psycopg]://user:pw@host/db?schema=s`` -> StoreConfig
    - ``[resultstore+]sqlite:///path`` -> StoreConfig
    - ``None``/``resultstore://`` -> the embedded SQLite default
    """
    if not url or url in ("resultstore://", "resultstore:///"):
        url = DEFAULT_SQLITE_URL
    url = _split_prefix(url.strip())
    if url.startswith("resultstore://"):
        path = url[len("resultstore://"):]
        if not path.startswith("/"):
            raise ConfigError(
                "a config-directory URL needs an absolute path: resultstore:///path/to/dir",
                path="resultstore://" + path,
            )
        return DirectorySource(Path(path))
    parsed = parse_url(url, "backend URL")
    backend = parsed.get_backend_name()
    query = dict(parsed.query)
    schema = _pop_str(query, "schema")
    task_table = _pop_str(query, "task_table") or "celery_taskmeta"
    group_table = _pop_str(query, "group_table") or "celery_tasksetmeta"
    where = safe_url(parsed)
    notifications = _notify_param(_pop_str(query, "notify"), where)
    pooler = _pooler_params(query, where)
    if pooler is not None and backend == "sqlite":
        raise ConfigError("SQLite has no pooler; drop ?pooler=", path=where, key="pooler",
                          in_url=True)
    if backend in ("postgresql", "postgres"):
        parsed = parsed.set(drivername=PG_DRIVER, query=query)
    elif backend == "sqlite":
        if schema:
            raise ConfigError("SQLite has no schemas; drop ?schema=", path=where, key="schema",
                              in_url=True)
        parsed = parsed.set(query=query)
    else:
        raise ConfigError(
            f"unsupported database {backend!r}: use postgresql or sqlite", path=where
        )
    try:
        names = TableNames(schema or None, task_table, group_table)
    except (InvalidIdentifier, ValueError) as exc:
        raise ConfigError(str(exc), path=where) from None
    return StoreConfig(url=parsed, names=names, notifications=notifications, pooler=pooler)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _bool_param(value: str | None, where: str, key: str) -> bool | None:
    """A true/false URL parameter: None when absent."""
    if value is None:
        return None
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigError(f"?{key}= expects true or false", path=where, key=key, in_url=True)


def _notify_param(value: str | None, where: str) -> bool | None:
    """The ``?notify=`` URL parameter: None when absent."""
    return _bool_param(value, where, "notify")


def _split_address(address: str, where: str, key: str) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` (port 5432 when absent), checked."""
    if address.startswith("["):
        close = address.find("]")
        host, rest = address[1:close], address[close + 1:] if close > 0 else ""
        if close < 0 or (rest and not rest.startswith(":")):
            raise ConfigError(f"?{key}= has an invalid IPv6 address (use [addr]:port)",
                              path=where, key=key, in_url=True)
        port_text = rest[1:]
        valid_host = bool(host) and _HOST_RE.fullmatch(f"[{host}]") is not None
    else:
        host, _, port_text = address.partition(":")
        valid_host = bool(host) and _HOST_RE.fullmatch(host) is not None
    if not valid_host:
        raise ConfigError(f"?{key}= has an invalid host", path=where, key=key, in_url=True)
    if not port_text:
        return host, 5432
    if not _PORT_RE.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise ConfigError(f"?{key}= has an invalid port (1-65535)", path=where, key=key,
                          in_url=True)
    return host, int(port_text)


def _pooler_params(query: dict[str, Any], where: str) -> PoolerSettings | None:
    """``?pooler=HOST[:PORT]&pooler_mode=...&pooler_prepared_statements=...`` (popped)."""
    address = _pop_str(query, "pooler")
    mode = _pop_str(query, "pooler_mode")
    prepared = _bool_param(_pop_str(query, "pooler_prepared_statements"), where,
                           "pooler_prepared_statements")
    if address is None:
        if mode is not None or prepared is not None:
            raise ConfigError("?pooler_mode= and ?pooler_prepared_statements= need "
                              "?pooler=HOST:PORT", path=where, key="pooler", in_url=True)
        return None
    host, port = _split_address(address, where, "pooler")
    mode = mode or "transaction"
    if mode not in POOLER_MODES:
        raise ConfigError(f"?pooler_mode= expects {' or '.join(POOLER_MODES)}", path=where,
                          key="pooler_mode", in_url=True)
    return PoolerSettings(host, port, mode, bool(prepared))


def _notifications_from_json(data: Mapping[str, Any], file: Path) -> bool:
    if "notifications" not in data:
        return True
    return bool(_check(data, "notifications", (bool,), file, "a boolean"))


def _pop_str(query: dict[str, Any], key: str) -> str | None:
    value = query.pop(key, None)
    if isinstance(value, tuple):
        value = value[-1] if value else None
    return value


# --------------------------------------------------------------------------- directories


def binding_version(path: Path) -> str | None:
    """The current ``..data`` target of a kubelet-style directory (None if not one).

    This is one ``readlink`` syscall: cheap enough to poll for changes.
    """
    try:
        return os.readlink(path / DATA_LINK)
    except OSError:
        return None


def _read(base: Path, shown: Path, key: str, *, required: bool) -> str | None:
    try:
        text = (base / key).read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigError("required key is missing", path=shown / key) from None
        return None
    except UnicodeDecodeError:
        raise ConfigError("not valid UTF-8 text", path=shown / key) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=shown / key) from None
    return text.rstrip("\r\n")


def _load_json(base: Path, shown: Path, key: str, *, required: bool) -> dict[str, Any] | None:
    text = _read(base, shown, key, required=required)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        # exc.msg/lineno/colno only: the document itself is not echoed
        raise ConfigError(
            f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            path=shown / key,
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(
            f"expected a JSON object, got {type(value).__name__}", path=shown / key
        )
    return value


def _typename(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _check(obj: Mapping[str, Any], key: str, types: tuple[type, ...], file: Path,
           what: str, *, nullable: bool = False) -> Any:
    value = obj[key]
    if value is None and nullable:
        return None
    ok = isinstance(value, types) and not (
        isinstance(value, bool) and bool not in types
    )
    if not ok:
        raise ConfigError(f"expected {what}, got {_typename(value)}", path=file, key=key)
    return value


_ENGINE_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "pool_size": ((int,), "an integer"),
    "max_overflow": ((int,), "an integer"),
    "pool_timeout": ((int, float), "a number"),
    "pool_recycle": ((int,), "an integer"),
    "pool_pre_ping": ((bool,), "a boolean"),
    "pool_use_lifo": ((bool,), "a boolean"),
    "echo": ((bool,), "a boolean"),
    "echo_pool": ((bool,), "a boolean"),
    "connect_args": ((dict,), "an object"),
    PREFORK_CHILD_KEY: ((dict,), "an object"),
}
#: what ``prefork_child`` may set: only the pool's sizes differ in a prefork child
_PREFORK_CHILD_KEYS = {"pool_size": 0, "max_overflow": -1}


def validate_engine_options(options: Mapping[str, Any], file: Path) -> dict[str, Any]:
    """Check ``engine_options.json`` (types and known keys); return a copy."""
    for key in options:
        if key not in _ENGINE_KEYS:
            raise ConfigError(
                f"unknown engine option (known: {', '.join(sorted(_ENGINE_KEYS))})",
                path=file, key=key,
            )
        types, what = _ENGINE_KEYS[key]
        _check(options, key, types, file, what)
    for key in ("pool_size", "max_overflow", "pool_recycle"):
        if key in options and options[key] < (-1 if key != "pool_size" else 0):
            raise ConfigError("must not be negative", path=file, key=key)
    _check_prefork_child(options.get(PREFORK_CHILD_KEY), file)
    connect_args = dict(options.get("connect_args") or {})
    for key, value in connect_args.items():
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            raise ConfigError(
                f"expected a string or number, got {_typename(value)}",
                path=file, key=f"connect_args.{key}",
            )
    out = dict(options)
    if "connect_args" in out:
        out["connect_args"] = connect_args
    return out


def _check_prefork_child(child: Mapping[str, Any] | None, file: Path) -> None:
    for key, value in (child or {}).items():
        where = f"{PREFORK_CHILD_KEY}.{key}"
        if key not in _PREFORK_CHILD_KEYS:
            raise ConfigError(f"unknown key (known: {', '.join(_PREFORK_CHILD_KEYS)})",
                              path=file, key=where)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"expected an integer, got {_typename(value)}", path=file,
                              key=where)
        if value < _PREFORK_CHILD_KEYS[key]:
            raise ConfigError("must not be negative", path=file, key=where)


def _celery_from_json(data: Mapping[str, Any], file: Path, schema_file: str | None
                      ) -> tuple[TableNames, bool, int | None]:
    schema = data.get("schema", schema_file)
    if "schema" in data:
        _check(data, "schema", (str,), file, "a string", nullable=True)
    task_table = data.get("task_table", "celery_taskmeta")
    group_table = data.get("group_table", "celery_tasksetmeta")
    for key in ("task_table", "group_table"):
        if key in data:
            _check(data, key, (str,), file, "a string")
    extended = False
    if "result_extended" in data:
        extended = _check(data, "result_extended", (bool,), file, "a boolean")
    expires: int | None = 86400
    if "result_expires" in data:
        expires = _check(data, "result_expires", (int,), file, "an integer or null",
                         nullable=True)
        if expires is not None and expires < 0:
            raise ConfigError("must not be negative", path=file, key="result_expires")
    for key, value in (("schema", schema), ("task_table", task_table),
                       ("group_table", group_table)):
        if value:
            try:
                validate_identifier(value, key)
            except InvalidIdentifier as exc:
                raise ConfigError(str(exc), path=file, key=key) from None
    try:
        names = TableNames(schema or None, task_table, group_table)
    except ValueError as exc:
        raise ConfigError(str(exc), path=file) from None
    return names, bool(extended), expires


def read_binding_dir(path: str | os.PathLike[str]) -> StoreConfig:
    """Read and validate a mounted result-store Secret.

    With the kubelet layout (``DIR/..data -> ..<timestamp>``) every file is
    read from the one resolved ``..data`` target, so a swap in the middle of
    reading can never mix old and new keys; the target is checked again at the
    end and the read retried if it moved.
    """
    shown = Path(path)
    if not shown.is_dir():
        raise ConfigError("config directory does not exist or is not a directory", path=shown)
    for _attempt in range(5):
        version = binding_version(shown)
        base = shown / version if version else shown
        try:
            config = _read_binding_files(base, shown, version)
        except ConfigError:
            if binding_version(shown) != version:
                continue  # swapped while reading; read the new content
            raise
        if binding_version(shown) == version:
            return config
    raise ConfigError("directory keeps changing while being read", path=shown)


def _read_binding_files(base: Path, shown: Path, version: str | None) -> StoreConfig:
    password = _read(base, shown, KEY_PASSWORD, required=False)
    host = _read(base, shown, KEY_HOST, required=False)
    database = _read(base, shown, KEY_DATABASE, required=False)
    username = _read(base, shown, KEY_USERNAME, required=False)
    uri = _read(base, shown, KEY_URI, required=False)
    query: dict[str, str] = {}
    if host and database and username and password is not None:
        port_text = _read(base, shown, KEY_PORT, required=False) or "5432"
        try:
            port = int(port_text)
            if not 0 < port < 65536:
                raise ValueError
        except ValueError:
            raise ConfigError("expected a TCP port number", path=shown / KEY_PORT) from None
        sslmode = _read(base, shown, KEY_SSLMODE, required=False)
        if sslmode:
            query["sslmode"] = sslmode
        url = URL.create(PG_DRIVER, username=username, password=password, host=host,
                         port=port, database=database, query=query)
    elif uri:
        url = parse_url(uri, str(shown / KEY_URI))
        if url.get_backend_name() not in ("postgresql", "postgres"):
            raise ConfigError("expected a postgresql:// URI", path=shown / KEY_URI)
        # search_path in the URI is for other clients; we qualify names ourselves
        q = {k: v for k, v in dict(url.query).items() if k != "options"}
        url = url.set(drivername=PG_DRIVER, query=q)
        password = None if url.password is None else str(url.password)
    else:
        missing = next(
            k for k, v in ((KEY_HOST, host), (KEY_DATABASE, database),
                           (KEY_USERNAME, username), (KEY_PASSWORD, password))
            if not v and not (k == KEY_PASSWORD and v == "")
        )
        raise ConfigError(
            f"required key is missing (give '{KEY_URI}' or all of host, database, "
            "username, password)",
            path=shown / missing,
        )
    schema_file = _read(base, shown, KEY_SCHEMA, required=False) or None
    celery = _load_json(base, shown, KEY_CELERY, required=True)
    assert celery is not None
    names, extended, expires = _celery_from_json(celery, shown / KEY_CELERY, schema_file)
    engine_json = _load_json(base, shown, KEY_ENGINE_OPTIONS, required=False) or {}
    options = validate_engine_options(engine_json, shown / KEY_ENGINE_OPTIONS)
    if (base / KEY_CA).exists():
        connect_args = dict(options.get("connect_args") or {})
        # through the symlinked name, so a rotated CA is picked up on reconnect
        connect_args.setdefault("sslrootcert", str(shown / KEY_CA))
        options["connect_args"] = connect_args
    if password:
        for key, value in (options.get("connect_args") or {}).items():
            if isinstance(value, str) and password in value:
                raise ConfigError("must not contain the password",
                                  path=shown / KEY_ENGINE_OPTIONS, key=f"connect_args.{key}")
    return StoreConfig(
        url=url, names=names, engine_options=options, extended=extended, expires=expires,
        source_dir=shown, version=version,
        notifications=_notifications_from_json(celery, shown / KEY_CELERY),
        pooler=_pooler_from_dir(base, shown),
    )


def _pooler_from_dir(base: Path, shown: Path) -> PoolerSettings | None:
    """The ``pooler-*`` keys (None without ``pooler-host``); errors name the file."""
    host = _read(base, shown, KEY_POOLER_HOST, required=False)
    if not host:
        return None
    port_text = _read(base, shown, KEY_POOLER_PORT, required=False) or "5432"
    if not _PORT_RE.fullmatch(port_text.strip()) or not 0 < int(port_text) < 65536:
        raise ConfigError("expected a TCP port number", path=shown / KEY_POOLER_PORT)
    mode = (_read(base, shown, KEY_POOLER_MODE, required=False) or "transaction").strip()
    if mode not in POOLER_MODES:
        raise ConfigError(f"expected {' or '.join(POOLER_MODES)}", path=shown / KEY_POOLER_MODE)
    prepared_text = (_read(base, shown, KEY_POOLER_PREPARED, required=False) or "false")
    if prepared_text.strip().lower() not in ("true", "false"):
        raise ConfigError("expected true or false", path=shown / KEY_POOLER_PREPARED)
    try:
        return PoolerSettings(host.strip(), int(port_text), mode,
                              prepared_text.strip().lower() == "true")
    except ValueError as exc:
        raise ConfigError(str(exc), path=shown / KEY_POOLER_HOST) from None

