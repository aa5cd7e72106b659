"""Choosing a replica: round-robin over a counter in Redis, shared by every worker on every machine."""

from __future__ import annotations

import logging
import random

import redis

from gateway_core.settings import ReplicaConfig

log = logging.getLogger(__name__)


def pick_replica(
    r: redis.Redis, service: str, replicas: list[ReplicaConfig], exclude: set[str] | None = None
) -> ReplicaConfig:
    """The next replica in turn, skipping those in ``exclude`` (failed for this job) while others remain."""
    candidates = [rep for rep in replicas if rep.name not in (exclude or set())] or list(replicas)
    try:
        turn = int(r.incr(f"jobgate:rr:{service}"))  # type: ignore[arg-type]
    except redis.RedisError as exc:
        # Balancing without Redis is still balancing: fall back to a random pick rather than stall.
        log.warning("round-robin counter unavailable (%s); picking at random", exc)
        return random.choice(candidates)
    return candidates[(turn - 1) % len(candidates)]
