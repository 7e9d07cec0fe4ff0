"""Ownership markers and the decisions taken from them (builders.marker), plus the admin
connection's security options and host validation: plain data in, decisions out."""

from __future__ import annotations

from typing import Any

import pytest

from resultstore_operator.builders import marker as m
from resultstore_operator.database import connection_security
from resultstore_operator.spec import SpecError, parse_spec, validate_host

ME = m.Owner("team-a", "orders", "11111111-1111-1111-1111-111111111111")
OTHER = m.Owner("team-b", "orders", "22222222-2222-2222-2222-222222222222")
EARLIER = m.Owner("team-a", "orders", "33333333-3333-3333-3333-333333333333")
TABLES = ("celery_taskmeta", "celery_tasksetmeta", "resultstore_schema_version")
SEQUENCES = ("task_id_sequence",)
ROLE_A = "rs_team_a_orders_0123456789ab_a"


def mine(owner: m.Owner = ME) -> str:
    return m.marker_text(owner)


def table(name: str, comment: str | None = None) -> m.CatalogObject:
    return m.CatalogObject(m.TABLE, name, comment)


def all_ours(owner: m.Owner = ME) -> tuple[m.CatalogObject, ...]:
    return tuple(table(t, mine(owner)) for t in TABLES) + (
        m.CatalogObject(m.SEQUENCE, SEQUENCES[0], mine(owner)),)


# --- the marker itself -----------------------------------------------------------------------

@pytest.mark.parametrize("owner", [
    ME, OTHER, m.Owner("a", "b.c-d", "abcdef01-2345-6789-abcd-ef0123456789")])
def test_marker_round_trips(owner: m.Owner) -> None:
    assert m.parse_marker(m.marker_text(owner)) == owner


@pytest.mark.parametrize("comment", [
    None, "", "owned by team-a/orders", "resultstore.dev/owner=team-a/orders",
    "resultstore.dev/owner=team-a/orders uid=1 extra", "resultstore.dev/owner=Team/x uid=1",
    "prefix resultstore.dev/owner=team-a/orders uid=1",
])
def test_anything_but_a_whole_marker_is_no_marker(comment: str | None) -> None:
    assert m.parse_marker(comment) is None, f"{comment!r} must not count as a marker"


@pytest.mark.parametrize(("comment", "expected"), [
    (mine(), m.OURS),
    (mine(OTHER), m.FOREIGN),
    (mine(EARLIER), m.PREVIOUS),
    ("a DBA's note", m.MISSING),
    (None, m.MISSING),
])
def test_verdict(comment: str | None, expected: str) -> None:
    assert m.verdict(ME, comment)[0] == expected


# --- assess: provisioning --------------------------------------------------------------------

def assess(inv: m.Inventory, policy: str = m.POLICY_EXCLUSIVE,
           legacy: bool = False) -> m.Assessment:
    return m.assess(ME, inv, TABLES, SEQUENCES, policy, legacy)


def test_new_schema_is_created_and_ours() -> None:
    result = assess(m.Inventory("orders", schema_exists=False))
    assert result.conflict is None and result.create_schema and result.schema_ours
    assert result.to_mark == ()  # migrate marks the schema and what it creates


def test_our_own_store_again_needs_nothing() -> None:
    inv = m.Inventory("orders", True, mine(), all_ours(), {ROLE_A: mine()})
    result = assess(inv)
    assert result.conflict is None and result.schema_ours and not result.create_schema
    assert result.to_mark == ()


def test_second_store_on_the_same_schema_is_refused_naming_the_owner() -> None:
    inv = m.Inventory("orders", True, mine(OTHER), all_ours(OTHER))
    result = assess(inv, m.POLICY_ADOPT_EXISTING, legacy=True)
    assert result.conflict is not None, "another store's schema must never be taken"
    assert result.conflict.kind == m.CONFLICT_OWNER
    assert result.conflict.other == OTHER and "team-b/orders" in result.conflict.message
    assert not result.conflict.legacy_fixable
    assert result.to_mark == ()


def test_another_stores_table_in_an_adopted_schema_is_refused() -> None:
    inv = m.Inventory("shared", True, None,
                      (table("celery_taskmeta", mine(OTHER)), table("cards")))
    result = assess(inv, m.POLICY_ADOPT_EXISTING)
    assert result.conflict is not None and result.conflict.other == OTHER


@pytest.mark.parametrize("comment", [None, mine(OTHER), mine(EARLIER), "DBA's role"])
def test_a_role_of_our_name_not_marked_ours_is_refused(comment: str | None) -> None:
    inv = m.Inventory("orders", True, mine(), all_ours(), {ROLE_A: comment})
    result = assess(inv, m.POLICY_ADOPT_EXISTING)
    assert result.conflict is not None and ROLE_A in result.conflict.message


def test_existing_schema_with_foreign_objects_is_refused_without_opt_in() -> None:
    inv = m.Inventory("billing", True, None, (table("cards"),
                                               m.CatalogObject("OTHER", "function charge")))
    result = assess(inv)
    assert result.conflict is not None and result.conflict.kind == m.CONFLICT_FOREIGN_SCHEMA
    assert "table cards" in result.conflict.message
    assert "AdoptExisting" in result.conflict.message


def test_opt_in_adopts_a_foreign_schema_without_owning_it() -> None:
    inv = m.Inventory("billing", True, None, (table("cards"),))
    result = assess(inv, m.POLICY_ADOPT_EXISTING)
    assert result.conflict is None
    assert not result.schema_ours, "an adopted schema is never ours (not dropped, ACL kept)"
    assert not result.create_schema and result.to_mark == ()


def test_opt_in_takes_over_unmarked_tables_of_our_names() -> None:
    # e.g. a stock Celery `db+` backend's tables: explicit opt-in, so they are marked ours
    inv = m.Inventory("legacy", True, None, (table("celery_taskmeta"), table("cards")))
    result = assess(inv, m.POLICY_ADOPT_EXISTING)
    assert result.conflict is None and result.to_mark == ((m.TABLE, "celery_taskmeta"),)


def test_unmarked_table_of_our_name_is_refused_without_opt_in() -> None:
    inv = m.Inventory("orders", True, mine(), (table("celery_taskmeta"),))
    result = assess(inv)
    assert result.conflict is not None and result.conflict.legacy_fixable


def test_empty_existing_schema_is_usable_but_not_ours() -> None:
    # a DBA pre-created it (the admin may lack CREATE on the database): nothing to protect
    result = assess(m.Inventory("orders", True, None, ()))
    assert result.conflict is None and not result.schema_ours and not result.create_schema


def test_adopted_schema_stays_usable_on_the_next_reconcile() -> None:
    inv = m.Inventory("billing", True, None, (*all_ours(), table("cards")))
    assert assess(inv, m.POLICY_ADOPT_EXISTING).conflict is None
    # dropping the opt-in later refuses again: the schema still holds someone else's table
    assert assess(inv).conflict is not None


def test_a_foreign_table_added_to_our_schema_later_is_tolerated() -> None:
    inv = m.Inventory("orders", True, mine(), (*all_ours(), table("reports")))
    result = assess(inv)
    assert result.conflict is None and result.schema_ours


def test_schema_of_an_earlier_incarnation_needs_the_opt_in() -> None:
    inv = m.Inventory("orders", True, mine(EARLIER), all_ours(EARLIER))
    refused = assess(inv)
    assert refused.conflict is not None and "earlier ResultStore team-a/orders" in \
        refused.conflict.message
    assert not refused.conflict.legacy_fixable
    adopted = assess(inv, m.POLICY_ADOPT_EXISTING)
    assert adopted.conflict is None and adopted.schema_ours
    assert (m.SCHEMA, "orders") in adopted.to_mark
    assert set(adopted.to_mark) >= {(m.TABLE, t) for t in TABLES}


def test_legacy_store_with_proof_marks_its_unmarked_objects() -> None:
    inv = m.Inventory("orders", True, None, tuple(table(t) for t in TABLES),
                      {ROLE_A: None})
    without = assess(inv)
    assert without.conflict is not None and without.conflict.legacy_fixable
    proven = assess(inv, legacy=True)
    assert proven.conflict is None and proven.schema_ours
    assert set(proven.to_mark) == {(m.SCHEMA, "orders"), (m.ROLE, ROLE_A)} | {
        (m.TABLE, t) for t in TABLES}


def test_legacy_proof_never_overrides_another_stores_marker() -> None:
    inv = m.Inventory("orders", True, None, tuple(table(t) for t in TABLES),
                      {ROLE_A: mine(OTHER)})
    result = assess(inv, legacy=True)
    assert result.conflict is not None and result.conflict.other == OTHER


# --- plan_teardown -----------------------------------------------------------------------------

def test_teardown_of_our_store_drops_everything_we_made() -> None:
    plan = m.plan_teardown(ME, m.Inventory("orders", True, mine(), all_ours(),
                                           {ROLE_A: mine()}))
    assert plan.drop_schema and set(plan.tables) == set(TABLES)
    assert plan.sequences == SEQUENCES and plan.roles == (ROLE_A,) and plan.kept == ()


def test_teardown_of_the_second_store_touches_nothing_of_the_first() -> None:
    plan = m.plan_teardown(ME, m.Inventory("orders", True, mine(OTHER), all_ours(OTHER),
                                           {ROLE_A: mine(OTHER)}))
    assert (plan.tables, plan.sequences, plan.roles, plan.drop_schema) == ((), (), (), False)
    assert any("schema orders" in k for k in plan.kept)


def test_teardown_in_an_adopted_schema_keeps_the_schema_and_foreign_tables() -> None:
    plan = m.plan_teardown(ME, m.Inventory("billing", True, None,
                                           (*all_ours(), table("cards"))))
    assert not plan.drop_schema and "cards" not in plan.tables
    assert set(plan.tables) == set(TABLES)
    assert "table cards" in plan.kept


def test_teardown_keeps_our_schema_when_someone_added_to_it() -> None:
    plan = m.plan_teardown(ME, m.Inventory("orders", True, mine(),
                                           (*all_ours(), table("reports"))))
    assert not plan.drop_schema and set(plan.tables) == set(TABLES)


def test_teardown_without_the_schema() -> None:
    plan = m.plan_teardown(ME, m.Inventory("orders", False, roles={ROLE_A: mine()}))
    assert plan.roles == (ROLE_A,) and not plan.drop_schema and plan.tables == ()


# --- the admin connection ------------------------------------------------------------------

@pytest.mark.parametrize(("sslmode", "pinned", "expected"), [
    ("disable", False, ("disable", "disable")),
    ("disable", True, ("disable", "disable")),
    ("allow", False, ("prefer", "prefer")),
    ("prefer", False, ("prefer", "prefer")),
    ("prefer", True, ("require", "require")),
    ("allow", True, ("require", "require")),
    ("require", False, ("require", "require")),
    ("verify-ca", False, ("verify-ca", "require")),
    ("verify-full", True, ("verify-full", "require")),
])
def test_connection_security(sslmode: str, pinned: bool, expected: tuple[str, str]) -> None:
    options = connection_security(sslmode, pinned)
    assert options["require_auth"] == "scram-sha-256", "SCRAM must be required in every mode"
    assert (options["sslmode"], options["channel_binding"]) == expected


# --- spec -----------------------------------------------------------------------------------

@pytest.mark.parametrize("host", [
    "127.0.0.1", "db", "pg-1.db.svc.cluster.local", "DB.Example.COM", "::1",
    "2001:db8::5", "10.0.0.255"])
def test_valid_hosts(host: str) -> None:
    assert validate_host(host) == host


@pytest.mark.parametrize("host", [
    "a,b", "127.0.0.1,evil.example", "/var/run/postgresql", "db host", "db:5432",
    "-db", "db-", "999.0.0.1", "1.2.3", "fe80::1%eth0", "[::1]", "x" * 64,
    "a." * 127 + "a", "postgres://db", "db\n", "host=evil"])
def test_invalid_hosts(host: str) -> None:
    with pytest.raises(SpecError, match="spec.database.host"):
        validate_host(host)


def test_spec_host_and_schema_policy() -> None:
    base: dict[str, Any] = {
        "database": {"host": "db", "name": "app", "adminSecretRef": {"name": "a"}},
        "schema": "orders"}
    assert parse_spec(base).schema_policy == "Exclusive"
    assert parse_spec({**base, "schemaPolicy": "AdoptExisting"}).schema_policy == \
        "AdoptExisting"
    with pytest.raises(SpecError, match="schemaPolicy"):
        parse_spec({**base, "schemaPolicy": "Adopt"})
    with pytest.raises(SpecError, match="host"):
        parse_spec({**base, "database": {**base["database"], "host": "a,b"}})


def test_legacy_proof_does_not_mark_a_schema_the_admin_does_not_own() -> None:
    # a DBA pre-created the schema: only its owner may COMMENT on it, and it is not ours
    inv = m.Inventory("orders", True, None, tuple(table(t) for t in TABLES),
                      schema_owned=False)
    result = assess(inv, legacy=True)
    assert result.conflict is None and not result.schema_ours
    assert (m.SCHEMA, "orders") not in result.to_mark
    assert {(m.TABLE, t) for t in TABLES} <= set(result.to_mark)


def test_adopting_an_earlier_incarnations_schema_owned_by_someone_else() -> None:
    inv = m.Inventory("orders", True, mine(EARLIER), all_ours(EARLIER), schema_owned=False)
    result = assess(inv, m.POLICY_ADOPT_EXISTING)
    assert result.conflict is None and not result.schema_ours
    assert (m.SCHEMA, "orders") not in result.to_mark
