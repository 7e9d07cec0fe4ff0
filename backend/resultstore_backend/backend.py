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
"""

from __future__ import annotations

import io
import logging
import pickle
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, date, datetime, timedelta, timezone
from datetime import time as dtime
from decimal import Decimal
from typing import Any
from uuid import UUID

from celery import maybe_signature, states
from celery.backends.base import BaseBackend, _create_chord_error_with_cause
from celery.exceptions import ChordError, ImproperlyConfigured
from celery.result import GroupResult, allow_join_result, result_from_tuple
from celery.utils.functional import _regen
from celery.utils.time import maybe_timedelta
from kombu.exceptions import EncodeError
from kombu.utils.encoding import bytes_to_str, ensure_bytes

from . import cleanup as cleanup_mod
from .config import ConfigError, DirectorySource, StoreConfig, parse_backend_url
from .engine import (
    DEFAULT_IDLE_PING_AFTER,
    DEFAULT_RELOAD_INTERVAL,
    EngineHolder,
    get_holder,
    is_connection_error,
    is_transient_error,
)
from .schema import TableNames
from .sql import Statements, statements

__all__ = ["ResultStoreBackend"]

logger = logging.getLogger(__name__)

PICKLE_CONTENT_TYPE = "application/x-python-serialize"
PICKLE_PROTOCOL = 4
_SQLITE_TS = "%Y-%m-%d %H:%M:%S.%f"

READY_STATES = frozenset(states.READY_STATES)

# ----------------------------------------------------------------------------- pickles

_SAFE_TYPES: frozenset[type] = frozenset({
    set, frozenset, complex, bytearray, datetime, date, dtime, timedelta, timezone, UUID,
    Decimal, OrderedDict,
})
_SAFE_GLOBALS = frozenset({
    ("builtins", n) for n in (
        "set", "frozenset", "complex", "bytearray", "int", "float", "str", "bytes", "dict",
        "list", "tuple", "bool")
} | {
    ("datetime", n) for n in ("datetime", "date", "time", "timedelta", "timezone")
} | {("uuid", "UUID"), ("uuid", "SafeUUID"), ("decimal", "Decimal"),
     ("collections", "OrderedDict")})


class _JsonSafePickler(pickle.Pickler):
    """Pickles only what a JSON result could hold (plus the types kombu's JSON adds).

    Subclasses of builtin containers/scalars (IntEnum, namedtuple, defaultdict)
    are stored as their base type, as JSON would; anything else is refused with
    the EncodeError Celery expects from a serializer.
    """

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        if cls in _SAFE_TYPES:
            return NotImplemented
        if isinstance(obj, type):
            # classes referenced by the reductions above (set, int, dict, UUID, ...)
            if (obj.__module__, obj.__qualname__) in _SAFE_GLOBALS:
                return NotImplemented
            raise EncodeError(f"cannot store the class {obj.__module__}.{obj.__qualname__} "
                              "with the json result_serializer")
        if isinstance(obj, bool):
            return bool, (bool(obj),)
        if isinstance(obj, int):
            return int, (int(obj),)
        if isinstance(obj, float):
            return float, (float(obj),)
        if isinstance(obj, str):
            return str, (str(obj),)
        if isinstance(obj, bytes):
            return bytes, (bytes(obj),)
        if isinstance(obj, tuple):
            return tuple, (tuple(obj),)
        if isinstance(obj, list):
            return list, (), None, iter(obj)
        if isinstance(obj, dict):
            return dict, (), None, None, iter(obj.items())
        if isinstance(obj, UUID):
            return UUID, (str(obj),)
        raise EncodeError(
            f"result of type {cls.__module__}.{cls.__qualname__} cannot be stored with "
            "the json result_serializer (accept pickle content to store arbitrary objects)"
        )


class _JsonSafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: the app does not accept pickle content"
        )


def _is_pickle(payload: bytes) -> bool:
    # protocol 2+ pickles start with PROTO <n>; msgpack maps start with 0x80..0x8f too,
    # but never with 0x80 followed by a small protocol number as a whole payload.
    return len(payload) > 2 and payload[0] == 0x80 and 2 <= payload[1] <= 5


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


class ResultStoreBackend(BaseBackend):
    """Celery result backend on PostgreSQL (and SQLite) with stock-compatible tables."""

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
        # Like the stock backend, retry by default; but with a budget that
        # outlasts a PostgreSQL restart (~10 s), not three quick attempts.
        if not conf.value_set_for("result_backend_always_retry") or getattr(
                self, "always_retry", None) is None:
            self.always_retry = True
        if not conf.value_set_for("result_backend_max_retries") or getattr(
                self, "max_retries", None) is None:
            self.max_retries: float = 15
        if not conf.value_set_for("result_backend_base_sleep_between_retries_ms"):
            self.base_sleep_between_retries_ms = 50
        if not conf.value_set_for("result_backend_max_sleep_between_retries_ms"):
            self.max_sleep_between_retries_ms = 2000

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
            source = StoreConfig(url=source.url, names=source.names, engine_options=options,
                                 extended=source.extended, expires=source.expires)
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
        return StoreConfig(url=source.url, names=names, engine_options=source.engine_options)

    # ------------------------------------------------------------------ plumbing

    @property
    def holder(self) -> EngineHolder:
        return self._holder

    @property
    def extended_result(self) -> bool:
        return bool(self.app.conf.find_value_for_key("extended", "result"))

    def _sql(self) -> Statements:
        config = self._holder.config
        return statements("sqlite" if config.is_sqlite else "postgresql", config.names)

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
        if self._full_pickle:
            return pickle.dumps(value, protocol=PICKLE_PROTOCOL)
        buf = io.BytesIO()
        _JsonSafePickler(buf, protocol=PICKLE_PROTOCOL).dump(value)
        return buf.getvalue()

    def _load_result(self, payload: Any) -> Any:
        if payload is None:
            return None
        payload = bytes(payload)
        if _is_pickle(payload):
            if self._full_pickle:
                return pickle.loads(payload)
            return _JsonSafeUnpickler(io.BytesIO(payload)).load()
        # written by a client that stores serializer-encoded bytes (Celery >= 5.7)
        return self.decode(payload)

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
        )

    def _store_result(self, task_id: str, result: Any, state: str, traceback: Any = None,
                      request: Any = None, **kwargs: Any) -> Any:
        params = self._task_params(task_id, result, state, traceback, request)
        sql = self._sql().upsert_task
        with self._holder.connection() as conn:
            conn.execute(sql, params)
        return result

    def _raw_meta(self, task_id: str, row: Any) -> dict[str, Any]:
        (status, result, date_done, traceback, children, name, args, kwargs, worker, retries,
         queue, stamps) = row
        meta: dict[str, Any] = {
            "task_id": task_id,
            "status": status,
            "result": self._load_result(result),
            "traceback": traceback,
            "date_done": _read_ts(date_done),
            "children": self._decode_opt(children),
        }
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
        return {"task_id": task_id, "status": states.PENDING, "result": None,
                "traceback": None, "date_done": None, "children": None}

    def _fetch_row(self, task_id: str) -> Any:
        sql = self._sql().select_task
        with self._holder.connection() as conn:
            return conn.execute(sql, (task_id,)).fetchone()

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
        sql = self._sql()
        rows: list[Any] = []
        with self._holder.connection() as conn:
            if sql.dialect == "postgresql":
                rows.extend(conn.execute(sql.select_many_ready, (ids,)).fetchall())
            else:
                for i in range(0, len(ids), 500):
                    chunk = ids[i:i + 500]
                    query = sql.select_many_ready.replace("{in}", sql.in_list(len(chunk)))
                    rows.extend(conn.execute(query, chunk).fetchall())
        return rows

    def get_many(self, task_ids: Iterable[Any], timeout: float | None = None,
                 interval: float | None = 0.5, no_ack: bool = True, on_message: Any = None,
                 on_interval: Any = None, max_iterations: int | None = None,
                 READY_STATES: frozenset[str] = READY_STATES, **kwargs: Any
                 ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(task_id, meta)`` as tasks become ready: one query per polling pass."""
        interval = 0.5 if interval is None else interval
        ids = {bytes_to_str(t) for t in task_ids}
        cache = self._cache
        for task_id in list(ids):
            cached = cache.get(task_id)
            if cached is not None and cached["status"] in READY_STATES:
                ids.discard(task_id)
                yield task_id, cached
        iterations = 0
        elapsed = 0.0
        while ids:
            rows = self._ensure_retryable(self._fetch_ready, sorted(ids))
            for row in rows:
                task_id = row[0]
                if task_id not in ids:
                    continue
                meta = self.meta_from_decoded(self._raw_meta(task_id, row[1:]))
                if meta["status"] not in READY_STATES:
                    continue
                ids.discard(task_id)
                if meta["status"] == states.SUCCESS:
                    cache[task_id] = meta
                if on_message is not None:
                    on_message(meta)
                yield task_id, meta
            if not ids:
                break
            if timeout is not None and elapsed >= timeout:
                raise self.TimeoutError(f"Operation timed out ({timeout})")
            if on_interval:
                on_interval()
            nap = interval if timeout is None else max(0.0, min(interval, timeout - elapsed))
            time.sleep(nap)
            elapsed += nap
            iterations += 1
            if max_iterations and iterations >= max_iterations:
                break

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
        value = self._load_result(row[0])
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
        meta = self._raw_meta(task_id, row)
        if meta["date_done"] is not None:
            meta["date_done"] = meta["date_done"].isoformat()
        return self.encode(meta)

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
            sql = self._sql()
            query = f"SELECT task_id, {', '.join(_META)} FROM " \
                    f"{self._holder.config.names.qualified(self._holder.config.names.task_table)}"

            def fetch() -> list[Any]:
                with self._holder.connection() as conn:
                    if sql.dialect == "postgresql":
                        return list(conn.execute(query + " WHERE task_id = ANY(%s)",
                                                 (task_ids,)).fetchall())
                    out: list[Any] = []
                    for i in range(0, len(task_ids), 500):
                        chunk = task_ids[i:i + 500]
                        out.extend(conn.execute(
                            query + f" WHERE task_id IN ({sql.in_list(len(chunk))})", chunk
                        ).fetchall())
                    return out
            rows = {r[0]: r[1:] for r in self._ensure_retryable(fetch)}
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
            self._ts(self._now()),
        )

        def op() -> None:
            with self._holder.connection() as conn:
                conn.execute(self._sql().upsert_task, params)
        self._ensure_retryable(op)

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


_META = (
    "status", "result", "date_done", "traceback", "children", "name", "args", "kwargs",
    "worker", "retries", "queue", "stamps",
)


class _SqliteTxn:
    """BEGIN IMMEDIATE .. COMMIT on an autocommit sqlite3 connection (one writer at a time)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def __enter__(self) -> _SqliteTxn:
        self.conn.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")
