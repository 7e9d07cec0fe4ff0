"""The connection budget (issue 17): spec.connections.limit as the roles' CONNECTION LIMIT,
status.connections and the ConnectionBudget condition, its Events and gauges.

The decision (builders.connections) on plain data; the SQL as rendered text; the spec's
limits; the metrics from a status; and the Controller through the in-memory fakes
(fake_kube.py, fake_database.py): the limit on both roles of a rotation, reapplied when the
spec changes, and the condition crossing NearLimit and Exhausted with one Event each.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from psycopg import sql

from resultstore_operator.builders import connections as cb
from resultstore_operator.builders import reasons as r
from resultstore_operator.builders import sql as q
from resultstore_operator.metrics import OperatorMetrics, snapshot_of
from resultstore_operator.spec import ANNOTATION_ROTATE, SpecError, parse_spec
from tests.unit.test_controller import World, _spec, world  # noqa: F401 - the fixture

NOW = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)


def usage(in_use: int, *, active: int = 0, server_max: int = 100, reserved: int = 3,
          others: int = 1) -> cb.ConnectionUsage:
    return cb.ConnectionUsage(in_use, active, in_use - active, server_max, reserved,
                              in_use + others)


# --- the decision ----------------------------------------------------------------------------


@pytest.mark.parametrize(("in_use", "limit", "reason"), [
    (0, 6, r.WITHIN_LIMIT),
    (4, 6, r.WITHIN_LIMIT),       # 66 %
    (5, 6, r.NEAR_LIMIT),         # 83 %
    (8, 10, r.NEAR_LIMIT),        # exactly 80 %
    (6, 6, r.EXHAUSTED),
    (9, 6, r.EXHAUSTED),          # a rotation pair holds up to twice the per-role limit
    (1, 1, r.EXHAUSTED),
])
def test_reason_against_the_limit(in_use: int, limit: int, reason: str) -> None:
    decision = cb.budget(usage(in_use), limit, None, NOW)
    assert decision.condition[:2] == (reason == r.WITHIN_LIMIT, reason)
    assert decision.status["limit"] == limit and decision.status["inUse"] == in_use
    assert decision.status["summary"] == f"{in_use}/{limit}"
    assert f"the limit of {limit}" in decision.condition[2]


@pytest.mark.parametrize(("in_use", "server_max", "others", "reason", "available"), [
    (10, 100, 1, r.WITHIN_LIMIT, 86),     # 10 of 96 (100 - 3 reserved - 1 other)
    (10, 20, 1, r.WITHIN_LIMIT, 6),       # 10 of 16: 62 %
    (13, 20, 1, r.NEAR_LIMIT, 3),         # 13 of 16: 81 %
    (16, 20, 1, r.EXHAUSTED, 0),          # nothing left for anyone
    (0, 10, 7, r.EXHAUSTED, 0),           # the server is full of others' sessions
])
def test_without_a_limit_what_the_server_has_left(in_use: int, server_max: int, others: int,
                                                  reason: str, available: int) -> None:
    reading = usage(in_use, server_max=server_max, others=others)
    decision = cb.budget(reading, None, None, NOW)
    assert reading.server_available == available
    assert decision.condition[1] == reason
    assert decision.status["limit"] is None and decision.status["summary"] == f"{in_use}/-"
    assert decision.status["serverMax"] == server_max
    assert decision.status["serverAvailable"] == available
    assert "what the server has left" in decision.condition[2]


def test_a_limit_the_server_cannot_give_is_bounded_by_the_server() -> None:
    reading = usage(4, server_max=9, others=1)  # 9 - 3 reserved - 5 in use: 1 free
    decision = cb.budget(reading, 50, None, NOW)
    assert cb.capacity(reading, 50)[0] == 5
    assert decision.condition[1] == r.NEAR_LIMIT and "server has left" in decision.condition[2]
    assert decision.status["limit"] == 50 and decision.status["summary"] == "4/50"


def test_status_numbers_and_time() -> None:
    decision = cb.budget(usage(5, active=2), 6, None, NOW)
    assert decision.status == {"inUse": 5, "active": 2, "idle": 3, "limit": 6,
                               "serverMax": 100, "serverAvailable": 91, "summary": "5/6",
                               "observedAt": "2026-05-06T07:08:09Z"}
    assert decision.condition[2].startswith("5 connections in use (2 active, 3 idle)")


@pytest.mark.parametrize(("previous", "now", "event"), [
    (None, r.WITHIN_LIMIT, None),
    (None, r.NEAR_LIMIT, "Warning"),
    (None, r.EXHAUSTED, "Warning"),
    (r.WITHIN_LIMIT, r.NEAR_LIMIT, "Warning"),
    (r.NEAR_LIMIT, r.EXHAUSTED, "Warning"),
    (r.NEAR_LIMIT, r.NEAR_LIMIT, None),          # not every tick
    (r.EXHAUSTED, r.EXHAUSTED, None),
    (r.EXHAUSTED, r.NEAR_LIMIT, None),           # easing is not a new warning
    (r.EXHAUSTED, r.WITHIN_LIMIT, "Normal"),
    (r.NEAR_LIMIT, r.WITHIN_LIMIT, "Normal"),
    (r.WITHIN_LIMIT, r.WITHIN_LIMIT, None),
    (r.CONNECTIONS_UNOBSERVED, r.WITHIN_LIMIT, None),
])
def test_event_only_when_crossing(previous: str | None, now: str, event: str | None) -> None:
    found = cb.budget_event(previous, now, "msg")
    assert (found[0] if found else None) == event
    if found:
        assert found[1] == now


# --- SQL and spec ---------------------------------------------------------------------------


def render(statement: sql.Composable) -> str:
    return statement.as_string(None)


def test_connection_limit_sql() -> None:
    assert render(q.set_connection_limit('rs_"x', 6)) == \
        'ALTER ROLE "rs_""x" WITH CONNECTION LIMIT 6'
    assert render(q.set_connection_limit("rs_x", -1)) == \
        'ALTER ROLE "rs_x" WITH CONNECTION LIMIT -1'
    assert " CONNECTION LIMIT 6 PASSWORD " in render(q.create_role("rs_x", "v", 6))
    assert " CONNECTION LIMIT -1 PASSWORD " in render(q.create_role("rs_x", "v"))


@pytest.mark.parametrize("bad", [0, -2, 10_001, "6", "6; DROP ROLE x", True, 1.5])
def test_connection_limit_sql_refuses_anything_but_a_checked_integer(bad: Any) -> None:
    with pytest.raises(ValueError, match="connection limit"):
        q.set_connection_limit("rs_x", bad)


@pytest.mark.parametrize(("raw", "limit", "role_limit"), [
    (None, None, -1), ({}, None, -1), ({"limit": None}, None, -1),
    ({"limit": 1}, 1, 1), ({"limit": 6}, 6, 6), ({"limit": 10_000}, 10_000, 10_000),
])
def test_spec_connections(raw: Any, limit: int | None, role_limit: int) -> None:
    spec = parse_spec(_spec() if raw is None else _spec(connections=raw))
    assert spec.connections.limit == limit and spec.connections.role_limit == role_limit


@pytest.mark.parametrize(("raw", "message"), [
    ({"limit": 0}, "between 1 and 10000"), ({"limit": -1}, "between 1 and 10000"),
    ({"limit": 10_001}, "between 1 and 10000"), ({"limit": "6"}, "expected an integer"),
    ({"limit": True}, "expected an integer"), ("six", "expected an object"),
])
def test_spec_connections_invalid(raw: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message) as err:
        parse_spec(_spec(connections=raw))
    assert "spec.connections" in str(err.value)


# --- metrics ---------------------------------------------------------------------------------


def test_gauges_from_the_status() -> None:
    body = {"metadata": {"namespace": "team", "name": "orders"},
            "status": {"connections": {"inUse": 5, "limit": 6}}}
    unlimited = {"metadata": {"namespace": "team", "name": "free"},
                 "status": {"connections": {"inUse": 2}}}
    snap = snapshot_of(body)
    assert (snap.connections_in_use, snap.connection_limit) == (5, 6)
    metrics = OperatorMetrics()
    metrics.stores.observe(snap)
    metrics.stores.observe(snapshot_of(unlimited))
    reg = metrics.registry
    labels = {"namespace": "team", "resultstore": "orders"}
    assert reg.get_sample_value("resultstore_connections_in_use", labels) == 5
    assert reg.get_sample_value("resultstore_connection_limit", labels) == 6
    free = {"namespace": "team", "resultstore": "free"}
    assert reg.get_sample_value("resultstore_connections_in_use", free) == 2
    assert reg.get_sample_value("resultstore_connection_limit", free) is None


# --- the Controller through the fakes -----------------------------------------------------------


def test_limit_on_both_roles_of_a_rotation_and_reapplied(world: World) -> None:  # noqa: F811
    world.store["spec"] = _spec(connections={"limit": 6})
    world.reconcile()
    first, second = world.roles
    assert world.db.roles[first].limit == 6
    assert f"CREATE ROLE {first} CONNECTION LIMIT 6" in world.db.writes
    world.settle()
    world.reconcile("resume")
    assert world.db.writes == [], "an unchanged limit was altered again"
    # the rotation's next role gets the same limit from its CREATE ROLE on
    world.store["metadata"]["annotations"] = {ANNOTATION_ROTATE: "now"}
    world.db.sessions[first] = 1
    world.reconcile("rotate")
    assert world.db.roles[second].limit == 6
    assert f"CREATE ROLE {second} CONNECTION LIMIT 6" in world.db.writes
    # a changed spec is reapplied; a removed limit is -1 (none) again
    world.store["spec"] = _spec(connections={"limit": 9})
    world.settle()
    world.reconcile("spec")
    assert world.db.roles[second].limit == 9
    assert world.db.writes == [f"ALTER ROLE {second} CONNECTION LIMIT 9"]
    world.store["spec"] = _spec()
    world.settle()
    world.reconcile("spec")
    assert world.db.roles[second].limit == -1
    assert world.status["connections"].get("limit") is None


def test_budget_in_status_condition_and_events(world: World) -> None:  # noqa: F811
    world.store["spec"] = _spec(connections={"limit": 6})
    world.reconcile()
    first = world.roles[0]
    assert world.condition(r.CONNECTION_BUDGET)["reason"] == r.WITHIN_LIMIT
    assert world.status["connections"]["summary"] == "0/6"
    assert r.NEAR_LIMIT not in world.kube.reasons()
    # five sessions of the role: NearLimit, one Warning
    world.db.sessions[first], world.db.active[first] = 5, 2
    world.settle()
    world.reconcile("resume")
    budget = world.condition(r.CONNECTION_BUDGET)
    assert (budget["status"], budget["reason"]) == ("False", r.NEAR_LIMIT)
    connections = world.status["connections"]
    assert (connections["inUse"], connections["active"], connections["idle"],
            connections["limit"], connections["serverMax"]) == (5, 2, 3, 6, 100)
    assert connections["serverAvailable"] == 100 - 3 - 5 - 1
    assert [(e.type, e.reason) for e in world.kube.events] == [("Warning", r.NEAR_LIMIT)]
    # the same reading again (the next tick): no new Event
    world.settle()
    world.reconcile("resume")
    assert world.kube.events == []
    # at the limit: Exhausted, one Warning; the store itself stays Ready
    world.db.sessions[first] = 6
    world.settle()
    world.reconcile("resume")
    assert world.condition(r.CONNECTION_BUDGET)["reason"] == r.EXHAUSTED
    assert [(e.type, e.reason) for e in world.kube.events] == [("Warning", r.EXHAUSTED)]
    assert world.condition(r.READY)["status"] == "True"
    assert world.status["connections"]["summary"] == "6/6"
    # back down: a Normal event, condition True again
    world.db.sessions[first] = 1
    world.settle()
    world.reconcile("resume")
    assert world.condition(r.CONNECTION_BUDGET)["status"] == "True"
    assert [(e.type, e.reason) for e in world.kube.events] == [("Normal", r.WITHIN_LIMIT)]


# --- the worker's side: a refused connection at the limit --------------------------------


def test_a_connection_refused_at_the_limit_is_transient_and_says_which_limit() -> None:
    import psycopg

    from resultstore_backend.config import parse_backend_url
    from resultstore_backend.engine import classify_connect_error, is_transient_error

    config = parse_backend_url("resultstore+postgresql+psycopg://rs_a:pw@db:5432/app?schema=s")
    refused = psycopg.OperationalError(
        'connection failed: connection to server at "10.0.0.5", port 5432 failed: FATAL:  '
        'too many connections for role "rs_a"')
    err = classify_connect_error(refused, config)  # type: ignore[arg-type]
    assert is_transient_error(err) and err.key == "username"
    assert 'too many connections for role "rs_a"' in str(err)
    assert "spec.connections.limit" in str(err) and "retried" in str(err)
    assert ":pw@" not in str(err)


# --- spec.database.pooler -> the Secret ---------------------------------------------------


def _pooler_spec(**pooler: Any) -> dict[str, Any]:
    spec = _spec()
    spec["database"] = dict(spec["database"], pooler=pooler)
    return spec


@pytest.mark.parametrize(("pooler", "port", "mode", "prepared"), [
    ({"host": "orders-pooler-rw.team.svc"}, "5432", "transaction", "false"),
    ({"host": "10.0.0.7", "port": 6432, "mode": "session"}, "6432", "session", "false"),
    ({"host": "fd00::7", "port": 6432, "preparedStatements": True}, "6432", "transaction",
     "true"),
])
def test_pooler_keys_beside_the_direct_ones(pooler: dict[str, Any], port: str, mode: str,
                                            prepared: str) -> None:
    from resultstore_operator.builders.secret import secret_values

    values = secret_values(parse_spec(_pooler_spec(**pooler)), "rs_a", "pw/x")
    host = pooler["host"]
    assert (values["pooler-host"], values["pooler-port"]) == (host, port)
    assert (values["pooler-mode"], values["pooler-prepared-statements"]) == (mode, prepared)
    shown = f"[{host}]" if ":" in host else host
    assert f"@{shown}:{port}/app?" in values["pooled-uri"]
    assert "options=" not in values["pooled-uri"]
    # the direct keys, the stock result_backend included, still name the server
    assert values["host"] == "db.example" and "@db.example:5432/" in values["uri"]
    assert "@db.example:5432/" in values["result_backend"]


def test_without_a_pooler_no_pooler_keys_and_prefork_child_pools() -> None:
    import json

    from resultstore_operator.builders.secret import secret_values

    values = secret_values(parse_spec(_spec(engine={"poolSize": 8})), "rs_a", "pw")
    assert not [k for k in values if k.startswith("pool")]
    options = json.loads(values["engine_options.json"])
    assert options["pool_size"] == 8
    assert options["prefork_child"] == {"pool_size": 1, "max_overflow": 0}


@pytest.mark.parametrize(("pooler", "message"), [
    ({}, "spec.database.pooler.host is required"),
    ({"host": "a,b"}, "spec.database.pooler.host must be a DNS name"),
    ({"host": "bouncer", "port": 0}, "spec.database.pooler.port must be between"),
    ({"host": "bouncer", "mode": "statement"}, "spec.database.pooler.mode must be one of"),
    ({"host": "bouncer", "preparedStatements": "yes"}, "expected true or false"),
])
def test_pooler_spec_invalid(pooler: dict[str, Any], message: str) -> None:
    raw = _pooler_spec(**pooler)
    if not pooler:
        raw["database"]["pooler"] = {"port": 6432}
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


@pytest.mark.parametrize(("text", "kept"), [
    ('FATAL:  too many connections for role "rs_a"', True),
    ("FATAL:  sorry, too many clients already", True),
    ("connection refused", False),
])
def test_a_refusal_at_the_limit_keeps_the_open_connections(
        monkeypatch: pytest.MonkeyPatch, text: str, kept: bool) -> None:
    """Dropping them would give the process a new pool while the old connections are still
    in use: more than pool_size + max_overflow, at the limit of every other process."""
    import psycopg

    from resultstore_backend.config import parse_backend_url
    from resultstore_backend.engine import EngineHolder, StoreConnectionError

    holder = EngineHolder(parse_backend_url(
        "resultstore+postgresql+psycopg://rs_a:pw@127.0.0.1:1/app?schema=s"), create_tables=False)
    slot = holder._current_slot()
    disposed: list[bool] = []
    monkeypatch.setattr(slot.engine, "dispose", lambda *a, **k: disposed.append(True))

    def refuse() -> Any:
        raise psycopg.OperationalError(f"connection failed: {text}")

    monkeypatch.setattr(slot.engine, "raw_connection", refuse)
    slot.waiting += 1
    with pytest.raises(StoreConnectionError):
        holder._checkout(slot)
    assert disposed == ([] if kept else [True])
