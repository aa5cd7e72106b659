"""Choosing a replica: in rotation (healthy, circuit not open), below max_concurrency,
ordered by the service's strategy (gateway_tasks.strategies), with zone preference layered on top: when
the worker has a zone (gateway.zone), replicas in that zone come first and the others serve only when no
local one can take the job. Replicas that already failed this job come after all that have not."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import redis

from gateway_core.dispatch import Full, Pick, Slot, Unavailable
from gateway_core.models import Job
from gateway_core.settings import ReplicaConfig, ServiceConfig, Settings
from gateway_tasks import strategies
from gateway_tasks.registry import Registry, ReplicaState

log = logging.getLogger(__name__)


@dataclass
class Choice:
    replica: ReplicaConfig | None
    token: str | None = None  # the in-flight slot taken; None without Redis
    reasons: dict[str, str] = field(default_factory=dict)  # why replicas were passed over

    @property
    def busy(self) -> bool:
        """No slot now, but some replica is in rotation: the job waits for a slot instead of being held."""
        return self.replica is None and "full" in self.reasons.values()


def _order(
    registry: Registry,
    service: str,
    svc: ServiceConfig,
    candidates: list[ReplicaConfig],
    in_flight: dict[str, int],
    key: str,
) -> list[ReplicaConfig]:
    if svc.strategy == "weighted_round_robin":
        turn = int(registry.r.incr(f"jobgate:rr:{service}"))  # type: ignore[arg-type]
        return strategies.weighted_round_robin(candidates, turn - 1)
    if svc.strategy == "consistent_hash":
        return strategies.consistent_hash(svc.replicas, candidates, key)
    return strategies.least_outstanding(candidates, in_flight)


def _preference(
    svc: ServiceConfig, states: dict[str, ReplicaState], avoid: set[str], zone: str | None
) -> list[list[ReplicaConfig]]:
    """Replicas in rotation in groups of preference: those that have not failed this job before those that
    have, and within each, those of ``zone`` first."""
    in_rotation = [rep for rep in svc.replicas if states[rep.name].in_rotation]
    groups = [[rep for rep in in_rotation if rep.name not in avoid], [rep for rep in in_rotation if rep.name in avoid]]
    if zone:
        groups = [part for g in groups for part in ([r for r in g if r.zone == zone], [r for r in g if r.zone != zone])]
    return [g for g in groups if g]


def in_rotation(
    registry: Registry, service: str, svc: ServiceConfig, *, avoid: set[str], cooldown: float, zone: str | None
) -> list[ReplicaConfig]:
    """The replicas that can take the job when they have a free slot, best first; [] when none is in rotation
    (unhealthy, circuit open) or Redis cannot tell."""
    try:
        states = registry.snapshot(service, svc.replicas, time.time(), cooldown)
    except redis.RedisError as exc:
        log.warning("replica state unavailable (%s)", exc)
        return []
    return [rep for group in _preference(svc, states, avoid, zone) for rep in group]


def choose(
    registry: Registry,
    service: str,
    svc: ServiceConfig,
    *,
    token: str,
    lease_seconds: float,
    avoid: set[str],
    cooldown: float,
    key: str = "",
    zone: str | None = None,
) -> Choice:
    """Take a slot on the best replica, preferring those not in ``avoid`` (they failed this job), then
    those in ``zone``; ``key`` (the tenant) places the job on the consistent-hash ring. A Choice without
    a replica when every one is out of rotation or full (``busy`` when some are only full)."""
    now = time.time()
    try:
        states = registry.snapshot(service, svc.replicas, now, cooldown)
    except redis.RedisError as exc:
        # Without Redis there is no shared state: pick at random rather than stall every job.
        log.warning("replica state unavailable (%s); choosing at random", exc)
        fresh = [rep for rep in svc.replicas if rep.name not in avoid] or list(svc.replicas)
        return Choice(random.choice(fresh))
    reasons = {
        name: "unhealthy" if not st.healthy else "circuit_open" for name, st in states.items() if not st.in_rotation
    }
    in_flight = {name: st.in_flight for name, st in states.items()}
    for group in _preference(svc, states, avoid, zone):
        for rep in _order(registry, service, svc, group, in_flight, key):
            if in_flight[rep.name] < rep.max_concurrency and registry.acquire(service, rep, token, lease_seconds, now):
                return Choice(rep, token)
            reasons[rep.name] = "full"
    return Choice(None, reasons=reasons)


class ReplicaChooser:
    """The dispatch's chooser (gateway_core.dispatch.Chooser) over the shared replica state in Redis."""

    def __init__(self, registry: Registry, settings: Settings):
        self.registry = registry
        self.settings = settings

    def pick(self, job: Job, svc: ServiceConfig, *, token: str, lease_seconds: float, avoid: set[str]) -> Pick:
        choice = choose(
            self.registry,
            job.service,
            svc,
            token=token,
            lease_seconds=lease_seconds,
            avoid=avoid,
            cooldown=self.settings.circuit_for(job.service).cooldown_seconds,
            key=str(job.tenant_id),
            zone=self.settings.gateway.zone,
        )
        if choice.replica is not None:
            return Slot(choice.replica, choice.token)
        return Full() if choice.busy else Unavailable(choice.reasons)

    def in_rotation(self, service: str, svc: ServiceConfig, avoid: set[str]) -> list[ReplicaConfig]:
        return in_rotation(
            self.registry,
            service,
            svc,
            avoid=avoid,
            cooldown=self.settings.circuit_for(service).cooldown_seconds,
            zone=self.settings.gateway.zone,
        )

    def release(self, service: str, slot: Slot) -> None:
        """Free the slot (the first job waiting for one takes it). A slot Redis cannot free now frees itself
        when its lease runs out, and must not cost the job its outcome."""
        if slot.token is None:
            return
        try:
            self.registry.release(service, slot.replica, slot.token, time.time())
        except redis.RedisError as exc:
            log.warning(
                "slot of %s/%s not released (%s); it frees itself at its lease's end", service, slot.replica.name, exc
            )
