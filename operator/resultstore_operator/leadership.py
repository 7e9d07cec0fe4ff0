"""Leader election decisions over a `coordination.k8s.io/v1` Lease (pure; no I/O, no clock).

Why a Lease and not Kopf's peering, and why these rules, is in docs/ARCHITECTURE.md
("Leadership"). In short, client-go's leaderelection semantics:

- A standby never compares the Lease's `renewTime` with its own clock (the clocks of two
  nodes may differ by more than a lease). It remembers the record it last observed and the
  *monotonic* time at which it first saw it (`Observation`); the Lease has lapsed when the
  record's `leaseDurationSeconds` passed on its own clock without any change.
- The leader measures its renew deadline from the monotonic time *before* it sent its last
  successful renewal, so it stops acting no later than `sent + renewDeadline`, while a
  standby can start no earlier than `seen + leaseDuration >= sent + leaseDuration`.
- Every write carries the observed resourceVersion (or is a create): two standbys that
  decide to acquire at once cannot both win; the loser gets a Conflict and decides again.

`decide` takes everything as arguments (the observation, my identity, my last renewal,
`now` on the monotonic clock, and `wall`, the wall-clock time written into the Lease for
humans and for other tools, never read back for a decision).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .views import meta, section

LEASE_API_VERSION = "coordination.k8s.io/v1"
LEASE_KIND = "Lease"
#: `leaseDurationSeconds` of a released Lease (client-go's ReleaseOnCancel writes 1 too).
RELEASED_DURATION = 1


@dataclass(frozen=True)
class LeaseTiming:
    """client-go's three durations, in seconds (validated by the settings)."""

    lease_duration: float = 10.0
    renew_deadline: float = 6.0
    retry_period: float = 2.0

    def problem(self) -> str | None:
        """Why these durations cannot give mutual exclusion, or None when they can."""
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            return ("need 0 < retry period < renew deadline < lease duration, got "
                    f"{self.retry_period} / {self.renew_deadline} / {self.lease_duration}")
        return None


@dataclass(frozen=True)
class LeaseRecord:
    """What the Lease says (an empty `holder` means free: released, or never held)."""

    holder: str
    duration: int
    acquire_time: str | None
    renew_time: str | None
    transitions: int
    resource_version: str

    @classmethod
    def from_lease(cls, obj: Mapping[str, Any] | None) -> LeaseRecord | None:
        if obj is None:
            return None
        spec = section(obj, "spec")
        duration = spec.get("leaseDurationSeconds")
        transitions = spec.get("leaseTransitions")
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration=duration if isinstance(duration, int) and duration > 0 else 0,
            acquire_time=spec.get("acquireTime"),
            renew_time=spec.get("renewTime"),
            transitions=transitions if isinstance(transitions, int) else 0,
            resource_version=meta(obj).resource_version or "",
        )


@dataclass(frozen=True)
class Observation:
    """A record and the monotonic time this replica first saw it (None: no Lease yet)."""

    record: LeaseRecord | None
    seen_at: float


def observe(previous: Observation | None, record: LeaseRecord | None,
            now: float) -> Observation:
    """Keep the first-seen time while the record is unchanged; a change restarts the clock.

    Any change counts (holder, renewTime, resourceVersion): a leader that renews changes at
    least the resourceVersion.
    """
    if previous is not None and previous.record == record:
        return previous
    return Observation(record, now)


class Action(enum.Enum):
    ACQUIRE = "acquire"      # write the Lease with me as holder (create or replace)
    RENEW = "renew"          # I hold it: write a new renewTime
    STANDBY = "standby"      # another replica holds a live Lease: wait
    STEP_DOWN = "step-down"  # I was leader and can no longer prove it: stop acting now


@dataclass(frozen=True)
class Decision:
    action: Action
    #: The Lease to write (ACQUIRE, RENEW), else None.
    body: dict[str, Any] | None
    #: Whether `body` is created (no Lease observed) rather than replaced.
    create: bool
    #: Seconds until the next attempt.
    wait: float
    reason: str


def micro_time(wall: datetime) -> str:
    """A MicroTime (RFC 3339 with microseconds, UTC `Z`), the Lease's time format."""
    return wall.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_body(namespace: str, name: str, holder: str, duration: int,
               acquire_time: str | None, renew_time: str, transitions: int,
               resource_version: str | None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if resource_version:
        metadata["resourceVersion"] = resource_version
    return {
        "apiVersion": LEASE_API_VERSION,
        "kind": LEASE_KIND,
        "metadata": metadata,
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration,
                 "acquireTime": acquire_time, "renewTime": renew_time,
                 "leaseTransitions": transitions},
    }


def expires_in(observation: Observation, timing: LeaseTiming, now: float) -> float:
    """Seconds until the observed record lapses on my clock (<= 0: lapsed)."""
    record = observation.record
    if record is None or not record.holder:
        return 0.0
    duration = record.duration or timing.lease_duration
    return observation.seen_at + duration - now


def decide(observation: Observation, me: str, last_renew: float | None, now: float,
           timing: LeaseTiming, wall: datetime, namespace: str, name: str) -> Decision:
    """What this replica does next, and the Lease it writes for it.

    `last_renew` is the monotonic time before my last successful acquire/renew write, None
    while I am not the leader.
    """
    record = observation.record
    stamp = micro_time(wall)
    duration = math.ceil(timing.lease_duration)
    leader = last_renew is not None
    if leader and now - last_renew > timing.renew_deadline:  # type: ignore[operator]
        return Decision(Action.STEP_DOWN, None, False, 0.0,
                        f"not renewed within the renew deadline ({timing.renew_deadline:g}s)")
    if record is None:
        if leader:
            return Decision(Action.STEP_DOWN, None, False, 0.0, "the Lease was deleted")
        body = lease_body(namespace, name, me, duration, stamp, stamp, 0, None)
        return Decision(Action.ACQUIRE, body, True, timing.retry_period, "no Lease yet")
    if record.holder == me and leader:
        body = lease_body(namespace, name, me, duration, record.acquire_time or stamp, stamp,
                          record.transitions, record.resource_version)
        return Decision(Action.RENEW, body, False, timing.retry_period, "holding")
    if leader:
        return Decision(Action.STEP_DOWN, None, False, 0.0,
                        f"the Lease is held by {record.holder or 'nobody'}")
    remaining = expires_in(observation, timing, now)
    if remaining <= 0:
        why = (f"lapsed (held by {record.holder}, unchanged for "
               f"{now - observation.seen_at:.1f}s)") if record.holder else "released"
        body = lease_body(namespace, name, me, duration, stamp, stamp,
                          record.transitions + 1, record.resource_version)
        return Decision(Action.ACQUIRE, body, False, timing.retry_period, why)
    return Decision(Action.STANDBY, None, False, min(timing.retry_period, remaining),
                    f"held by {record.holder}")


def release_body(record: LeaseRecord | None, me: str, wall: datetime, namespace: str,
                 name: str) -> dict[str, Any] | None:
    """The Lease that hands over at once on a graceful stop (None: not mine to release).

    No holder and a 1 s duration: a standby reading it acquires without waiting the lease
    duration (what client-go's ReleaseOnCancel writes).
    """
    if record is None or record.holder != me:
        return None
    stamp = micro_time(wall)
    return lease_body(namespace, name, "", RELEASED_DURATION, stamp, stamp,
                      record.transitions, record.resource_version)
