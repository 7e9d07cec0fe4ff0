"""A process-local, fork-safe, hot-reloadable engine per result store.

Celery creates one backend object per thread (``app.backend`` is thread-local)
and, with the prefork pool, per child process. Connections must be pooled per
*process* and never cross a fork, so engines live here, in a module-level
registry keyed by the configuration source, rather than on the backend:

- every thread of a process shares one pool;
- after ``fork()`` the child drops the inherited pools without closing their
  sockets (``dispose(close=False)``; closing would terminate the parent's
  sessions) and builds its own on first use;
- in config-directory mode the ``..data`` symlink is checked at most every
  ``reload_interval`` seconds (one ``readlink``), and when the kubelet has
  swapped it the next operation gets a new engine; the old one is disposed
  once the operations still using it have returned their connections.

Connections are DBAPI connections in autocommit mode, handed out by the pool,
so a single-statement operation is one network round trip (no BEGIN/COMMIT),
and multi-statement ones open an explicit transaction.

The hot path does not go through the pool's checkout/checkin for every
operation: that costs tens of microseconds (queue lock, events, reset on
return), a tenth of a loopback store. A connection an operation returns is
kept checked out in a small per-engine LIFO list and handed to the next
operation of any thread of this process. Everything the pool guaranteed
still holds: the list only holds connections the pool handed out (so
``pool_size + max_overflow`` still bounds them, and once a burst is over the
process keeps ``pool_size`` open, as the pool alone would); when a thread is waiting
for the pool, returned connections go back to the pool instead (no one
starves behind an idle cached connection); an idle connection is pinged
before use; one older than ``pool_recycle`` goes back through the pool
(which recycles it); a connection error drops the whole list with the pool;
a reload closes the old engine's list; after fork the child never touches
the parent's list.

Why one module: the registry, the fork hook, the reload check and the connection cache
share one lock and one :class:`_EngineSlot` per engine; apart they would have to reach
into each other's state. The connection-error classification at the top
(:func:`classify_connect_error`, :func:`is_transient_error`) is the separable part,
kept here because it describes failures of the engines built here.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool

from .config import (
    PREFORK_CHILD_KEY,
    BackendSource,
    ConfigError,
    DirectorySource,
    StoreConfig,
    binding_version,
    read_binding_dir,
    redact,
)
from .schema import SCHEMA_VERSION, current_version, migrate

try:  # psycopg is a base dependency, but keep SQLite-only use importable without it
    import psycopg
except ImportError:  # pragma: no cover
    psycopg = None  # type: ignore[assignment]

_DBAPI_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error,) + (
    (psycopg.Error,) if psycopg is not None else ()
)

_CONNECT_ERRORS: tuple[type[Exception], ...] = (
    sa.exc.DBAPIError, sa.exc.DisconnectionError, *_DBAPI_ERRORS)

__all__ = [
    "EngineHolder",
    "StoreConnectionError",
    "build_engine",
    "engine_arguments",
    "enter_prefork_child",
    "get_holder",
    "in_prefork_child",
    "is_connection_error",
    "is_transient_error",
    "reset_registry",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: A pooled connection idle for longer than this is pinged before use.
DEFAULT_IDLE_PING_AFTER = 10.0
DEFAULT_RELOAD_INTERVAL = 1.0


class StoreConnectionError(ConfigError):
    """The store could not be reached with the configured settings.

    ``transient`` is True for errors that may go away by themselves (server
    restarting, network); authentication and missing role/database are not.
    """

    def __init__(self, message: str, *, path: str | None, key: str | None,
                 transient: bool, located: bool = False) -> None:
        super().__init__(message, path=path, key=key)
        self.transient = transient
        if located:
            # the message names what was tried (host:port, the SQLite file) in the user's
            # own terms; a "<url>: key 'port'" prefix would speak of Secret files
            Exception.__init__(self, message)


# --------------------------------------------------------------------------- error classes

_TRANSIENT_SQLSTATE_PREFIXES = ("08", "57P", "53", "40")  # connection, shutdown, resources, txn


def _sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None) or exc
    return getattr(orig, "sqlstate", None)


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` means the connection itself is unusable."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    orig = getattr(exc, "orig", None) or exc
    if psycopg is not None and isinstance(orig, (psycopg.OperationalError,
                                                 psycopg.InterfaceError)):
        state = _sqlstate(orig)
        return state is None or state.startswith(("08", "57P"))
    return isinstance(exc, sa.exc.DisconnectionError)


def is_transient_error(exc: BaseException) -> bool:
    """Whether retrying the (idempotent) operation may succeed."""
    if isinstance(exc, StoreConnectionError):
        return exc.transient
    if isinstance(exc, ConfigError):
        return False
    if isinstance(exc, (sa.exc.DisconnectionError, sa.exc.TimeoutError)):
        return True  # pool checkout timeout, failed pre-ping
    orig: BaseException = getattr(exc, "orig", None) or exc
    if isinstance(orig, sqlite3.OperationalError):
        text = str(orig).lower()
        return "locked" in text or "busy" in text
    if psycopg is not None and isinstance(orig, psycopg.Error):
        state = _sqlstate(orig)
        if state is None:
            return isinstance(orig, (psycopg.OperationalError, psycopg.InterfaceError))
        return state.startswith(_TRANSIENT_SQLSTATE_PREFIXES)
    return False


def _blame(low: str) -> tuple[str, bool]:
    """The Secret key a PostgreSQL connect error points at, and whether it may pass."""
    if "password authentication failed" in low or "no password supplied" in low:
        return "password", False
    if "role" in low and "does not exist" in low:
        return "username", False
    if "database" in low and "does not exist" in low:
        return "database", False
    if "ssl" in low:
        return "sslmode", True
    if "connection refused" in low:
        return "port", True
    if "too many connections for role" in low:
        return "username", True  # the role's CONNECTION LIMIT: others must close first
    return "host", True


def _at_limit(exc: BaseException) -> bool:
    """A connection refused at a role's CONNECTION LIMIT or the server's max_connections
    (SQLSTATE 53300; libpq's connect error carries only the text)."""
    low = str(getattr(exc, "orig", None) or exc).lower()
    return "too many connections" in low or "too many clients" in low


#: leads the server's words for a connection refused at a limit (SQLSTATE 53300): which
#: limit, and that the operation is retried rather than lost (first, so that a log line cut
#: at its length still says it)
_LIMIT_HINT = ("connection limit reached (the role's CONNECTION LIMIT, spec.connections.limit "
               "of its ResultStore, or max_connections), retried within the retry budget: ")


def _sqlite_error(text: str, config: StoreConfig) -> StoreConnectionError:
    """SQLite cannot be opened: name the file (and a missing directory, SQLite does not)."""
    path = config.url.database or ":memory:"
    parent = Path(path).parent
    if path != ":memory:" and not parent.is_dir():
        text = f"{text} (directory {parent} does not exist)"
    low = text.lower()
    return StoreConnectionError(f"cannot open SQLite database at {path}: {text}", path=path,
                                key=None, transient="locked" in low or "busy" in low,
                                located=True)


def classify_connect_error(exc: BaseException, config: StoreConfig, *,
                           pooled: bool = False) -> StoreConnectionError:
    """Turn a failure to connect into an error in the terms of the configuration given.

    From a config directory the error names the Secret file to fix (``.../password``,
    ``.../port``); from a URL there are no files, so it names the host:port (or the
    SQLite file) that failed. Never the password. ``pooled``: the pool's connection,
    which goes to the pooler when the store has one (then ``pooler-host``/``pooler-port``
    are the files to fix for an address that fails).
    """
    orig: BaseException = getattr(exc, "orig", None) or exc
    text = redact(str(orig).strip().splitlines()[0] if str(orig).strip() else repr(orig),
                  config.password)
    if config.is_sqlite:
        return _sqlite_error(text, config)
    key, transient = _blame(text.lower())
    if "too many connections" in text.lower() or "too many clients" in text.lower():
        # libpq's "connection failed: connection to server at ..., port ... failed:" prefix
        # repeats the address this message already names
        text = _LIMIT_HINT + text[text.find("FATAL:"):] if "FATAL:" in text else \
            _LIMIT_HINT + text
    via_pooler = pooled and config.pooler is not None
    url = config.pool_url if via_pooler else config.url
    if via_pooler and key in ("host", "port"):
        # the Secret's pooler-host/pooler-port file, or the URL's ?pooler= parameter
        key = f"pooler-{key}" if config.source_dir is not None else "pooler"
    address = f"{url.host}:{url.port or 5432}"
    if via_pooler:
        address += " (pooler)"
    if config.source_dir is not None:
        message = (f"cannot connect to PostgreSQL at {address}/{url.database} as "
                   f"{url.username}: {text}")
        return StoreConnectionError(message, path=str(config.source_dir / key), key=None,
                                    transient=transient)
    message = (f"cannot connect to PostgreSQL at {address} (database {url.database!r}, "
               f"user {url.username!r}): {text}")
    # ``key`` still says what is at fault, for callers; the text does not speak of keys
    return StoreConnectionError(message, path=config.describe(), key=key,
                                transient=transient, located=True)


# --------------------------------------------------------------------------- engines


def _ping(dbapi_conn: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("SELECT 1")
        cur.fetchall()
    finally:
        cur.close()


#: set in a prefork pool child (Celery's worker_process_init, see backend.py): the engines
#: this process builds from then on use engine_options.json's ``prefork_child`` pool sizes
_PREFORK_CHILD = False
#: (pooler host, port, dropped options) already warned about: once per process
_OPTIONS_WARNED: set[tuple[Any, ...]] = set()


def enter_prefork_child() -> None:
    """Mark this process a prefork pool child: it runs one task at a time."""
    global _PREFORK_CHILD
    _PREFORK_CHILD = True


def in_prefork_child() -> bool:
    return _PREFORK_CHILD


def engine_arguments(config: StoreConfig, *, prefork_child: bool = False
                     ) -> tuple[URL, dict[str, Any], dict[str, Any]]:
    """Where the pool connects, the driver's connect arguments and the pool's options (pure).

    Through a transaction-mode pooler each statement may run in another server session,
    so a statement psycopg prepared in one is unknown (or already taken) in the next:
    ``prepare_threshold=None`` unless the pooler keeps prepared statements itself. The
    libpq ``options`` startup parameter is not sent there (PgBouncer refuses it).
    """
    options = dict(config.engine_options)
    child = options.pop(PREFORK_CHILD_KEY, None)
    options.pop("pool_pre_ping", None)
    connect_args = dict(options.pop("connect_args", None) or {})
    if config.is_sqlite:
        connect_args.setdefault("timeout", 30.0)
        connect_args.setdefault("check_same_thread", False)
        for key in ("pool_size", "max_overflow", "pool_timeout", "pool_recycle"):
            options.pop(key, None)
        return config.url, connect_args, options
    if prefork_child and child:
        options.update(child)
    if config.pooler is not None:
        connect_args.pop("options", None)
        if not config.pooler.server_prepares:
            connect_args["prepare_threshold"] = None
    # psycopg prepares a statement on the server after this many executions on a
    # connection; our hot statements are few and repeat constantly.
    connect_args.setdefault("prepare_threshold", 1)
    return config.pool_url, connect_args, options


def _warn_dropped_options(config: StoreConfig) -> None:
    """Once per pooler: the libpq options (statement_timeout) it does not get."""
    dropped = (config.engine_options.get("connect_args") or {}).get("options") \
        or config.url.query.get("options")
    if config.pooler is None or not dropped:
        return
    key = (config.pooler.host, config.pooler.port, str(dropped))
    if key in _OPTIONS_WARNED:
        return
    _OPTIONS_WARNED.add(key)
    logger.warning(
        "result store: the libpq options %r are not sent through the pooler at %s:%s "
        "(PgBouncer refuses the options startup parameter); set them on the role instead "
        "(ALTER ROLE ... SET statement_timeout = ...)", str(dropped), config.pooler.host,
        config.pooler.port)


def build_engine(config: StoreConfig, *, idle_ping_after: float = DEFAULT_IDLE_PING_AFTER
                 ) -> Engine:
    """Create the engine for ``config`` (autocommit DBAPI connections, idle-only pings)."""
    pre_ping = bool(config.engine_options.get("pool_pre_ping", True))
    url, connect_args, options = engine_arguments(config, prefork_child=_PREFORK_CHILD)
    _warn_dropped_options(config)
    engine = sa.create_engine(
        url,
        isolation_level="AUTOCOMMIT",
        pool_pre_ping=False,
        connect_args=connect_args,
        **options,
    )

    if config.is_sqlite:
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    if pre_ping and idle_ping_after >= 0:
        @event.listens_for(engine, "checkin")
        def _on_checkin(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
            record.info["rs_idle_since"] = time.monotonic()

        @event.listens_for(engine, "checkout")
        def _on_checkout(dbapi_conn: Any, record: ConnectionPoolEntry,
                         proxy: PoolProxiedConnection) -> None:
            since = record.info.get("rs_idle_since")
            if since is None or time.monotonic() - since < idle_ping_after:
                return
            try:
                _ping(dbapi_conn)
            except Exception as exc:
                # the pool discards this connection and checks out another
                raise sa.exc.DisconnectionError("idle connection failed its ping") from exc

    return engine


@dataclass
class _Cached:
    """A connection kept checked out between operations (see the module docstring)."""

    fairy: PoolProxiedConnection
    dbapi: Any
    checked_out: float  # monotonic time the pool handed it out (pool_recycle)
    last_used: float  # monotonic time an operation last returned it (idle ping)
    cursor: Any = None  # created by the first EngineHolder.cursor() on this connection


@dataclass
class _EngineSlot:
    engine: Engine
    config: StoreConfig
    inflight: int = 0
    retired: bool = False
    #: keep returned connections checked out (QueuePool engines only)
    cache: bool = False
    #: ping a cached connection idle for longer than this (None: never)
    ping_after: float | None = None
    recycle: float | None = None
    idle: list[_Cached] = field(default_factory=list)
    #: operations currently waiting in the pool's checkout
    waiting: int = 0
    #: the pool's ``pool_size``: connections this process keeps open once a burst is over
    #: (cached + running + in the pool's queue); None: no bound (``pool_size=0``)
    keep: int | None = None

    def keeps(self) -> bool:
        """Whether a connection just returned stays cached (the caller holds the lock).

        Only while nobody waits for the pool and while the connections that would stay
        open (cached, still in use, idle in the pool's own queue) stay under ``pool_size``:
        otherwise it goes back to the pool, which closes an overflow connection, so a
        burst that needed ``max_overflow`` leaves ``pool_size`` connections behind, as the
        pool alone would, not every connection the burst opened.
        """
        if not self.cache or self.retired or self.waiting:
            return False
        if self.keep is None:
            return True
        queued = self.engine.pool.checkedin()  # type: ignore[attr-defined]
        return len(self.idle) + self.inflight + queued < self.keep


def _slot_for(engine: Engine, config: StoreConfig, idle_ping_after: float) -> _EngineSlot:
    options = config.engine_options
    pre_ping = bool(options.get("pool_pre_ping", True))
    recycle = options.get("pool_recycle", -1)
    size = engine.pool.size() if isinstance(engine.pool, QueuePool) else 0
    return _EngineSlot(
        engine=engine, config=config,
        cache=isinstance(engine.pool, QueuePool),
        keep=size if size > 0 else None,
        ping_after=idle_ping_after if pre_ping and idle_ping_after >= 0 else None,
        recycle=float(recycle) if isinstance(recycle, (int, float)) and recycle >= 0 else None,
    )


def _release(cached: _Cached, *, invalidate: bool = False) -> None:
    """Give a cached connection back to its pool (closing it first if it is broken)."""
    try:
        if invalidate:
            cached.fairy.invalidate()
        cached.fairy.close()
    except Exception:  # a dead socket must not break the operation that found it
        logger.debug("closing a cached result store connection failed", exc_info=True)


#: connections cached by the parent at fork time: referenced forever in the child so that
#: garbage collection never resets or closes them (they are the parent's sessions)
_INHERITED: list[Any] = []


class EngineHolder:
    """The engine of one store in this process (see the module docstring)."""

    def __init__(self, source: BackendSource, *, reload_interval: float = DEFAULT_RELOAD_INTERVAL,
                 idle_ping_after: float = DEFAULT_IDLE_PING_AFTER,
                 create_tables: bool | None = None) -> None:
        self.source = source
        self.reload_interval = reload_interval
        self.idle_ping_after = idle_ping_after
        self.create_tables = (
            not isinstance(source, DirectorySource) if create_tables is None else create_tables
        )
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._slot: _EngineSlot | None = None
        self._retiring: list[_EngineSlot] = []
        self._next_check = 0.0
        self._bad_version: str | None = None
        self._migrated_urls: set[str] = set()
        self._last_invalidate = 0.0
        self.reloads = 0
        if isinstance(source, DirectorySource):
            # read now: a bad directory fails the backend's construction, loudly
            self._initial: StoreConfig | None = read_binding_dir(source.path)
        else:
            self._initial = source
        _HOLDERS.add(self)

    # -- fork safety ---------------------------------------------------------------

    def _after_fork(self) -> None:
        """In a forked child: forget inherited pools without touching their sockets."""
        self._lock = threading.Lock()
        for slot in [self._slot, *self._retiring]:
            if slot is not None:
                _INHERITED.append(slot.idle)
                slot.idle = []
                slot.engine.dispose(close=False)
        if self._slot is not None:
            self._initial = self._slot.config
        self._slot = None
        self._retiring = []
        self._pid = os.getpid()
        self._next_check = 0.0

    # -- configuration -------------------------------------------------------------

    @property
    def config(self) -> StoreConfig:
        slot = self._slot
        if slot is not None:
            return slot.config
        assert self._initial is not None
        return self._initial

    def _new_slot(self, config: StoreConfig) -> _EngineSlot:
        engine = build_engine(config, idle_ping_after=self.idle_ping_after)
        slot = _slot_for(engine, config, self.idle_ping_after)
        if self.create_tables:
            key = config.url.render_as_string(hide_password=True) + repr(config.names)
            if key not in self._migrated_urls:
                self._ensure_schema(slot)
                self._migrated_urls.add(key)
        return slot

    def _ensure_schema(self, slot: _EngineSlot) -> None:
        try:
            with slot.engine.connect() as conn:
                if current_version(conn, slot.config.names) >= SCHEMA_VERSION:
                    return
            with slot.engine.connect().execution_options(
                isolation_level="SERIALIZABLE" if slot.config.is_sqlite else "READ COMMITTED"
            ) as conn:
                migrate(conn, slot.config.names)
        except sa.exc.DBAPIError as exc:
            if is_connection_error(exc) or isinstance(exc, sa.exc.OperationalError):
                slot.engine.dispose()
                raise classify_connect_error(exc, slot.config, pooled=True) from exc
            raise

    def _maybe_reload(self, now: float) -> None:
        assert isinstance(self.source, DirectorySource)
        self._next_check = now + self.reload_interval
        version = binding_version(self.source.path)
        current = self.config.version
        if version == current or version is None or version == self._bad_version:
            return
        try:
            config = read_binding_dir(self.source.path)
        except ConfigError as exc:
            self._bad_version = version
            logger.error("result store config changed but is invalid, keeping the old one: %s",
                         exc)
            return
        with self._lock:
            if self._slot is not None and self._slot.config.version == config.version:
                return
            self._swap_locked(config)
        logger.info("result store config reloaded from %s (%s)", self.source.path,
                    config.version)

    def _swap_locked(self, config: StoreConfig) -> None:
        """Make a slot for `config` the current one; the old one retires (the caller holds
        the lock)."""
        new = self._new_slot(config)
        old, self._slot = self._slot, new
        self.reloads += 1
        if old is not None:
            old.retired = True
            self._retiring.append(old)
            self._reap_locked()

    def _reap_locked(self) -> None:
        keep = []
        for slot in self._retiring:
            if slot.inflight == 0:
                idle, slot.idle = slot.idle, []
                for cached in idle:
                    _release(cached)
                slot.engine.dispose()
            else:
                keep.append(slot)
        self._retiring = keep

    # -- engines and connections ------------------------------------------------------

    def _current_slot(self) -> _EngineSlot:
        if self._pid != os.getpid():
            self._after_fork()
        if isinstance(self.source, DirectorySource):
            now = time.monotonic()
            if now >= self._next_check:
                self._maybe_reload(now)
        slot = self._slot
        if slot is None:
            with self._lock:
                slot = self._slot
                if slot is None:
                    slot = self._slot = self._new_slot(self.config)
        return slot

    def engine(self) -> Engine:
        """The current engine (SQLAlchemy Core use: migrations, cleanup)."""
        return self._current_slot().engine

    @contextmanager
    def connection(self) -> Iterator[Any]:
        """A DBAPI connection (autocommit) for the duration of the block.

        Taken from the slot's cache of checked-out connections when one is there,
        else from the pool. Connection-level failures invalidate the connection, the
        cache and the pool, so the next attempt reconnects instead of reusing dead
        sockets.
        """
        with self._lease() as cached:
            yield cached.dbapi

    @contextmanager
    def cursor(self) -> Iterator[Any]:
        """A cursor on a connection of :meth:`connection`, for one-statement operations.

        The cursor lives as long as its connection stays cached, so the hot paths (one
        store, one read) do not build a cursor and look up its row loaders on every
        statement, as ``connection.execute()`` does (~10 us per statement with psycopg).
        Read a statement's result before executing the next on the same cursor.
        """
        with self._lease() as cached:
            if cached.cursor is None:
                cached.cursor = cached.dbapi.cursor()
            yield cached.cursor

    @contextmanager
    def _lease(self) -> Iterator[_Cached]:
        """Yield one usable connection, then take it back (see :meth:`connection`)."""
        slot = self._current_slot()
        cached: _Cached | None = None
        with self._lock:
            if slot.retired and self._slot is not None:
                # A reload retired it since `_current_slot` (and may have reaped it
                # already): a connection checked out of it now would stay open in the
                # disposed engine's pool for good, a session of the old role that keeps
                # the operator's drain waiting.
                slot = self._slot
            slot.inflight += 1
            if slot.idle:
                cached = slot.idle.pop()
            else:
                slot.waiting += 1
        try:
            if cached is not None:
                cached = self._verified(slot, cached)
                if cached is None:
                    with self._lock:
                        slot.waiting += 1
            if cached is None:
                cached = self._checkout(slot)
            try:
                yield cached
            except BaseException as exc:
                broken = is_connection_error(exc)
                if broken:
                    self.invalidate(slot)
                # an interrupted operation may have left the connection mid-protocol or
                # mid-transaction: the pool's reset (or invalidation) deals with it
                _release(cached, invalidate=broken)
                cached = None
                raise
        finally:
            release: _Cached | None = None
            with self._lock:
                slot.inflight -= 1
                if cached is not None:
                    if slot.keeps():
                        cached.last_used = time.monotonic()
                        slot.idle.append(cached)
                    else:
                        release = cached
                if slot.retired and slot.inflight == 0:
                    self._reap_locked()
            if release is not None:
                _release(release)

    def _checkout(self, slot: _EngineSlot) -> _Cached:
        """A connection from the pool (the caller counted itself in ``slot.waiting``)."""
        try:
            fairy = slot.engine.raw_connection()
        except _CONNECT_ERRORS as exc:
            # the pool does not wrap driver errors raised while connecting. A refusal at a
            # connection limit says nothing about the connections already open: they are
            # kept, since dropping them (a new pool) while some are still in use would let
            # this process hold more than pool_size + max_overflow, at the limit of all
            if not _at_limit(exc):
                self.invalidate(slot)
            raise classify_connect_error(exc, slot.config, pooled=True) from exc
        finally:
            with self._lock:
                slot.waiting -= 1
        now = time.monotonic()
        return _Cached(fairy, fairy.driver_connection, now, now)

    def _verified(self, slot: _EngineSlot, cached: _Cached) -> _Cached | None:
        """The cached connection if still usable; None after returning it to the pool."""
        if slot.ping_after is None and slot.recycle is None:
            return cached
        now = time.monotonic()
        if slot.recycle is not None and now - cached.checked_out >= slot.recycle:
            _release(cached)  # the pool's checkout recycles it
            return None
        if slot.ping_after is not None and now - cached.last_used >= slot.ping_after:
            try:
                _ping(cached.dbapi)
            except Exception:
                _release(cached, invalidate=True)
                return None
        return cached

    def run(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(dbapi_connection)`` on a pooled connection."""
        with self.connection() as conn:
            return fn(conn)

    def invalidate(self, slot: _EngineSlot | None = None) -> None:
        """Drop the pooled connections (after a connection loss), at most every 100 ms."""
        slot = slot or self._slot
        if slot is None:
            return
        with self._lock:
            idle, slot.idle = slot.idle, []
        for cached in idle:
            _release(cached, invalidate=True)
        now = time.monotonic()
        if now - self._last_invalidate < 0.1:
            return
        self._last_invalidate = now
        slot.engine.dispose()

    def dispose(self) -> None:
        """Close everything (tests, shutdown)."""
        with self._lock:
            for slot in [self._slot, *self._retiring]:
                if slot is not None:
                    idle, slot.idle = slot.idle, []
                    for cached in idle:
                        _release(cached)
                    slot.engine.dispose()
            if self._slot is not None:
                self._initial = self._slot.config
            self._slot = None
            self._retiring = []


# --------------------------------------------------------------------------- registry

_HOLDERS: weakref.WeakSet[EngineHolder] = weakref.WeakSet()
_REGISTRY: dict[tuple[Any, ...], EngineHolder] = {}
_REGISTRY_LOCK = threading.Lock()


def _source_key(source: BackendSource) -> Any:
    if isinstance(source, DirectorySource):
        return ("dir", str(source.path))
    return ("url", source.url.render_as_string(hide_password=False), source.names,
            repr(sorted(source.engine_options.items())), source.pooler)


def get_holder(source: BackendSource, *, reload_interval: float = DEFAULT_RELOAD_INTERVAL,
               idle_ping_after: float = DEFAULT_IDLE_PING_AFTER,
               create_tables: bool | None = None) -> EngineHolder:
    """The process-wide holder for ``source`` (created on first use)."""
    key = (_source_key(source), reload_interval, idle_ping_after, create_tables)
    holder = _REGISTRY.get(key)
    if holder is None:
        with _REGISTRY_LOCK:
            holder = _REGISTRY.get(key)
            if holder is None:
                holder = EngineHolder(source, reload_interval=reload_interval,
                                      idle_ping_after=idle_ping_after,
                                      create_tables=create_tables)
                _REGISTRY[key] = holder
    return holder


def reset_registry() -> None:
    """Dispose and forget every holder of this process (tests)."""
    with _REGISTRY_LOCK:
        for holder in list(_REGISTRY.values()):
            holder.dispose()
        _REGISTRY.clear()


def _after_fork_in_child() -> None:
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.Lock()
    for holder in list(_HOLDERS):
        holder._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
