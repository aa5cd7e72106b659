"""Replica orderings, one per strategy (issue 4, item 2). Each returns candidates best first; the
balancer then takes the first with a free slot. Pure functions of their inputs, so every worker on every
machine orders the same way given the same shared state.

- least_outstanding: fewest in-flight jobs per unit of weight, ties at random;
- weighted_round_robin: a shared turn counter walks a smooth weighted schedule (nginx's), so over a
  cycle of sum(weights) turns each replica is first ``weight`` times, interleaved;
- consistent_hash: a hash ring of ``VNODES * weight`` points per replica; a tenant's jobs go to the first
  replica clockwise from the tenant's hash. Only the configured replica set shapes the ring, so one
  replica leaving (or joining) moves only the tenants it held (or takes); a replica out of rotation
  hands its tenants to the next one on the ring until it returns.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence
from functools import lru_cache

from gateway_core.settings import ReplicaConfig

VNODES = 64  # ring points per unit of weight: enough for an even spread of tenants over a few replicas


def least_outstanding(candidates: Sequence[ReplicaConfig], in_flight: dict[str, int]) -> list[ReplicaConfig]:
    shuffled = random.sample(list(candidates), len(candidates))  # ties broken at random, not by config order
    return sorted(shuffled, key=lambda rep: in_flight[rep.name] / rep.weight)


@lru_cache(maxsize=256)
def _schedule(weights: tuple[tuple[str, int], ...]) -> tuple[str, ...]:
    """One cycle of smooth weighted round-robin: each name ``weight`` times, spread out."""
    current = dict.fromkeys((name for name, _ in weights), 0)
    total = sum(w for _, w in weights)
    cycle = []
    for _ in range(total):
        for name, w in weights:
            current[name] += w
        best = max(weights, key=lambda nw: current[nw[0]])[0]  # first of the highest: deterministic
        current[best] -= total
        cycle.append(best)
    return tuple(cycle)


def weighted_round_robin(candidates: Sequence[ReplicaConfig], turn: int) -> list[ReplicaConfig]:
    """Candidates in the order the schedule reaches them from position ``turn``."""
    by_name = {rep.name: rep for rep in candidates}
    cycle = _schedule(tuple((rep.name, rep.weight) for rep in candidates))
    start = turn % len(cycle)
    order: dict[str, ReplicaConfig] = {}
    for name in cycle[start:] + cycle[:start]:
        order.setdefault(name, by_name[name])
    return list(order.values())


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@lru_cache(maxsize=256)
def _ring(weights: tuple[tuple[str, int], ...]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    points = sorted((_point(f"{name}#{i}"), name) for name, w in weights for i in range(VNODES * w))
    return tuple(p for p, _ in points), tuple(n for _, n in points)


def ring_order(replicas: Sequence[ReplicaConfig], key: str) -> list[str]:
    """Every replica's name, in the order met walking the ring clockwise from ``key``'s hash."""
    points, names = _ring(tuple((rep.name, rep.weight) for rep in replicas))
    start = bisect.bisect(points, _point(key))
    order: dict[str, None] = {}
    for i in range(len(names)):
        order.setdefault(names[(start + i) % len(names)], None)
        if len(order) == len(replicas):
            break
    return list(order)


def consistent_hash(
    replicas: Sequence[ReplicaConfig], candidates: Sequence[ReplicaConfig], key: str
) -> list[ReplicaConfig]:
    """Candidates in ring order for ``key``, the ring being built over all configured ``replicas``."""
    by_name = {rep.name: rep for rep in candidates}
    return [by_name[name] for name in ring_order(replicas, key) if name in by_name]
