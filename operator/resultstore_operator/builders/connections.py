"""The connection budget: `status.connections`, the ConnectionBudget condition and its Event.

Why a pure decision: what a store may hold is the smaller of two bounds, its roles'
CONNECTION LIMIT (spec.connections.limit, which PostgreSQL enforces per role) and what the
server has left (max_connections minus the reserved slots minus every client session, the
store's own included). The operator reads the numbers (database.Session.connection_usage)
and this module alone turns them into status, condition and Event, so the thresholds are
unit-tested on plain data and a tick that changes nothing posts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import reasons as r
from .conditions import timestamp

#: NearLimit from this share of the budget on (in percent), Exhausted at 100 %
NEAR_LIMIT_PERCENT = 80

#: severity order of the reasons: an Event is posted only on the way up
_RANK = {r.WITHIN_LIMIT: 0, r.NEAR_LIMIT: 1, r.EXHAUSTED: 2}


@dataclass(frozen=True)
class ConnectionUsage:
    """What the server said, in one admin-session query (pg_stat_activity, settings).

    `in_use` counts the sessions of the store's login roles (both roles of a rotation pair);
    `active` those running a statement, `idle` those idle or idle in a transaction (a session
    whose state the admin may not see, without pg_read_all_stats, is in neither).
    `server_in_use` counts every client session of the server.
    """

    in_use: int
    active: int
    idle: int
    server_max: int
    server_reserved: int
    server_in_use: int

    @property
    def server_available(self) -> int:
        return max(0, self.server_max - self.server_reserved - self.server_in_use)


@dataclass(frozen=True)
class Budget:
    """The decision: the status section, the condition (status, reason, message) and the
    Event (type, reason, message) to post, if any."""

    status: dict[str, Any]
    condition: tuple[bool, str, str]
    event: tuple[str, str, str] | None


def summary(in_use: int, limit: int | None) -> str:
    """The `kubectl get` column: "3/6", or "3/-" when the store sets no limit."""
    return f"{in_use}/{limit if limit is not None else '-'}"


def capacity(usage: ConnectionUsage, limit: int | None) -> tuple[int, str]:
    """(sessions the store could hold right now, what bounds it).

    With a limit, also the server: a role under its limit still cannot connect to a full
    server. Without one, the store is measured against what is left of max_connections.
    """
    server_room = usage.in_use + usage.server_available
    if limit is not None and limit <= server_room:
        return limit, f"the limit of {limit}"
    return server_room, (f"what the server has left (max_connections {usage.server_max}, "
                         f"{usage.server_available} free)")


def reason_for(in_use: int, room: int) -> str:
    if in_use >= room:
        return r.EXHAUSTED
    if in_use * 100 >= NEAR_LIMIT_PERCENT * room:
        return r.NEAR_LIMIT
    return r.WITHIN_LIMIT


def budget(usage: ConnectionUsage, limit: int | None, previous_reason: str | None,
           now: datetime) -> Budget:
    """Status, condition and Event from one reading; `previous_reason` is the condition's
    reason before it (None: first reading), so only a change upwards is announced."""
    room, bound = capacity(usage, limit)
    reason = reason_for(usage.in_use, room)
    message = (f"{usage.in_use} connections in use ({usage.active} active, {usage.idle} "
               f"idle), bounded by {bound}")
    if reason == r.EXHAUSTED:
        message += "; new worker connections are refused until others close (workers retry)"
    status: dict[str, Any] = {
        "inUse": usage.in_use,
        "active": usage.active,
        "idle": usage.idle,
        "serverMax": usage.server_max,
        "serverAvailable": usage.server_available,
        # None removes it (the status is a merge patch): a limit dropped from the spec
        "limit": limit,
        "summary": summary(usage.in_use, limit),
        "observedAt": timestamp(now),
    }
    return Budget(status, (reason == r.WITHIN_LIMIT, reason, message),
                  budget_event(previous_reason, reason, message))


def budget_event(previous_reason: str | None, reason: str,
                 message: str) -> tuple[str, str, str] | None:
    """A Warning when the budget crosses into NearLimit or Exhausted, a Normal event when it
    is back within its limit; nothing while it stays where it was (not every tick)."""
    before = _RANK.get(previous_reason or "", 0)
    after = _RANK[reason]
    if after > before:
        return "Warning", reason, message
    if after == 0 and before > 0:
        return "Normal", reason, message
    return None
