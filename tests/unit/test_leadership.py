"""The Lease decisions (leadership.decide): plain data in, an action and a Lease body out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from resultstore_operator.leadership import (
    RELEASED_DURATION,
    Action,
    LeaseRecord,
    LeaseTiming,
    Observation,
    decide,
    expires_in,
    micro_time,
    observe,
    release_body,
)

TIMING = LeaseTiming(lease_duration=10.0, renew_deadline=6.0, retry_period=2.0)
WALL = datetime(2026, 12, 2, 5, 0, 0, 123456, tzinfo=UTC)
ME, OTHER = "op-a_0001", "op-b_0002"
NS, NAME = "resultstore-system", "resultstore-operator-leader"


def record(holder: str = OTHER, rv: str = "7", duration: int = 10,
           transitions: int = 3) -> LeaseRecord:
    return LeaseRecord(holder=holder, duration=duration, acquire_time="2026-12-02T04:00:00Z",
                       renew_time="2026-12-02T04:59:58Z", transitions=transitions,
                       resource_version=rv)


def run(observation: Observation, last_renew: float | None, now: float) -> Any:
    return decide(observation, ME, last_renew, now, TIMING, WALL, NS, NAME)


def test_record_from_the_lease_json() -> None:
    lease = {"metadata": {"name": NAME, "namespace": NS, "resourceVersion": "42"},
             "spec": {"holderIdentity": OTHER, "leaseDurationSeconds": 15,
                      "renewTime": "2026-12-02T05:00:00.000000Z", "leaseTransitions": 2}}
    rec = LeaseRecord.from_lease(lease)
    assert rec is not None
    assert (rec.holder, rec.duration, rec.transitions, rec.resource_version) == (
        OTHER, 15, 2, "42")
    assert LeaseRecord.from_lease(None) is None
    empty = LeaseRecord.from_lease({"metadata": {}, "spec": None})
    assert empty is not None and (empty.holder, empty.duration, empty.transitions) == ("", 0, 0)


def test_observation_keeps_the_first_seen_time_until_the_record_changes() -> None:
    first = observe(None, record(rv="7"), now=100.0)
    same = observe(first, record(rv="7"), now=105.0)
    assert same.seen_at == 100.0
    changed = observe(same, record(rv="8"), now=106.0)
    assert changed.seen_at == 106.0
    # Only a change restarts the clock: the Lease's own renewTime is never compared.
    assert observe(changed, record(rv="8"), now=200.0).seen_at == 106.0


@pytest.mark.parametrize(("seen_at", "now", "action"), [
    (100.0, 100.0, Action.STANDBY),
    (100.0, 109.9, Action.STANDBY),
    (100.0, 110.0, Action.ACQUIRE),   # leaseDuration unchanged on my own clock
    (100.0, 500.0, Action.ACQUIRE),
])
def test_standby_acquires_only_after_the_lease_duration_on_its_own_clock(
        seen_at: float, now: float, action: Action) -> None:
    decision = run(Observation(record(), seen_at), None, now)
    assert decision.action is action
    if action is Action.STANDBY:
        assert decision.body is None
        assert 0 < decision.wait <= TIMING.retry_period
    else:
        assert decision.body is not None and not decision.create
        spec = decision.body["spec"]
        assert spec["holderIdentity"] == ME
        assert spec["leaseTransitions"] == 4
        # Optimistic concurrency: the write names the version it decided on.
        assert decision.body["metadata"]["resourceVersion"] == "7"


def test_the_records_own_duration_is_the_one_waited() -> None:
    short = Observation(record(duration=3), 100.0)
    assert run(short, None, 103.0).action is Action.ACQUIRE
    assert expires_in(Observation(record(duration=0), 100.0), TIMING, 105.0) == 5.0


@pytest.mark.parametrize("holder", ["", None])
def test_a_released_lease_is_taken_at_once(holder: str | None) -> None:
    lease = {"metadata": {"resourceVersion": "9"},
             "spec": {"holderIdentity": holder, "leaseDurationSeconds": RELEASED_DURATION}}
    decision = run(Observation(LeaseRecord.from_lease(lease), 100.0), None, 100.0)
    assert decision.action is Action.ACQUIRE
    assert decision.reason == "released"


def test_no_lease_is_created() -> None:
    decision = run(Observation(None, 100.0), None, 100.0)
    assert decision.action is Action.ACQUIRE and decision.create
    assert decision.body is not None
    assert "resourceVersion" not in decision.body["metadata"]
    assert decision.body["metadata"] == {"name": NAME, "namespace": NS}
    assert decision.body["spec"]["leaseDurationSeconds"] == 10
    assert decision.body["spec"]["renewTime"] == "2026-12-02T05:00:00.123456Z"


@pytest.mark.parametrize(("last_renew", "now", "action"), [
    (100.0, 101.0, Action.RENEW),
    (100.0, 106.0, Action.RENEW),      # exactly at the deadline: still within it
    (100.0, 106.01, Action.STEP_DOWN),  # past renewDeadline: stop before a standby can start
    (100.0, 400.0, Action.STEP_DOWN),
])
def test_leader_renews_until_the_renew_deadline(last_renew: float, now: float,
                                                action: Action) -> None:
    decision = run(Observation(record(holder=ME, rv="11"), last_renew), last_renew, now)
    assert decision.action is action
    if action is Action.RENEW:
        assert decision.body is not None
        spec = decision.body["spec"]
        assert spec["holderIdentity"] == ME
        assert spec["acquireTime"] == "2026-12-02T04:00:00Z"  # kept from acquisition
        assert spec["leaseTransitions"] == 3                # a renewal is no transition
        assert decision.body["metadata"]["resourceVersion"] == "11"
    else:
        assert decision.body is None


@pytest.mark.parametrize("observed", [record(holder=OTHER), record(holder=""), None])
def test_a_leader_that_sees_another_holder_or_no_lease_steps_down(
        observed: LeaseRecord | None) -> None:
    decision = run(Observation(observed, 100.0), 100.0, 101.0)
    assert decision.action is Action.STEP_DOWN


def test_my_predecessors_record_is_waited_out_like_anyones() -> None:
    """Same identity in the Lease but no renewal of mine: a previous process wrote it."""
    assert run(Observation(record(holder=ME), 100.0), None, 101.0).action is Action.STANDBY


def test_margin_between_renew_deadline_and_lease_duration() -> None:
    """The leader's last act is `sent + renewDeadline`; the standby's first is no earlier
    than `seen + leaseDuration`, and `seen >= sent`."""
    sent = 100.0
    seen = sent  # the earliest a standby can have seen that renewal
    leader_stops = sent + TIMING.renew_deadline
    assert run(Observation(record(holder=ME), sent), sent, leader_stops + 0.01).action \
        is Action.STEP_DOWN
    assert run(Observation(record(holder=OTHER), seen), None, leader_stops + 0.01).action \
        is Action.STANDBY


@pytest.mark.parametrize(("timing", "ok"), [
    (LeaseTiming(10, 6, 2), True),
    (LeaseTiming(10, 10, 2), False),
    (LeaseTiming(10, 6, 6), False),
    (LeaseTiming(5, 6, 2), False),
])
def test_timing_problem(timing: LeaseTiming, ok: bool) -> None:
    assert (timing.problem() is None) is ok


def test_release_hands_over_at_once() -> None:
    body = release_body(record(holder=ME, rv="12"), ME, WALL, NS, NAME)
    assert body is not None
    assert body["spec"]["holderIdentity"] == ""
    assert body["spec"]["leaseDurationSeconds"] == RELEASED_DURATION
    assert body["metadata"]["resourceVersion"] == "12"
    assert release_body(record(holder=OTHER), ME, WALL, NS, NAME) is None
    assert release_body(None, ME, WALL, NS, NAME) is None


def test_micro_time() -> None:
    assert micro_time(WALL) == "2026-12-02T05:00:00.123456Z"


def test_leader_settings_are_read_once_from_the_environment() -> None:
    from resultstore_operator.settings import OperatorSettings

    off = OperatorSettings.from_env({})
    assert not off.leader.enabled
    on = OperatorSettings.from_env({
        "RESULTSTORE_LEADER_ELECTION": "true", "POD_NAME": "resultstore-operator-7f9c-abcde",
        "RESULTSTORE_OPERATOR_NAMESPACE": "ops", "RESULTSTORE_LEASE_DURATION": "8",
        "RESULTSTORE_RENEW_DEADLINE": "5", "RESULTSTORE_RETRY_PERIOD": "1"})
    leader = on.leader
    assert leader.enabled and leader.namespace == "ops"
    assert (leader.lease_duration, leader.renew_deadline, leader.retry_period) == (8, 5, 1)
    base, _, suffix = leader.identity.rpartition("_")
    assert base == "resultstore-operator-7f9c-abcde" and len(suffix) == 8
    # A second process of the same pod name is another identity.
    again = OperatorSettings.from_env({"POD_NAME": "resultstore-operator-7f9c-abcde"})
    assert again.leader.identity != leader.identity


@pytest.mark.parametrize("env", [
    {"RESULTSTORE_RENEW_DEADLINE": "10"},                      # == lease duration
    {"RESULTSTORE_RETRY_PERIOD": "6"},                         # == renew deadline
    {"RESULTSTORE_LEASE_DURATION": "4"},                       # below renew deadline
    {"RESULTSTORE_LEADER_ELECTION": "perhaps"},
    {"RESULTSTORE_PEERING": "resultstore"},                    # Kopf peering is gone
])
def test_leader_settings_refused(env: dict[str, str]) -> None:
    from resultstore_operator.settings import OperatorSettings, SettingsError

    with pytest.raises(SettingsError, match="RESULTSTORE_"):
        OperatorSettings.from_env(env)
