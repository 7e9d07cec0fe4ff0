"""ResultStoreBackend: the Celery result backend registered as ``resultstore``.

Contract: everything Celery's stock ``DatabaseBackend`` offers (store/get/forget,
groups, extended results, ``task_result_exists``, ``cleanup``, retries of
transient errors, engine invalidation on connection loss) over the same table
layout, plus key-value access by Celery key, native joins and native chords.

Speed comes from doing less, not from cutting durability:

- a store is one ``INSERT .. ON CONFLICT DO UPDATE`` in autocommit mode, one
  round trip, prepared by psycopg; the conflict clause never lets a non-ready
  state replace a ready one nor anything replace SUCCESS;
- connections are pooled per process (see engine.py) and pinged only when they
  sat idle, instead of a ping per checkout;
- ``get_many`` (native join) asks for all still-pending ids in one query per
  polling pass and yields results as they become ready;
- chords count distinct header parts in the database and the statement that
  records the last part claims the callback, so it fires exactly once and no
  ``chord_unlock`` task polls.

The ``result`` column holds a pickle of the prepared result, as stock Celery's
PickleType column always did, so stock clients of every 5.x version read our
rows. Unless the app accepts pickle content, results are pickled and unpickled
through a restricted (de)serialiser that allows only the types JSON can carry.

Why one module: it is the one Celery ``Backend`` subclass, whose contract is a single
class with many overrides (tasks, groups, chords, key-value, waits) sharing the engine
holder, the statements and the retry wrapper. What can stand alone already does: SQL
in sql.py, connections in engine.py, push waits in consumer.py, pickles in pickles.py,
cleanup in cleanup.py.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import maybe_signature, states
from celery.backends.asynchronous import AsyncBackendMixin
from celery.backends.base import Backend, _create_chord_error_with_cause
from celery.exceptions import BackendGetMetaError, ChordError, ImproperlyConfigured
from celery.result import GroupResult, allow_join_result, result_from_tuple
from celery.signals import worker_process_init
from celery.utils.functional import _regen
from celery.utils.serialization import raise_with_context
from celery.utils.time import get_exponential_backoff_interval, maybe_timedelta
from kombu.utils.encoding import bytes_to_str, ensure_bytes

from . import cleanup as cleanup_mod
from . import consumer as consumer_mod
from .config import ConfigError, DirectorySource, StoreConfig, parse_backend_url, redact
from .engine import (
    DEFAULT_IDLE_PING_AFTER,
    DEFAULT_RELOAD_INTERVAL,
    EngineHolder,
    enter_prefork_child,
    get_holder,
    is_connection_error,
    is_transient_error,
)
from .notify import channel_for, shard_of
from .pickles import (
    PICKLE_CONTENT_TYPE,
    UnsafePickleError,
    dump_full,
    dump_restricted,
    load_full,
    load_restricted,
)
from .pickles import is_pickle as _is_pickle
from .schema import TableNames
from .sql import ID_COLUMNS, TASK_COLUMNS, Statements, statements

__all__ = ["ResultStoreBackend"]

logger = logging.getLogger(__name__)

_SQLITE_TS = "%Y-%m-%d %H:%M:%S.%f"

READY_STATES = frozenset(states.READY_STATES)

# ----------------------------------------------------------------------------- retries

#: Seconds an operation keeps retrying transient errors, from its first failure: rides
#: out a 60 s PostgreSQL outage (restart, failover) with room for reconnecting.
DEFAULT_RETRY_BUDGET = 90.0
DEFAULT_RETRY_BASE_MS = 50
DEFAULT_RETRY_CAP_MS = 2000


def _retry_budget(value: Any) -> float:
    """The ``resultstore_retry_budget`` app setting (seconds; None: the default)."""
    if value is None:
        return DEFAULT_RETRY_BUDGET
    try:
        budget = float(value)
    except (TypeError, ValueError):
        raise ImproperlyConfigured(
            "resultstore_retry_budget: expected a number of seconds") from None
    if budget != budget or budget < 0:
        raise ImproperlyConfigured("resultstore_retry_budget: must be 0 or more seconds")
    return budget


def _op_name(func: Any) -> str:
    return str(getattr(func, "__name__", None) or type(func).__name__)


def _describe_error(exc: BaseException, password: str | None) -> str:
    """One line about ``exc`` for logs: its type and first message line, redacted."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = redact(text[:300], password)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ----------------------------------------------------------------------------- rows

#: Values kombu's json round-trips to themselves: stored without the round trip (other
#: serializers may not: msgpack refuses ints beyond 64 bits, so they always round-trip).
_JSON_EXACT_SCALARS = frozenset({type(None), bool, int, float, str})
#: elements json_identity() looks at before it gives up (and the round trip runs)
_JSON_IDENTITY_BUDGET = 256


def json_identity(value: Any, budget: int = _JSON_IDENTITY_BUDGET) -> bool:
    """Whether kombu's json round trip gives ``value`` back unchanged.

    True only for exact lists, str-keyed dicts (without kombu's ``__type__`` envelope key)
    and the exact scalars above, nested, within ``budget`` elements: then the store can
    skip the encode + decode (most of a small result's store-side cost). Anything else
    (tuples, subclasses, non-str keys, cycles, big values) answers False and round-trips.
    """
    stack = [value]
    pop, push = stack.pop, stack.extend
    while stack:
        budget -= 1
        if budget < 0:
            return False
        item = pop()
        kind = type(item)
        if kind in _JSON_EXACT_SCALARS:
            continue
        if kind is list:
            push(item)
        elif kind is dict:
            if "__type__" in item:
                return False
            for key in item:
                if type(key) is not str:
                    return False
            push(item.values())
        else:
            return False
    return True


class CorruptRowError(BackendGetMetaError):
    """A stored row whose column cannot be decoded.

    Names the task (or group) id, the schema-qualified table and the column, never the
    content; not retried (reading it again gives the same bytes).
    """

    def __init__(self, message: str, *, task_id: str = "", table: str = "",
                 column: str = "") -> None:
        super().__init__(message, task_id=task_id)
        self.table = table
        self.column = column

    def __reduce__(self) -> Any:
        # a task that re-raises it has it pickled (pickle serializer): keep the fields
        return (type(self), (str(self),), {"task_id": self.task_id, "table": self.table,
                                           "column": self.column})

def _corrupt_error(kind: str, ident: str, table: str, column: str, cause: BaseException
                   ) -> CorruptRowError:
    # our own refusals name what was refused; anything else only by its type, since
    # decoder messages may quote bytes of the content
    reason = str(cause) if isinstance(cause, UnsafePickleError) else type(cause).__name__
    return CorruptRowError(
        f"the stored row of {kind} {ident} in table {table} cannot be decoded: column "
        f"{column!r} is corrupt or was not written by a Celery result backend ({reason})",
        task_id=ident, table=table, column=column)


# ----------------------------------------------------------------------------- time


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _read_ts(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return _utc(value)
    text = str(value).replace("T", " ")
    try:
        return _utc(datetime.fromisoformat(text))
    except ValueError:
        return None


def _iso_ts(value: Any) -> str | None:
    """``date_done`` of a meta dict: an ISO 8601 UTC string, as the Redis backend gives it
    (``AsyncResult.date_done`` parses it back into an aware datetime either way)."""
    ts = _read_ts(value)
    return None if ts is None else ts.isoformat()


class ResultStoreBackend(Backend, AsyncBackendMixin):
    """Celery result backend on PostgreSQL (and SQLite) with stock-compatible tables.

    Asynchronous like Celery's Redis backend (``AsyncBackendMixin``): every wait runs
    Celery's drain loop over :class:`~resultstore_backend.consumer.ResultConsumer`,
    woken by the store's NOTIFY on PostgreSQL and polling on SQLite (consumer.py).
    """

    #: ResultSet.iterate compat attribute (as stock DatabaseBackend)
    subpolling_interval = 0.5
    supports_native_join = True
    supports_autoexpire = False
    persistent = True

    task_keyprefix = "celery-task-meta-"
    group_keyprefix = "celery-taskset-meta-"

    def __init__(self, dburi: str | None = None, engine_options: Mapping[str, Any] | None = None,
                 url: str | None = None, **kwargs: Any) -> None:
        super().__init__(expires_type=maybe_timedelta, url=url, **kwargs)
        conf = self.app.conf
        # Like the stock backend, retry transient errors by default; but for as long
        # as a PostgreSQL outage may last (a time budget, resultstore_retry_budget),
        # not for a number of quick attempts. Celery's own settings still apply when
        # the app sets them (max_retries then caps the attempts within the budget).
        if not conf.value_set_for("result_backend_always_retry") or getattr(
                self, "always_retry", None) is None:
            self.always_retry = True
        if not conf.value_set_for("result_backend_max_retries") or getattr(
                self, "max_retries", None) is None:
            self.max_retries: float = float("inf")
        if not conf.value_set_for("result_backend_base_sleep_between_retries_ms"):
            self.base_sleep_between_retries_ms = DEFAULT_RETRY_BASE_MS
        if not conf.value_set_for("result_backend_max_sleep_between_retries_ms"):
            self.max_sleep_between_retries_ms = DEFAULT_RETRY_CAP_MS
        self.retry_budget = _retry_budget(conf.get("resultstore_retry_budget"))

        self.url = url or dburi or conf.get("result_backend") or None
        try:
            source = parse_backend_url(self.url)
        except ConfigError as exc:
            raise ImproperlyConfigured(str(exc)) from None
        if isinstance(source, StoreConfig):
            source = self._apply_app_tables(source, conf)
            options = dict(source.engine_options)
            options.update(conf.get("database_engine_options") or {})
            options.update(engine_options or {})
            source = replace(source, engine_options=options)
        self.engine_options = dict(engine_options or {})
        create_tables = conf.get("resultstore_create_tables")
        if create_tables is None and conf.get("database_create_tables_at_setup") is False:
            create_tables = False
        self._holder: EngineHolder = get_holder(
            source,
            reload_interval=float(conf.get("resultstore_reload_interval",
                                           DEFAULT_RELOAD_INTERVAL)),
            idle_ping_after=float(conf.get("resultstore_idle_ping_after",
                                           DEFAULT_IDLE_PING_AFTER)),
            create_tables=create_tables,
        )
        config = self._holder.config
        self._dir_mode = isinstance(source, DirectorySource)
        if config.expires is not None and not conf.value_set_for("result_expires") \
                and kwargs.get("expires") is None:
            self.expires = timedelta(seconds=config.expires) if config.expires else None
        if config.extended and not conf.value_set_for("result_extended"):
            conf.result_extended = True
        # Read once (settings are fixed at start-up): the lookup is measurable per call.
        self._extended = bool(conf.find_value_for_key("extended", "result"))
        self.pending_horizon = int(conf.get("resultstore_pending_horizon",
                                            cleanup_mod.DEFAULT_PENDING_HORIZON))
        self._full_pickle = PICKLE_CONTENT_TYPE in self.accept
        # A key-value backend returns what the serializer's round trip gives (tuples
        # as lists with json): store exactly that, so every backend reads back alike.
        self._roundtrip = self.content_type != PICKLE_CONTENT_TYPE
        self._exact_scalars = (_JSON_EXACT_SCALARS if self.content_type == "application/json"
                               else frozenset())
        self._init_notifications(conf, config,
                                 source.notifications if isinstance(source, StoreConfig)
                                 else config.notifications)

    def _init_notifications(self, conf: Any, config: StoreConfig,
                            store_notify: bool | None) -> None:
        """Read the notification settings once and build this backend's result consumer.

        ``resultstore_notify`` (app) wins over the store's ``notifications`` (celery.json
        or ``?notify=``; taken from this backend's own URL, since the engine holder, and
        so its config, is shared with every backend of the same database URL); the
        default is on. SQLite never notifies and always polls.
        """
        app_notify = conf.get("resultstore_notify")
        if app_notify is not None:
            notify = bool(app_notify)
        else:
            notify = True if store_notify is None else bool(store_notify)
        self._notify = notify and not config.is_sqlite
        default_poll = (consumer_mod.DEFAULT_SQLITE_POLL_INTERVAL if config.is_sqlite
                        else consumer_mod.DEFAULT_POLL_INTERVAL)
        self.result_consumer = consumer_mod.ResultConsumer(
            self, self.app, self.accept, self._pending_results, self._pending_messages,
            push=self._notify,
            poll_interval=consumer_mod.interval_setting(
                "resultstore_poll_interval", conf.get("resultstore_poll_interval"),
                default_poll),
            safety_interval=consumer_mod.interval_setting(
                "resultstore_safety_interval", conf.get("resultstore_safety_interval"),
                consumer_mod.DEFAULT_SAFETY_INTERVAL, consumer_mod.MAX_SAFETY_INTERVAL),
        )

    @property
    def notifications(self) -> bool:
        """Whether stores NOTIFY and waits are pushed (False on SQLite)."""
        return self._notify

    @staticmethod
    def _apply_app_tables(source: StoreConfig, conf: Any) -> StoreConfig:
        tablenames = conf.get("database_table_names") or {}
        schemas = conf.get("database_table_schemas") or {}
        if not tablenames and not schemas:
            return source
        names = TableNames(
            source.names.schema or schemas.get("task") or None,
            tablenames.get("task") or source.names.task_table,
            tablenames.get("group") or source.names.group_table,
        )
        return replace(source, names=names)

    # ------------------------------------------------------------------ plumbing

    @property
    def holder(self) -> EngineHolder:
        return self._holder

    @property
    def extended_result(self) -> bool:
        return bool(self.app.conf.find_value_for_key("extended", "result"))

    #: False once a statement found the store still at schema version 1 (see
    #: _use_version_1_columns); per backend object, so per thread
    _id_columns = True

    def _sql(self) -> Statements:
        config = self._holder.config
        return statements("sqlite" if config.is_sqlite else "postgresql", config.names,
                          self._id_columns)

    def _use_version_1_columns(self) -> None:
        """Keep working on a store not migrated to schema version 2 yet.

        A worker role has no DDL rights: when workers are upgraded before the operator
        migrated their store, the store lacks ``group_id``/``parent_id``. Rather than
        failing every store, write and read without them, as the previous release did
        (metas then lack the two keys), until the process restarts after the migration.
        """
        self._id_columns = False
        config = self._holder.config
        label = self._table_label(config.names.task_table)
        key = (config.url.host, config.url.port, config.url.database, label)
        if key not in _VERSION_1_WARNED:
            _VERSION_1_WARNED.add(key)
            logger.warning(
                "result store table %s (database %s) has no %s columns (schema version 1): "
                "results are stored without them until the store is migrated (the "
                "operator does it when it reconciles the store, or run `resultstore "
                "migrate`) and this process restarts", label, config.url.database,
                "/".join(ID_COLUMNS))

    @property
    def _is_sqlite(self) -> bool:
        return self._holder.config.is_sqlite

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        return is_transient_error(exc)

    def on_backend_retryable_error(self, exc: BaseException) -> None:
        if is_connection_error(exc):
            self._holder.invalidate()

    def _ts(self, value: datetime | None) -> Any:
        value = _utc(value)
        if value is None or not self._is_sqlite:
            return value
        return value.replace(tzinfo=None).strftime(_SQLITE_TS)

    def _now(self) -> datetime:
        return datetime.now(UTC)

    def _dump_result(self, value: Any) -> bytes:
        if self._roundtrip and type(value) not in self._exact_scalars and not (
                self._exact_scalars and json_identity(value)):
            value = self.decode(self.encode(value))
        if self._full_pickle:
            return dump_full(value)
        return dump_restricted(value)

    def _load_result(self, payload: Any) -> Any:
        if payload is None:
            return None
        payload = bytes(payload)
        if _is_pickle(payload):
            if self._full_pickle:
                return load_full(payload)
            return load_restricted(payload)
        # written by a client that stores serializer-encoded bytes (Celery >= 5.7)
        return self.decode(payload)

    def _describe(self, exc: BaseException) -> str:
        return _describe_error(exc, self._holder.config.password)

    def _ensure_retryable(self, func: Any, *args: Any, fallback_exc: Any = None,
                          fallback_msg: str | None = None, max_retries: float | None = None,
                          **kwargs: Any) -> Any:
        """Run ``func``, retrying transient errors until the retry budget is spent.

        Celery's loop counts attempts; with capped exponential backoff that is a
        duration nobody can read off the settings (15 attempts were ~11 s, less
        than a PostgreSQL restart may take). Here the limit is ``retry_budget``
        seconds from the first failure, with Celery's backoff (base/cap, full
        jitter) between attempts, and Celery's ``max_retries`` as a second cap
        when the app sets it. The last attempt is made at the deadline.
        """
        limit = self.max_retries if max_retries is None else max_retries
        retries = 0
        deadline: float | None = None
        while True:
            try:
                return func(*args, **kwargs)
            except Exception as exc:
                if self._id_columns and _lacks_id_columns(exc):
                    self._use_version_1_columns()
                    continue
                if not (self.always_retry and self.exception_safe_to_retry(exc)):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.retry_budget
                if retries >= limit or now >= deadline:
                    logger.error("result store operation %s failed after %d retries "
                                 "(%.1f s retry budget): %s", _op_name(func), retries,
                                 self.retry_budget, self._describe(exc))
                    if fallback_exc:
                        raise_with_context(fallback_exc(fallback_msg))
                    raise
                retries += 1
                try:
                    self.on_backend_retryable_error(exc)
                except Exception:
                    logger.exception("on_backend_retryable_error hook failed; retrying")
                nap = get_exponential_backoff_interval(
                    self.base_sleep_between_retries_ms, retries,
                    self.max_sleep_between_retries_ms, True) / 1000
                nap = min(nap, max(0.0, deadline - now))
                logger.warning("result store operation %s failed (%s); retry %d in %.2f s, "
                               "%.1f s of the retry budget left", _op_name(func),
                               self._describe(exc), retries, nap, deadline - now)
                self._sleep(nap)

    def _decode_opt(self, payload: Any) -> Any:
        return None if payload is None else self.decode(bytes(payload))

    # ------------------------------------------------------------------ store / get

    def _task_params(self, task_id: str, result: Any, state: str, traceback: Any,
                     request: Any) -> tuple[Any, ...]:
        """The upsert's parameters: the same fields as Celery's ``_get_result_meta``.

        Built directly rather than through ``_get_result_meta`` because that helper costs
        about a tenth of a millisecond per store (``app.now()`` goes through dateutil's
        ambiguity checks, and the extended flag is looked up in the config every call),
        which is a third of the whole round trip on loopback.
        """
        now = self._now()
        children = self.current_task_children(request)
        name = args = kwargs = worker = retries = queue = stamps = None
        if request and self._extended:
            name = getattr(request, "task", None)
            args = ensure_bytes(self.encode(getattr(request, "args", None)))
            kwargs = ensure_bytes(self.encode(getattr(request, "kwargs", None)))
            worker = getattr(request, "hostname", None)
            retries = getattr(request, "retries", None)
            delivery = getattr(request, "delivery_info", None)
            queue = delivery.get("routing_key") if delivery else None
            if getattr(request, "stamps", None):
                stamped = request.stamped_headers
                stamps = ensure_bytes(self.encode({
                    "stamped_headers": stamped,
                    "stamps": {k: v for k, v in request.stamps.items()
                               if k in (stamped or ())},
                }))
        return (
            bytes_to_str(task_id), state, self._dump_result(result),
            self._ts(now if state in self.READY_STATES else None), traceback,
            ensure_bytes(self.encode(children)) if children else None,
            name, args, kwargs, worker, retries, queue, stamps, self._ts(now),
            # as _get_result_meta: whenever the request has them, extended or not
            (getattr(request, "group", None) or None) if request else None,
            (getattr(request, "parent_id", None) or None) if request else None,
        )

    def _store_result(self, task_id: str, result: Any, state: str, traceback: Any = None,
                      request: Any = None, **kwargs: Any) -> Any:
        params = self._task_params(task_id, result, state, traceback, request)
        self._upsert_task(params)
        return result

    def _upsert_task(self, params: tuple[Any, ...]) -> None:
        """The store: one statement, which also NOTIFYs waiters when notifications are on."""
        sql = self._sql()
        if not sql.id_columns:
            params = params[:_VERSION_1_PARAMS]
        if self._notify:
            task_id = params[0]
            params = (*params, channel_for(sql.channel_prefix, task_id), sql.lock_key,
                      shard_of(task_id))
            with self._holder.cursor() as cur:
                cur.execute(sql.notify_upsert_task, params)
            return
        with self._holder.cursor() as cur:
            cur.execute(sql.upsert_task, params)

    def _raw_meta(self, task_id: str, row: Any) -> dict[str, Any]:
        try:
            return self._decode_row(task_id, row)
        except Exception as exc:
            raise self._corrupt_row(task_id, row, exc) from None

    def _table_label(self, table: str) -> str:
        names = self._holder.config.names
        return f"{names.schema}.{table}" if names.schema else table

    def _corrupt_row(self, task_id: str, row: Any, exc: BaseException) -> CorruptRowError:
        """The error for an undecodable task row: which task, table and column, not content."""
        column = "row"
        cause: BaseException = exc
        for name, index, decode in (("result", 1, self._load_result),
                                    ("children", 4, self._decode_opt),
                                    ("args", 6, self._decode_opt),
                                    ("kwargs", 7, self._decode_opt)):
            try:
                decode(row[index])
            except Exception as failed:
                column, cause = name, failed
                break
        return _corrupt_error("task", task_id, self._table_label(
            self._holder.config.names.task_table), column, cause)

    def _decode_row(self, task_id: str, row: Any) -> dict[str, Any]:
        (status, result, date_done, traceback, children, name, args, kwargs, worker, retries,
         queue, stamps, group_id, parent_id) = row
        meta: dict[str, Any] = {
            "task_id": task_id,
            "status": status,
            "result": self._load_result(result),
            "traceback": traceback,
            "date_done": _iso_ts(date_done),
            # a stored task with no children has [] (as Redis and stock db+ return it)
            "children": self._decode_opt(children) or [],
        }
        # only when stored: Redis's meta has them exactly when the request had them
        if group_id is not None:
            meta["group_id"] = group_id
        if parent_id is not None:
            meta["parent_id"] = parent_id
        if self._extended:
            meta.update({
                "name": name, "args": self._decode_opt(args), "kwargs": self._decode_opt(kwargs),
                "worker": worker, "retries": retries, "queue": queue,
            })
        if stamps is not None:
            try:
                info = self.decode(bytes(stamps))
                if isinstance(info, dict):
                    if "stamped_headers" in info:
                        meta["stamped_headers"] = info["stamped_headers"]
                    if isinstance(info.get("stamps"), dict):
                        meta.update(info["stamps"])
            except Exception:  # stamps are informative only
                pass
        return meta

    @staticmethod
    def _pending(task_id: str) -> dict[str, Any]:
        # exactly what the Redis backend returns for an id it has no result for
        return {"status": states.PENDING, "result": None}

    def _fetch_row(self, task_id: str) -> Any:
        sql = self._sql().select_task
        with self._holder.cursor() as cur:
            return cur.execute(sql, (task_id,)).fetchone()

    def _ensure_not_eager(self) -> None:
        """Celery's eager-mode warning, with its two settings read once (first use).

        Celery looks both up in the app's configuration on every read and wait, which
        costs about as much as decoding the row (a twentieth of a loopback get).
        """
        eager = self.__dict__.get("_eager_warning")
        if eager is None:
            conf = self.app.conf
            eager = self._eager_warning = bool(
                conf.task_always_eager and not conf.task_store_eager_result)
        if eager:
            super()._ensure_not_eager()

    def _get_task_meta_for(self, task_id: str) -> dict[str, Any]:
        task_id = bytes_to_str(task_id)
        row = self._fetch_row(task_id)
        if row is None:
            return self._pending(task_id)
        return self.meta_from_decoded(self._raw_meta(task_id, row))

    def task_result_exists(self, task_id: str) -> bool:
        def check() -> bool:
            sql = self._sql().task_exists
            with self._holder.connection() as conn:
                return conn.execute(sql, (bytes_to_str(task_id),)).fetchone() is not None
        return bool(self._ensure_retryable(check))

    def _forget(self, task_id: str) -> None:
        sql = self._sql().delete_task
        with self._holder.connection() as conn:
            conn.execute(sql, (bytes_to_str(task_id),))

    # ------------------------------------------------------------------ many / join

    def _fetch_ready(self, ids: list[str]) -> list[Any]:
        return self._fetch_many(ids, ready_only=True)

    def _fetch_metas(self, ids: list[str]) -> list[Any]:
        """Rows ``(task_id, *META)`` of ``ids`` in any state (what a woken waiter reads)."""
        return self._fetch_many(ids, ready_only=False)

    def _fetch_many(self, ids: list[str], *, ready_only: bool) -> list[Any]:
        sql = self._sql()
        statement = sql.select_many_ready if ready_only else sql.select_many
        rows: list[Any] = []
        with self._holder.connection() as conn:
            if sql.dialect == "postgresql":
                rows.extend(conn.execute(statement, (ids,)).fetchall())
            else:
                for i in range(0, len(ids), 500):
                    chunk = ids[i:i + 500]
                    query = statement.replace("{in}", sql.in_list(len(chunk)))
                    rows.extend(conn.execute(query, chunk).fetchall())
        return rows

    def _meta_from_row(self, task_id: str, row: Any) -> dict[str, Any]:
        return self.meta_from_decoded(self._raw_meta(task_id, row))

    def get_many(self, task_ids: Iterable[Any], timeout: float | None = None,
                 interval: float | None = 0.5, no_ack: bool = True, on_message: Any = None,
                 on_interval: Any = None, max_iterations: int | None = None,
                 READY_STATES: frozenset[str] = READY_STATES, **kwargs: Any
                 ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(task_id, meta)`` as tasks become ready: one query per pass.

        Between passes it waits for a notification of one of the ids (at most the
        safety interval), or polls at the consumer's interval without notifications;
        ``interval`` is accepted for compatibility and ignored, as with Redis's push
        waits. ``max_iterations=1`` (Celery's ``ResultSet._iter_meta``) reads once and
        returns without waiting.
        """
        ids = {bytes_to_str(t) for t in task_ids}
        cache = self._cache
        for task_id in list(ids):
            cached = cache.get(task_id)
            if cached is not None and cached["status"] in READY_STATES:
                ids.discard(task_id)
                yield task_id, cached
        if not ids:
            return
        if max_iterations == 1:
            yield from self._get_many_pass(ids, on_message, READY_STATES)
            return
        with self.result_consumer.watch(sorted(ids)) as wait:
            yield from self._get_many_wait(ids, wait, timeout, on_message, on_interval,
                                           max_iterations, READY_STATES)

    def _get_many_wait(self, ids: set[str], wait: Any, timeout: float | None,
                       on_message: Any, on_interval: Any, max_iterations: int | None,
                       ready_states: frozenset[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        start = time.monotonic()
        iterations = 0
        while ids:
            yield from self._get_many_pass(ids, on_message, ready_states)
            if not ids:
                break
            iterations += 1
            if max_iterations and iterations >= max_iterations:
                break
            elapsed = time.monotonic() - start
            if timeout is not None and elapsed >= timeout:
                raise self.TimeoutError(f"Operation timed out ({timeout})")
            if on_interval:
                on_interval()
            nap = self.result_consumer.safety_interval if timeout is None \
                else max(0.0, timeout - elapsed)
            wait(nap)

    def _get_many_pass(self, ids: set[str], on_message: Any, ready_states: frozenset[str]
                       ) -> Iterator[tuple[str, dict[str, Any]]]:
        """One query for the ready ones among ``ids`` (removed from ``ids`` as yielded)."""
        cache = self._cache
        if ids:
            rows = self._ensure_retryable(self._fetch_ready, sorted(ids))
            for row in rows:
                task_id = row[0]
                if task_id not in ids:
                    continue
                meta = self.meta_from_decoded(self._raw_meta(task_id, row[1:]))
                if meta["status"] not in ready_states:
                    continue
                ids.discard(task_id)
                if meta["status"] == states.SUCCESS:
                    cache[task_id] = meta
                if on_message is not None:
                    on_message(meta)
                yield task_id, meta

    def wait_for(self, task_id: str, timeout: float | None = None, interval: float = 0.5,
                 no_ack: bool = True, on_interval: Any = None) -> dict[str, Any]:
        """The meta of ``task_id`` once ready (the synchronous backends' API, kept for
        callers of stock ``DatabaseBackend.wait_for``), through the push wait."""
        result = self.app.AsyncResult(bytes_to_str(task_id), backend=self)
        self.add_pending_result(result)
        for _ in self._wait_for_pending(result, timeout=timeout, on_interval=on_interval,
                                        interval=interval, no_ack=no_ack):
            pass
        meta: dict[str, Any] = result._cache
        return meta

    # ------------------------------------------------------------------ groups

    def _save_group(self, group_id: str, result: Any) -> Any:
        value = self._dump_result(self.prepare_value(result))
        sql = self._sql().upsert_group
        with self._holder.connection() as conn:
            conn.execute(sql, (bytes_to_str(group_id), value, self._ts(self._now())))
        return result

    def _restore_group(self, group_id: str) -> dict[str, Any] | None:
        sql = self._sql().select_group
        with self._holder.connection() as conn:
            row = conn.execute(sql, (bytes_to_str(group_id),)).fetchone()
        if row is None:
            return None
        try:
            value = self._load_result(row[0])
        except Exception as exc:
            raise _corrupt_error("group", bytes_to_str(group_id), self._table_label(
                self._holder.config.names.group_table), "result", exc) from None
        return {
            "taskset_id": bytes_to_str(group_id),
            "result": None if value is None else result_from_tuple(value, self.app),
            "date_done": _read_ts(row[1]),
        }

    def _delete_group(self, group_id: str) -> None:
        sql = self._sql().delete_group
        with self._holder.connection() as conn:
            conn.execute(sql, (bytes_to_str(group_id),))

    # ------------------------------------------------------------------ cleanup

    def cleanup(self) -> None:
        """Delete expired results (batched; recorded in the cleanup-run table)."""
        expires = self.expires
        seconds = None if expires is None else int(
            expires.total_seconds() if isinstance(expires, timedelta) else expires)
        report = cleanup_mod.run_cleanup(
            self._holder.engine(), self._holder.config.names, expires=seconds,
            pending_horizon=self.pending_horizon,
        )
        if report.error:
            raise RuntimeError(f"result store cleanup failed: {report.error}")

    # ------------------------------------------------------------------ chords

    def apply_chord(self, header_result_args: Any, body: Any, **kwargs: Any) -> None:
        self.ensure_chords_allowed()
        group_id = header_result_args[0]
        results = header_result_args[1]
        complex_header = False
        if not isinstance(results, _regen):
            header = self.app.GroupResult(*header_result_args)
            complex_header = any(isinstance(r, GroupResult) for r in header.results)
            if complex_header:
                # nested groups: the callback joins the saved GroupResult to keep
                # the structure (flattened part results would lose it)
                self.save_group(group_id, header)

        def reset() -> None:
            sql = self._sql()
            with self._holder.connection() as conn:
                with self._txn(conn):
                    conn.execute(sql.delete_chord_parts, (group_id,))
                    conn.execute(sql.reset_chord,
                                 (group_id, complex_header, self._ts(self._now())))
        self._ensure_retryable(reset)

    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        def op() -> None:
            sql = self._sql()
            with self._holder.connection() as conn:
                conn.execute(sql.set_chord_size,
                             (group_id, int(chord_size), self._ts(self._now())))
        self._ensure_retryable(op)

    def add_to_chord(self, group_id: str, result: Any) -> None:
        def op() -> None:
            with self._holder.connection() as conn:
                conn.execute(self._sql().add_to_chord, (group_id,))
        self._ensure_retryable(op)

    def _txn(self, conn: Any) -> Any:
        if self._is_sqlite:
            return _SqliteTxn(conn)
        return conn.transaction()

    def _record_part(self, gid: str, part: str, idx: int | None, tid: str, state: str,
                     payload: bytes) -> tuple[bool, bool]:
        """Record one header part; return (chord row exists, this call claimed the callback)."""
        sql = self._sql()
        now = self._ts(self._now())
        token = secrets.token_hex(16)
        with self._holder.connection() as conn:
            if sql.dialect == "postgresql":
                row = conn.execute(sql.chord_part_return, {
                    "gid": gid, "part": part, "idx": idx, "tid": tid, "status": state,
                    "result": payload, "now": now, "token": token,
                }).fetchone()
                if row is None:
                    return False, False
                return True, bool(row[4])
            with _SqliteTxn(conn):
                cur = conn.execute(sql.insert_part, (gid, part, idx, tid, state, payload, now))
                if cur.rowcount:
                    conn.execute(sql.bump_chord, (cur.rowcount, gid))
                if conn.execute(sql.select_chord, (gid,)).fetchone() is None:
                    return False, False
                claimed = conn.execute(sql.claim_chord, (now, token, gid)).rowcount == 1
                return True, claimed

    def on_chord_part_return(self, request: Any, state: str, result: Any,
                             **kwargs: Any) -> None:
        gid, tid = request.group, request.id
        if not gid or not tid:
            return
        idx = getattr(request, "group_index", None)
        part = f"{tid}:{'' if idx is None else idx}"
        payload = ensure_bytes(self.encode([tid, state, self.encode_result(result, state)]))
        exists, claimed = self._ensure_retryable(
            self._record_part, gid, part, idx, tid, state, payload)
        if not exists:
            logger.debug("chord %s: no counter row (expired or not a chord), part ignored", gid)
            return
        if claimed:
            self._fire_chord(request, gid)

    def _fire_chord(self, request: Any, gid: str) -> None:
        app = self.app
        callback = maybe_signature(request.chord, app=app)
        try:
            values = self._chord_results(gid)
        except ChordError as exc:
            logger.error("Chord %r raised: %r", gid, exc)
            self.chord_error_from_stack(callback, exc)
            return
        except Exception as exc:
            logger.exception("Chord %r raised: %r", gid, exc)
            self.chord_error_from_stack(callback, _create_chord_error_with_cause(
                message=f"Join error: {exc!r}", original_exc=exc))
            return
        try:
            app.amqp._retry_publish(callback.delay, values)
        except Exception as exc:
            logger.exception("Chord callback for %r raised: %r", gid, exc)
            self.chord_error_from_stack(callback, _create_chord_error_with_cause(
                message=f"Callback error: {exc!r}", original_exc=exc))
        finally:
            try:
                with self._holder.connection() as conn:
                    conn.execute(self._sql().delete_chord_parts, (gid,))
            except Exception:  # parts expire with the chord row anyway
                logger.warning("could not delete parts of chord %s", gid, exc_info=True)

    def _chord_results(self, gid: str) -> list[Any]:
        sql = self._sql()

        def read() -> tuple[Any, list[Any]]:
            with self._holder.connection() as conn:
                info = conn.execute(sql.select_chord, (gid,)).fetchone()
                rows = conn.execute(sql.select_parts, (gid,)).fetchall()
            return info, rows
        info, rows = self._ensure_retryable(read)
        if info is not None and info[3]:
            header = GroupResult.restore(gid, backend=self)
            if header is not None:
                header.on_ready()
                join = header.join_native if header.supports_native_join else header.join
                with allow_join_result():
                    return list(join(timeout=self.app.conf.result_chord_join_timeout,
                                     propagate=True))
        values = []
        for task_id, status, payload in rows:
            _, _, value = self.decode(bytes(payload))[:3]
            if status in states.EXCEPTION_STATES:
                value = self.exception_to_python(value)
            if status in states.PROPAGATE_STATES:
                raise _create_chord_error_with_cause(
                    message=f"Dependency {task_id} raised {value!r}", original_exc=value)
            values.append(value)
        return values

    # ------------------------------------------------------------------ key-value API

    def _split_key(self, key: str | bytes) -> tuple[str, str]:
        text = bytes_to_str(key)
        if text.startswith(self.task_keyprefix):
            return "task", text[len(self.task_keyprefix):]
        if text.startswith(self.group_keyprefix):
            return "group", text[len(self.group_keyprefix):]
        raise KeyError(f"not a Celery task or group key: {text!r}")

    def get_key_for_task(self, task_id: str, key: str = "") -> str:
        return f"{self.task_keyprefix}{task_id}{key}"

    def get_key_for_group(self, group_id: str, key: str = "") -> str:
        return f"{self.group_keyprefix}{group_id}{key}"

    def _kv_task_value(self, task_id: str, row: Any) -> Any:
        return self.encode(self._raw_meta(task_id, row))

    def get(self, key: str | bytes) -> Any:
        """The encoded meta stored under a Celery key (as a key-value backend returns it)."""
        kind, ident = self._split_key(key)
        if kind == "task":
            row = self._ensure_retryable(self._fetch_row, ident)
            return None if row is None else self._kv_task_value(ident, row)
        meta = self._ensure_retryable(self._restore_group, ident)
        if meta is None:
            return None
        result = meta["result"]
        return self.encode({"result": result.as_tuple() if result is not None else None})

    def mget(self, keys: Iterable[str | bytes]) -> list[Any]:
        """Values for many keys (None where missing); task keys are read in one query."""
        keys = list(keys)
        split = [self._split_key(k) for k in keys]
        task_ids = [ident for kind, ident in split if kind == "task"]
        rows: dict[str, Any] = {}
        if task_ids:
            rows = {r[0]: r[1:] for r in self._ensure_retryable(self._fetch_metas, task_ids)}
        out = []
        for kind, ident in split:
            if kind == "task":
                row = rows.get(ident)
                out.append(None if row is None else self._kv_task_value(ident, row))
            else:
                out.append(self.get(self.get_key_for_group(ident)))
        return out

    def set(self, key: str | bytes, value: Any) -> None:
        """Store an encoded meta under a Celery key (the same rows Celery's API uses)."""
        kind, ident = self._split_key(key)
        meta = self.decode(value)
        if kind == "group":
            result = meta.get("result") if isinstance(meta, dict) else meta
            group = result_from_tuple(result, self.app) if result is not None else None
            self.save_group(ident, group)
            return
        if not isinstance(meta, dict) or "status" not in meta:
            raise ValueError("a task value must be an encoded meta dict with a 'status'")
        state = meta["status"]
        date_done = meta.get("date_done")
        if isinstance(date_done, str):
            date_done = _read_ts(date_done)
        children = meta.get("children")
        params = (
            ident, state, self._dump_result(meta.get("result")), self._ts(date_done),
            meta.get("traceback"), ensure_bytes(self.encode(children)) if children else None,
            meta.get("name"),
            ensure_bytes(self.encode(meta["args"])) if meta.get("args") is not None else None,
            ensure_bytes(self.encode(meta["kwargs"])) if meta.get("kwargs") is not None
            else None,
            meta.get("worker"), meta.get("retries"), meta.get("queue"), None,
            self._ts(self._now()), meta.get("group_id") or None, meta.get("parent_id") or None,
        )

        self._ensure_retryable(self._upsert_task, params)

    def delete(self, key: str | bytes) -> None:
        """Delete the row behind a Celery key."""
        kind, ident = self._split_key(key)
        if kind == "task":
            self.forget(ident)
        else:
            self.delete_group(ident)

    # ------------------------------------------------------------------ pickling

    def __reduce__(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
                   ) -> Any:
        kwargs = {} if not kwargs else kwargs
        kwargs.update({"url": self.url, "expires": self.expires,
                       "engine_options": self.engine_options})
        return super().__reduce__(args, kwargs)


def _in_prefork_child(**_: Any) -> None:
    """Celery sends worker_process_init in each prefork pool child (only there): from now
    on this process's engines use engine_options.json's ``prefork_child`` pool sizes."""
    enter_prefork_child()


worker_process_init.connect(_in_prefork_child, weak=False)


#: parameters of a store into a version-1 table (the id columns are the last ones)
_VERSION_1_PARAMS = len(TASK_COLUMNS) - len(ID_COLUMNS)
assert TASK_COLUMNS[_VERSION_1_PARAMS:] == ID_COLUMNS
#: (host, port, database, task table) already warned about: once per process
_VERSION_1_WARNED: set[tuple[Any, ...]] = set()


def _lacks_id_columns(exc: BaseException) -> bool:
    """Whether ``exc`` is a statement naming ``group_id``/``parent_id`` on a store still at
    schema version 1 (PostgreSQL undefined_column; SQLite "no such column" / "has no
    column named")."""
    orig: BaseException = getattr(exc, "orig", None) or exc
    text = str(orig)
    if not any(column in text for column in ID_COLUMNS):
        return False
    if getattr(orig, "sqlstate", None) == "42703":
        return True
    return isinstance(orig, sqlite3.OperationalError) and "column" in text


class _SqliteTxn:
    """BEGIN IMMEDIATE .. COMMIT on an autocommit sqlite3 connection (one writer at a time)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def __enter__(self) -> _SqliteTxn:
        self.conn.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")
