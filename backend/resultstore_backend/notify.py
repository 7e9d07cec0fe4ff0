"""Channels and payloads of the store's state-change notifications (pure, no I/O).

A store that notifies sends, in the same statement that stores a task state,
``pg_notify(channel, payload)`` (see sql.py). Waiters LISTEN only to the
channels of the ids they wait for:

- **channel** = ``rs_<store>_<shard>``: ``<store>`` is a hash of the qualified
  task table, so two stores in one database never share channels; ``<shard>`` is
  ``crc32(task_id) % SHARDS``, so a client waiting for one task of a busy store
  receives about 1/SHARDS of its traffic instead of all of it. Channel names are
  lowercase ``[a-z0-9_]`` and well under PostgreSQL's 63-byte identifier limit.
- **payload** = ``rs1|<status>|<task_id>``: a version tag, so anything else sent
  on the channel (another client's NOTIFY) is recognised and ignored.

- **presence**: PostgreSQL serialises the commits of all transactions that NOTIFY
  (a global lock held through commit), so a store only notifies when some session
  listens to the task's shard. A listening session holds the *shared* advisory lock
  ``(lock_key(store), shard)`` for as long as it LISTENs there; the store's statement
  tries the *exclusive* transaction-level lock on the same key and notifies only when
  that fails. When it succeeds (nobody listens) the waiter that comes later blocks on
  its shared lock until the store has committed, and its first read (after LISTEN)
  sees the row: skipping the notification can never lose a result. Two stores of one
  shard at the same time: the second's try fails and it notifies (harmless).

A notification is only a hint that a row changed: the waiter always reads the
row itself, so a forged or duplicated payload can cost a read but can never
deliver a wrong result.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable

from .schema import TableNames

__all__ = [
    "PAYLOAD_TAG",
    "SHARDS",
    "channel_for",
    "channel_prefix",
    "format_payload",
    "listen_sql",
    "lock_key",
    "shard_of_channel",
    "parse_payload",
    "shard_of",
]

#: version tag of our payloads; a future format gets a new tag
PAYLOAD_TAG = "rs1"
#: number of channels per store (a power of two keeps crc32 % SHARDS uniform)
SHARDS = 256
_SEP = "|"


def channel_prefix(names: TableNames) -> str:
    """The per-store part of the channel names (derived from the qualified task table)."""
    digest = hashlib.sha1(names.qualified(names.task_table).encode("utf-8")).hexdigest()
    return f"rs_{digest[:12]}"


def lock_key(names: TableNames) -> int:
    """The first key (a signed int4) of the store's presence advisory locks."""
    digest = hashlib.sha1(
        ("resultstore-notify:" + names.qualified(names.task_table)).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big", signed=True)


def shard_of_channel(channel: str) -> int:
    """The shard number a channel name of ours ends with."""
    return int(channel.rsplit("_", 1)[1], 16)


def shard_of(task_id: str, shards: int = SHARDS) -> int:
    """The shard of ``task_id``: stable across processes, Python versions and hosts."""
    return zlib.crc32(task_id.encode("utf-8")) % shards


def channel_for(prefix: str, task_id: str, shards: int = SHARDS) -> str:
    """The channel a store of ``prefix`` notifies on when ``task_id`` changes."""
    return f"{prefix}_{shard_of(task_id, shards):02x}"


def format_payload(task_id: str, status: str) -> str:
    """The payload the notifying upsert builds in SQL (here for tests and documentation)."""
    return f"{PAYLOAD_TAG}{_SEP}{status}{_SEP}{task_id}"


def parse_payload(payload: str) -> tuple[str, str] | None:
    """``(task_id, status)`` of one of our payloads; None for anything else."""
    parts = payload.split(_SEP, 2)
    if len(parts) != 3 or parts[0] != PAYLOAD_TAG or not parts[1] or not parts[2]:
        return None
    status, task_id = parts[1], parts[2]
    if not status.isupper() or not status.replace("_", "").isalnum():
        return None
    return task_id, status


def _quote_channel(channel: str) -> str:
    if not channel or not all(c.islower() or c.isdigit() or c == "_" for c in channel) \
            or len(channel) > 63:
        raise ValueError(f"not a result-store channel name: {channel!r}")
    return f'"{channel}"'


def listen_sql(listen: Iterable[str], unlisten: Iterable[str], key: int | None = None) -> str:
    """One simple-query string that applies a change of the listened channel set.

    Several statements in one string are one round trip on the LISTEN connection.
    Channel names are checked to be ours before they are quoted into the SQL. With
    ``key`` (see :func:`lock_key`) each LISTEN is preceded by taking the shard's shared
    presence lock and each UNLISTEN followed by releasing it.
    """
    stmts: list[str] = []
    for c in sorted(set(unlisten)):
        stmts.append(f"UNLISTEN {_quote_channel(c)}")
        if key is not None:
            stmts.append(f"SELECT pg_advisory_unlock_shared({int(key)}, "
                         f"{shard_of_channel(c)})")
    for c in sorted(set(listen)):
        if key is not None:
            stmts.append(f"SELECT pg_advisory_lock_shared({int(key)}, {shard_of_channel(c)})")
        stmts.append(f"LISTEN {_quote_channel(c)}")
    return "; ".join(stmts)
