"""Push waits: one LISTEN connection per process and store, and Celery's result consumer on it.

Why this shape (the Redis backend's, on PostgreSQL's LISTEN/NOTIFY):

- The backend is a Celery ``AsyncBackendMixin`` backend, so ``AsyncResult.get``,
  ``ResultSet.join_native``/``iter_native``, chord results and waits inside tasks run
  Celery's own drain loop: ``on_interval`` (which re-raises a failed parent's error)
  runs after every drain, exactly as with Redis. :class:`ResultConsumer` is the
  ``BaseResultConsumer`` of that loop, one per backend object (Celery keeps one
  backend per thread).
- :class:`Listener` owns the one dedicated psycopg connection of a process for a
  store (never from the pool: a pooled connection is reset and shared; LISTEN state
  is per session). It is opened lazily, when a wait first needs it, and never
  crosses ``fork()``: a child gets a fresh registry and opens its own.
- It LISTENs only to the channels (notify.py) of ids that some thread of the process
  is waiting for *right now*, and UNLISTENs them when the waits end, so an idle
  process never has notifications piling up unread on its socket.
- No background thread: the threads that wait drive the connection, one of them
  waiting on the socket (without holding any lock) while the others wait on a
  condition; whoever reads notifications files each id into the inbox of every
  consumer waiting for it and wakes them. Each consumer then reads the rows of its
  notified ids through the normal pool (one batch query) and calls
  ``on_state_change`` in its own thread, as the Redis consumer does with messages.
- A notification is a hint, the table is the truth: every (re)connect bumps
  ``epoch`` and each consumer then re-reads all its pending ids once (notifications
  sent while disconnected are lost; this also covers a result stored before the
  LISTEN began); a bounded safety-net read of all pending ids runs every
  ``safety_interval`` seconds, so no wait can hang on a lost notification.
- When the connection cannot be opened (or is lost), waits poll every
  ``poll_interval`` seconds and reconnects are attempted with backoff; one warning
  is logged per outage, naming host, port, database and role, never the password.
- Reloaded credentials (config-directory mode): when the engine holder's config
  changes, the old role's LISTEN connection is closed and one with the new config
  is opened.

Why one module: :class:`ResultConsumer` is the only client of :class:`Listener`, and the
two share one hand-off protocol (``update``/``take``/``kick``/``wait`` under the
listener's lock, the per-consumer inbox, ``epoch``); the fork hook resets both. Split,
the protocol would be half in each file.
"""

from __future__ import annotations

import logging
import os
import random
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import states
from celery.backends import asynchronous as _celery_async
from celery.backends.asynchronous import BaseResultConsumer
from celery.exceptions import ImproperlyConfigured
from kombu.utils.compat import detect_environment

from .config import StoreConfig, redact
from .engine import EngineHolder, classify_connect_error
from .notify import channel_for, channel_prefix, listen_sql, lock_key, parse_payload

try:  # psycopg is a base dependency, but keep SQLite-only use importable without it
    import psycopg
except ImportError:  # pragma: no cover
    psycopg = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_POLL_INTERVAL",
    "DEFAULT_SAFETY_INTERVAL",
    "DEFAULT_SQLITE_POLL_INTERVAL",
    "MAX_SAFETY_INTERVAL",
    "Listener",
    "ResultConsumer",
    "close_listeners",
    "get_listener",
    "interval_setting",
    "listen_conninfo",
    "through_pooler",
]

logger = logging.getLogger(__name__)

#: Celery's helper listing the result objects waiting on a task id (None in Celery
#: versions without it: on_state_change then falls back to Celery's own method)
_waiting_on = getattr(_celery_async, "_waiting_on", None)

#: re-read every pending id at least this often while notifications are on
DEFAULT_SAFETY_INTERVAL = 1.0
#: polling interval when a PostgreSQL store does not notify (or the listener is down)
DEFAULT_POLL_INTERVAL = 0.1
#: polling interval of SQLite stores (no notifications there; reads are local and cheap)
DEFAULT_SQLITE_POLL_INTERVAL = 0.05

_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 2.0
#: a connection lost sooner than this after opening is retried with backoff
_HEALTHY_AFTER = 5.0
#: a LISTEN connection attempt never blocks a wait for longer than this
_LISTEN_CONNECT_TIMEOUT = 5
#: an unneeded channel stays LISTENed this long unless a LISTEN can carry its UNLISTEN
_UNLISTEN_LINGER = 0.5
#: longest single wait on the socket (a reconnect elsewhere cannot wake poll())
_SOCKET_SLICE = 1.0
#: create_engine connect_args that are psycopg.connect options, not libpq conninfo
_NOT_CONNINFO = frozenset({"prepare_threshold", "autocommit", "cursor_factory",
                           "row_factory", "context"})


#: the largest safety interval accepted: it bounds how long a lost notification delays a wait
MAX_SAFETY_INTERVAL = 60.0


def interval_setting(name: str, value: Any, default: float,
                     maximum: float | None = None) -> float:
    """An interval app setting in seconds (None or absent: ``default``), checked once.

    A wait sleeps or waits on the socket for these: zero, a negative number or infinity
    would make every wait spin, fail in ``time.sleep`` or, for the safety interval, hang
    on a lost notification, so they are refused at start-up, naming the setting.
    """
    if value is None:
        return default
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ImproperlyConfigured(f"{name}: expected a number of seconds, got {value!r}"
                                   ) from None
    if not 0 < seconds < float("inf") or (maximum is not None and seconds > maximum):
        limit = f" and at most {maximum:g}" if maximum is not None else ""
        raise ImproperlyConfigured(f"{name}: must be more than 0{limit} seconds, got {value!r}")
    return seconds


def listen_conninfo(config: StoreConfig) -> dict[str, Any]:
    """psycopg.connect keyword arguments for the LISTEN connection of ``config`` (pure).

    Always the server itself (``config.url``), never the store's pooler
    (``config.pool_url``): LISTEN and the shard presence locks are session state, which a
    transaction-mode pooler does not keep. The same database, role and libpq options as
    the pool, with a bounded
    connect timeout and TCP keepalives (a silently dead connection is noticed), and
    in autocommit mode so every LISTEN takes effect at once.
    """
    url = config.url
    kwargs: dict[str, Any] = {
        "host": url.host, "port": url.port, "dbname": url.database, "user": url.username,
        "password": None if url.password is None else str(url.password),
    }
    for key, value in dict(url.query).items():
        kwargs[key] = value[-1] if isinstance(value, tuple) else value
    for key, value in dict(config.engine_options.get("connect_args") or {}).items():
        if key not in _NOT_CONNINFO:
            kwargs[key] = value
    seconds = _LISTEN_CONNECT_TIMEOUT
    try:
        if kwargs.get("connect_timeout") is not None:
            seconds = int(kwargs["connect_timeout"])
    except (TypeError, ValueError):
        pass
    kwargs["connect_timeout"] = max(1, min(seconds, _LISTEN_CONNECT_TIMEOUT))
    for option, default in (("keepalives", 1), ("keepalives_idle", 30),
                            ("keepalives_interval", 10), ("keepalives_count", 3)):
        kwargs.setdefault(option, default)
    kwargs["autocommit"] = True
    return {k: v for k, v in kwargs.items() if v is not None}


def through_pooler(reported_pid: int | None, server_pid: int | None) -> bool:
    """Whether a session is proxied: poolers (PgBouncer, Odyssey, pgcat) hand the client a
    made-up process id in BackendKeyData, while ``pg_backend_pid()`` answers the real one."""
    return bool(reported_pid) and bool(server_pid) and reported_pid != server_pid


def _same_target(a: StoreConfig, b: StoreConfig) -> bool:
    return a.url == b.url and a.version == b.version


def _readable(fileno: int, timeout: float) -> bool:
    """Whether the socket has data (or is closed) within ``timeout`` seconds."""
    try:
        poll = getattr(select, "poll", None)
        if poll is not None:
            poller = poll()
            poller.register(fileno, select.POLLIN)
            return bool(poller.poll(timeout * 1000))
        r, _, _ = select.select([fileno], [], [], timeout)
        return bool(r)
    except (OSError, ValueError):
        return True  # closed under us: let the locked read find out


class Listener:
    """The LISTEN connection of one store in this process (see the module docstring).

    Sinks are opaque hashable objects (consumers, get_many watches): ``update`` says
    which task ids a sink waits for, ``wait`` blocks until one of them is notified,
    ``take`` hands over the notified ids. Every method is thread-safe.
    """

    def __init__(self, holder: EngineHolder) -> None:
        # weak: the registry is keyed by the holder, so a strong reference here would
        # keep both alive for ever once the holder is otherwise gone (tests, reloads)
        self._holder_ref = weakref.ref(holder)
        self.prefix = channel_prefix(holder.config.names)
        self.lock_key = lock_key(holder.config.names)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._conn: Any = None
        self._conn_config: StoreConfig | None = None
        self._listening: set[str] = set()
        self._subs: dict[str, set[object]] = {}
        self._refs: dict[str, int] = {}
        self._inbox: dict[object, set[str]] = {}
        self._gen: dict[object, int] = {}
        self._connecting = False
        self._socket_waiter = False
        self._unlisten_timer: threading.Timer | None = None
        self._pooler_warned = False
        self._connected_at = 0.0
        self._next_attempt = 0.0
        self._backoff = _BACKOFF_FIRST
        self._warned = False
        #: bumped on every successful (re)connect: consumers re-read all pending ids
        self.epoch = 0
        #: counters for tests and debugging
        self.received = 0
        self.ignored = 0
        self.connects = 0

    # -- state ---------------------------------------------------------------------

    @property
    def holder(self) -> EngineHolder:
        holder = self._holder_ref()
        if holder is None:
            raise RuntimeError("the result store's engine holder is gone")
        return holder

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def listening(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._listening)

    def backend_pid(self) -> int | None:
        """The server process id of the LISTEN session (tests)."""
        conn = self._conn
        return None if conn is None else int(conn.info.backend_pid)

    # -- subscriptions --------------------------------------------------------------

    def update(self, sink: object, add: Iterable[str] = (), remove: Iterable[str] = ()
               ) -> None:
        """Make ``sink`` wait for ``add`` and no longer for ``remove``; apply LISTENs."""
        with self._lock:
            for task_id in remove:
                sinks = self._subs.get(task_id)
                if sinks is None or sink not in sinks:
                    continue
                sinks.discard(sink)
                inbox = self._inbox.get(sink)
                if inbox:
                    inbox.discard(task_id)
                if not sinks:
                    del self._subs[task_id]
                    channel = channel_for(self.prefix, task_id)
                    left = self._refs.get(channel, 0) - 1
                    if left > 0:
                        self._refs[channel] = left
                    else:
                        self._refs.pop(channel, None)
            for task_id in add:
                sinks = self._subs.setdefault(task_id, set())
                if sink in sinks:
                    continue
                if not sinks:
                    channel = channel_for(self.prefix, task_id)
                    self._refs[channel] = self._refs.get(channel, 0) + 1
                sinks.add(sink)
            self._apply_locked()
            self._cond.notify_all()
        self.ensure_connected()

    def release(self, sink: object, task_ids: Iterable[str]) -> None:
        """Forget ``sink`` entirely (its waits are over)."""
        self.update(sink, remove=task_ids)
        self.forget(sink)

    def forget(self, sink: object) -> None:
        """Drop the inbox of a sink that waits for nothing (no reference kept to it)."""
        with self._lock:
            self._inbox.pop(sink, None)
            self._gen.pop(sink, None)

    def _apply_locked(self, *, unlisten_now: bool = False) -> None:
        """LISTEN the wanted channels now; UNLISTEN the others a little later.

        A LISTEN is needed before the waiter's first read, so it is sent at once. An
        UNLISTEN is not urgent: it rides along with the next LISTEN (same round trip)
        or is sent by a timer ``_UNLISTEN_LINGER`` seconds later, so a client waiting
        for one result after another pays one round trip per wait instead of two,
        and an idle process still stops receiving notifications promptly.
        """
        conn = self._conn
        if conn is None:
            return
        wanted = set(self._refs)
        listen = wanted - self._listening
        unlisten = self._listening - wanted
        if unlisten and not listen and not unlisten_now:
            self._schedule_unlisten_locked()
            unlisten = set()
        sql = listen_sql(listen, unlisten, self.lock_key)
        if not sql:
            return
        try:
            conn.execute(sql)
        except Exception as exc:
            self._lost_locked(exc)
            return
        self._listening = (self._listening | listen) - unlisten

    def _schedule_unlisten_locked(self) -> None:
        if self._unlisten_timer is not None:
            return
        timer = threading.Timer(_UNLISTEN_LINGER, self._unlisten_idle)
        timer.daemon = True
        self._unlisten_timer = timer
        timer.start()

    def _unlisten_idle(self) -> None:
        with self._lock:
            self._unlisten_timer = None
            self._apply_locked(unlisten_now=True)
            if not self._listening and not self._socket_waiter:
                # nothing listened any more: drop what arrived meanwhile, unread
                self._read_locked()

    # -- connection -------------------------------------------------------------------

    def ensure_connected(self) -> None:
        """Open (or re-open, or follow a reload with) the connection when it is due.

        Connecting happens without the lock, in one thread at a time; meanwhile the
        other waits poll. Nothing is opened while no id is wanted (lazy).
        """
        with self._lock:
            config = self.holder.config
            if self._conn is not None:
                if self._conn_config is None or _same_target(self._conn_config, config):
                    return
                # reloaded credentials: the old role's session goes now
                logger.info("result store notifications: config reloaded, reconnecting")
                self._close_locked()
                self._next_attempt = 0.0
            if self._connecting or not self._refs or time.monotonic() < self._next_attempt:
                return
            self._connecting = True
        conn: Any = None
        error: BaseException | None = None
        try:
            if psycopg is None:  # pragma: no cover
                raise RuntimeError("psycopg is not installed")
            conn = psycopg.connect(**listen_conninfo(config))
            conn.add_notify_handler(self._on_notify)
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            if through_pooler(conn.info.backend_pid, row[0] if row else None) \
                    and not self._pooler_warned:
                self._pooler_warned = True
                logger.warning(
                    "result store notifications: the LISTEN connection to %s goes through "
                    "a connection pooler (the server process id differs from the one the "
                    "connection reported). With a transaction-mode pooler notifications "
                    "never arrive and waits are answered only by the safety-net read; "
                    "point the store at PostgreSQL directly or turn notifications off.",
                    self._target(config))
        except Exception as exc:
            error = exc
        with self._lock:
            self._connecting = False
            if error is not None:
                self._failed_locked(error, config)
                self._cond.notify_all()
                return
            self._conn, self._conn_config, self._listening = conn, config, set()
            self._connected_at = time.monotonic()
            self._apply_locked()
            if self._conn is conn:
                self.epoch += 1
                self.connects += 1
                if self._warned:
                    logger.info("result store notifications: LISTEN connection to %s "
                                "is back; waits are pushed again", self._target(config))
                    self._warned = False
            self._cond.notify_all()

    @staticmethod
    def _target(config: StoreConfig) -> str:
        url = config.url
        return f"{url.host}:{url.port or 5432}/{url.database} as {url.username}"

    def _schedule_retry_locked(self) -> None:
        delay = self._backoff * (1.0 + random.random() / 2)
        self._next_attempt = time.monotonic() + delay
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)

    def _failed_locked(self, exc: BaseException, config: StoreConfig) -> None:
        self._schedule_retry_locked()
        if not self._warned:
            self._warned = True
            reason = classify_connect_error(exc, config).message
            logger.warning(
                "result store notifications: cannot open the LISTEN connection (%s); "
                "waits fall back to polling the store and the connection is retried "
                "with backoff. LISTEN needs a direct session with PostgreSQL (not a "
                "transaction-mode pooler).", reason)

    def _lost_locked(self, exc: BaseException) -> None:
        config = self._conn_config
        self._close_locked()
        if time.monotonic() - self._connected_at >= _HEALTHY_AFTER:
            # a connection that served for a while: the first reconnect is immediate
            self._backoff = _BACKOFF_FIRST
            self._next_attempt = 0.0
        else:
            # lost right after connecting (e.g. LISTEN refused on a standby): back off,
            # or every wait would reconnect in a loop
            self._schedule_retry_locked()
        if not self._warned and config is not None:
            self._warned = True
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            logger.warning("result store notifications: LISTEN connection to %s lost (%s); "
                           "waits poll until it is back", self._target(config),
                           redact(text, config.password))

    def _close_locked(self) -> None:
        conn, self._conn = self._conn, None
        self._conn_config = None
        self._listening = set()
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already broken
                logger.debug("closing the LISTEN connection failed", exc_info=True)

    def close(self) -> None:
        """Close the connection (tests, shutdown); a later wait reopens it."""
        with self._lock:
            self._close_locked()
            self._cond.notify_all()

    # -- notifications -------------------------------------------------------------------

    def _on_notify(self, notify: Any) -> None:
        # psycopg calls this from inside execute(), which we only run under the lock
        self._dispatch_locked(notify.channel, notify.payload)

    def _dispatch_locked(self, channel: str, payload: str) -> None:
        parsed = parse_payload(payload)
        if parsed is None:
            self.ignored += 1
            return
        task_id, _status = parsed
        sinks = self._subs.get(task_id)
        if not sinks or channel != channel_for(self.prefix, task_id):
            self.ignored += 1
            return
        self.received += 1
        for sink in sinks:
            self._inbox.setdefault(sink, set()).add(task_id)
            self._gen[sink] = self._gen.get(sink, 0) + 1

    def _read_locked(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            pgconn = conn.pgconn
            pgconn.consume_input()
            while True:
                n = pgconn.notifies()
                if n is None:
                    break
                self._dispatch_locked(n.relname.decode("utf-8", "replace"),
                                      n.extra.decode("utf-8", "replace"))
            if pgconn.status != psycopg.pq.ConnStatus.OK:
                raise psycopg.OperationalError("the LISTEN connection is broken")
        except Exception as exc:
            self._lost_locked(exc)

    def take(self, sink: object) -> set[str]:
        """The ids notified for ``sink`` since the last take."""
        with self._lock:
            inbox = self._inbox.get(sink)
            if not inbox:
                return set()
            self._inbox[sink] = set()
            return inbox

    def kick(self, sink: object) -> None:
        """Wake the threads waiting for ``sink`` (another thread changed its results)."""
        with self._lock:
            self._gen[sink] = self._gen.get(sink, 0) + 1
            self._cond.notify_all()

    def wait(self, sink: object, timeout: float) -> None:
        """Block until ``sink`` is notified or kicked, the connection changes, or timeout.

        One thread at a time waits on the socket, without the lock; the others wait
        on the condition, which the socket waiter signals after reading.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            gen0 = self._gen.get(sink, 0)
            epoch0 = self.epoch
            while True:
                if (self._inbox.get(sink) or self._gen.get(sink, 0) != gen0
                        or self.epoch != epoch0 or self._conn is None):
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                if self._socket_waiter:
                    self._cond.wait(remaining)
                    continue
                conn = self._conn
                self._socket_waiter = True
                self._lock.release()
                try:
                    readable = _readable(conn.pgconn.socket, min(remaining, _SOCKET_SLICE))
                except Exception:
                    readable = True
                finally:
                    self._lock.acquire()
                    self._socket_waiter = False
                if readable and conn is self._conn:
                    self._read_locked()
                self._cond.notify_all()


# ----------------------------------------------------------------------------- registry

_LISTENERS: weakref.WeakKeyDictionary[EngineHolder, Listener] = weakref.WeakKeyDictionary()
_LISTENERS_LOCK = threading.Lock()


def get_listener(holder: EngineHolder) -> Listener:
    """The process's listener for ``holder`` (created on first use, never across fork)."""
    listener = _LISTENERS.get(holder)
    if listener is None:
        with _LISTENERS_LOCK:
            listener = _LISTENERS.get(holder)
            if listener is None:
                listener = _LISTENERS[holder] = Listener(holder)
    return listener


def close_listeners() -> None:
    """Close every listener of this process (tests)."""
    with _LISTENERS_LOCK:
        listeners = list(_LISTENERS.values())
        _LISTENERS.clear()
    for listener in listeners:
        listener.close()


#: every consumer of this process, reset in a forked child
_CONSUMERS: weakref.WeakSet[ResultConsumer] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The parent's sessions stay the parent's: drop them unclosed (psycopg does not
    # terminate a session when a connection from another process is collected).
    global _LISTENERS, _LISTENERS_LOCK
    _LISTENERS = weakref.WeakKeyDictionary()
    _LISTENERS_LOCK = threading.Lock()
    for consumer in list(_CONSUMERS):
        consumer._reset_state()


os.register_at_fork(after_in_child=_after_fork_in_child)


# ----------------------------------------------------------------------------- consumer


class _Watch:
    """A sink for one ``get_many`` call (hashable by identity)."""


def _ids_of(result: Any) -> frozenset[str]:
    """The task ids a wait on ``result`` (an AsyncResult or a ResultSet) is for."""
    members = getattr(result, "results", None)
    if members is None:
        return frozenset([result.id])
    return frozenset(r.id for r in members if getattr(r, "id", None))


class ResultConsumer(BaseResultConsumer):
    """Celery's result consumer over the store: pushed by NOTIFY, polling as a safety net.

    ``push`` False (SQLite, notifications off) makes every wait poll every
    ``poll_interval`` seconds through the same drain loop, so callbacks and the order
    of ``on_interval`` are the same in both modes.
    """

    def __init__(self, backend: Any, app: Any, accept: Any, pending_results: Any,
                 pending_messages: Any, *, push: bool, poll_interval: float,
                 safety_interval: float = DEFAULT_SAFETY_INTERVAL) -> None:
        super().__init__(backend, app, accept, pending_results, pending_messages)
        self.push = push
        self.poll_interval = poll_interval
        self.safety_interval = safety_interval
        self._wanted: set[str] = set()
        self._cancelled: set[str] = set()
        self._reset_state()
        _CONSUMERS.add(self)

    def _reset_state(self) -> None:
        """Fresh locks and no subscriptions (at start and in a forked child).

        The ids this backend waits for survive a fork with its pending results; the
        parent's subscriptions and waits do not (the child has its own listener).
        """
        self._lock = threading.RLock()
        self._subscribed: set[str] = set()
        self._active = 0
        self._rows: dict[str, Any] = {}
        #: ids whose row could not be made into a meta (CorruptRowError...): the error,
        #: kept for the wait on that id (see _read)
        self._failed: dict[str, BaseException] = {}
        self._epoch_seen = -1
        self._last_full = time.monotonic()
        self._tls = threading.local()

    def on_after_fork(self) -> None:
        self._reset_state()

    def listener(self) -> Listener | None:
        if not self.push:
            return None
        holder: EngineHolder = self.backend.holder
        return get_listener(holder)

    # -- BaseResultConsumer API -----------------------------------------------------------

    def start(self, initial_task_id: str, **kwargs: Any) -> None:
        self.consume_from(initial_task_id)

    def consume_from(self, task_id: str) -> None:
        with self._lock:
            self._cancelled.discard(task_id)
            self._wanted.add(task_id)

    def cancel_for(self, task_id: str) -> None:
        # Never blocks nor does I/O: Celery calls this from AsyncResult.__del__. The
        # next sync (or the end of the wait) applies it.
        self._cancelled.add(task_id)

    def stop(self) -> None:
        listener = self.listener()
        if listener is not None:
            with self._lock:
                subscribed, self._subscribed = self._subscribed, set()
            listener.release(self, subscribed)

    def on_state_change(self, meta: dict[str, Any], message: Any) -> None:
        if _waiting_on is None or detect_environment() != "default":
            super().on_state_change(meta, message)  # yields to other greenlets: sleep(0)
        else:
            self._on_state_change_no_yield(meta)
        if meta["status"] in states.READY_STATES:
            self.cancel_for(meta["task_id"])

    def _on_state_change_no_yield(self, meta: dict[str, Any]) -> None:
        """Celery's ``BaseResultConsumer.on_state_change`` without its final ``sleep(0)``.

        The ``sleep(0)`` lets other greenlets run under eventlet/gevent; with threads or
        prefork it is a system call that hands the CPU away once per result: with 1000
        ready results joined, ~100 ms of a 125 ms join on a busy machine (the Redis
        backend pays the same). Same effects otherwise, in the same order.
        """
        if self.on_message:
            self.on_message(meta)
        if meta["status"] in states.READY_STATES:
            task_id = meta["task_id"]
            assert _waiting_on is not None
            results = _waiting_on(self._pending_results, task_id)
            if not results:
                # buffered in case the result object is added to the pending ones later
                self._pending_messages.put(task_id, meta)
            for result in results:
                result._maybe_set_cache(meta)
                bucket = self.buckets.pop(result, None)
                if bucket is not None:
                    bucket.append(result)

    def drain_events_until(self, p: Any, timeout: float | None = None,
                           on_interval: Callable[[], Any] | None = None) -> Any:
        # Celery's drainer waits in slices of 1 s; never sleep past the caller's timeout,
        # and poll at our own (short) interval when not pushed.
        slice_ = self.safety_interval if self.push else self.poll_interval
        if timeout is not None:
            slice_ = min(slice_, max(0.0, timeout))
        return self.drainer.drain_events_until(p, timeout=timeout, interval=slice_,
                                               on_interval=on_interval)

    def _wait_for_pending(self, result: Any, timeout: float | None = None,
                          on_interval: Any = None, on_message: Any = None,
                          **kwargs: Any) -> Iterator[None]:
        with self._lock:
            self._active += 1
        self._tls.on_message = on_message
        ids = _ids_of(result)
        waiting = super()._wait_for_pending(result, timeout=timeout, on_interval=on_interval,
                                            on_message=on_message, **kwargs)
        try:
            for _ in waiting:
                self._raise_failed(ids)
                yield
        finally:
            waiting.close()
            self._tls.on_message = None
            self._leave()

    def _raise_failed(self, ids: frozenset[str]) -> None:
        """Raise, in the wait for it, the error of a row of ``ids`` that could not be read."""
        if not self._failed:
            return
        with self._lock:
            for task_id in ids:
                exc = self._failed.pop(task_id, None)
                if exc is not None:
                    raise exc

    def on_wait_for_pending(self, result: Any, **kwargs: Any) -> None:
        # LISTEN first, then read: a result stored in between is notified, one
        # stored before is read here.
        self._sync()
        listener = self.listener()
        if listener is not None:
            self._epoch_seen = listener.epoch
        self._last_full = time.monotonic()
        if hasattr(result, "results"):  # a ResultSet: its ready members, as Redis reads them
            for meta in result._iter_meta(**kwargs):
                if meta is not None:
                    self._initial_state(meta)
            return
        backend = self.backend
        cached = backend._cache.get(result.id)
        if cached is not None:
            self._initial_state(cached)
            return
        for row in backend._ensure_retryable(backend._fetch_metas, [result.id]):
            task_id, data = row[0], tuple(row[1:])
            self._rows[task_id] = data
            meta = backend._meta_from_row(task_id, data)
            on_message = getattr(self._tls, "on_message", None)
            if on_message is not None and meta["status"] not in states.READY_STATES:
                # Redis subscribes when the task is sent, so its on_message sees a state
                # stored before the wait began; so does ours, for the current one
                on_message(meta)
            self._initial_state(meta)

    def _initial_state(self, meta: dict[str, Any]) -> None:
        self.on_state_change(meta, None)
        if meta["status"] in (states.SUCCESS, states.FAILURE):
            # as the Redis consumer: a ready meta buffered for a result that was
            # already resolved would never be taken
            pending = self.backend._pending_messages
            try:
                buf = pending.pop(meta["task_id"])
            except KeyError:
                pass
            else:
                pending.total -= len(buf)

    def drain_events(self, timeout: float | None = None) -> None:
        timeout = self.safety_interval if timeout is None else max(0.0, timeout)
        self._sync()
        listener = self.listener()
        if listener is not None and listener.connected:
            epoch = listener.epoch
            if epoch != self._epoch_seen:
                # (re)connected: whatever was notified meanwhile is lost, read it all
                self._epoch_seen = epoch
                self._read_all()
                return
            ids = listener.take(self)
            if not ids:
                until_safety = self._last_full + self.safety_interval - time.monotonic()
                listener.wait(self, min(timeout, max(0.0, until_safety)))
                ids = listener.take(self)
            if ids:
                self._read(ids)
                return
            if listener.epoch == epoch and \
                    time.monotonic() - self._last_full >= self.safety_interval:
                self._read_all()
            return
        if timeout:
            time.sleep(min(self.poll_interval, timeout))
        self._read_all()

    # -- get_many ---------------------------------------------------------------------------

    @contextmanager
    def watch(self, task_ids: Iterable[str]) -> Iterator[Callable[[float], None]]:
        """Listen for ``task_ids`` for the duration of a ``get_many`` call.

        Yields ``wait(seconds)``, which returns early when one of them is notified
        (or the connection changed); without notifications it sleeps for at most
        ``poll_interval``.
        """
        listener = self.listener()
        if listener is None:
            def sleep(seconds: float) -> None:
                if seconds > 0:
                    time.sleep(min(seconds, self.poll_interval))
            yield sleep
            return
        sink = _Watch()
        ids = list(task_ids)
        listener.update(sink, add=ids)
        epoch = [listener.epoch]

        def wait(seconds: float) -> None:
            listener.ensure_connected()
            if not listener.connected:
                if seconds > 0:
                    time.sleep(min(seconds, self.poll_interval))
                return
            if listener.epoch != epoch[0]:
                epoch[0] = listener.epoch
                return  # reconnected: the caller re-reads everything now
            if not listener.take(sink):
                listener.wait(sink, min(seconds, self.safety_interval))
            listener.take(sink)
        try:
            yield wait
        finally:
            listener.release(sink, ids)

    # -- internals ------------------------------------------------------------------------------

    def _sync(self) -> None:
        """Apply cancellations and (while a wait is active) the LISTENs of wanted ids."""
        listener = self.listener()
        with self._lock:
            while self._cancelled:
                task_id = self._cancelled.pop()
                self._wanted.discard(task_id)
                self._rows.pop(task_id, None)
                self._failed.pop(task_id, None)
            if listener is None:
                return
            if self._active:
                add = self._wanted - self._subscribed
                remove = self._subscribed - self._wanted
                self._subscribed = set(self._wanted)
            else:
                add, remove = set(), self._subscribed
                self._subscribed = set()
        if add or remove:
            listener.update(self, add=add, remove=remove)
        elif self._active:
            listener.ensure_connected()

    def _leave(self) -> None:
        with self._lock:
            self._active = max(0, self._active - 1)
            last = self._active == 0
        if last:
            self._sync()
            listener = self.listener()
            if listener is not None:
                with self._lock:
                    idle = self._active == 0
                if idle:
                    listener.forget(self)
        else:
            listener = self.listener()
            if listener is not None:
                # results of the other waiting threads may have been set by this one
                listener.kick(self)

    def _read_all(self) -> None:
        self._last_full = time.monotonic()
        with self._lock:
            ids = set(self._wanted)
        if ids:
            self._read(ids)

    def _read(self, ids: set[str]) -> None:
        with self._lock:
            ids = ids & self._wanted
        if not ids:
            return
        backend = self.backend
        rows = backend._ensure_retryable(backend._fetch_metas, sorted(ids))
        changed = False
        for row in rows:
            task_id, data = row[0], tuple(row[1:])
            if self._rows.get(task_id) == data:
                continue  # already delivered (a safety read or a duplicate notification)
            self._rows[task_id] = data
            changed = True
            try:
                meta = backend._meta_from_row(task_id, data)
            except Exception as exc:
                # An undecodable row (CorruptRowError) is the problem of the wait for that
                # id, which raises it (_raise_failed): this read may be for another result
                # of the backend, or run in a greenlet drainer that an exception would end
                # for every wait of the process. Read again only once the row changes.
                with self._lock:
                    self._failed[task_id] = exc
                continue
            if self._failed:
                with self._lock:
                    self._failed.pop(task_id, None)
            self.on_state_change(meta, None)
        if changed and self._active > 1:
            listener = self.listener()
            if listener is not None:
                listener.kick(self)
