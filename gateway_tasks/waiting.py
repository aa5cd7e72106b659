"""Waiting for a busy service's next free slot: no database write, no re-publish, woken within milliseconds.

A job whose replicas are healthy but full joins its service's waiting line in Redis (registry.Registry) and
its greenlet sleeps. Whoever frees a slot hands it to the line's head in the same Redis script and publishes
the waiter's token on the channel of the waiter's process; one subscription per process wakes the right
greenlet. A waiter also renews its place every few seconds, which is when it notices that no replica is in
rotation any more (the job is then held) or that its deadline has passed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import datetime

import redis

from gateway_core.settings import ReplicaConfig
from gateway_tasks.fanout import Fanout
from gateway_tasks.registry import Registry, Waiter

RENEW_SECONDS = 2.0  # how often a waiter renews its place and looks at the replicas again
PLACE_TTL_SECONDS = 3 * RENEW_SECONDS  # a place not renewed this long (its process died) is skipped


def rank(priority: int, submitted_at: datetime) -> float:
    """Place in line: priority first (0 before 9), then the order of submission (milliseconds, exact in a double)."""
    return priority * 1e13 + round(submitted_at.timestamp() * 1000)


def grant_listener(client: redis.Redis) -> Fanout:
    """This process's subscription to the slot grants addressed to it (a channel of its own)."""
    return Fanout(client, f"jobgate:grants:{uuid.uuid4().hex}")


def wait_for_slot(
    registry: Registry,
    listener: Fanout,
    service: str,
    *,
    token: str,
    rank: float,
    lease_seconds: float,
    configured: list[ReplicaConfig],
    in_rotation: Callable[[], list[ReplicaConfig]],
    until: float | None,
) -> ReplicaConfig | None:
    """Wait in the service's line until a slot of one of the replicas ``in_rotation()`` (re-read at each
    renewal) is granted under ``token``; None, having left the line, when none is in rotation any more or
    ``until`` (epoch seconds) has passed."""
    waiter = Waiter(token, rank, listener.channel, lease_seconds, PLACE_TTL_SECONDS)
    by_name = {rep.name: rep for rep in configured}
    with listener.expecting(token) as event:
        while True:
            candidates = in_rotation()
            now = time.time()
            if not candidates or (until is not None and now >= until):
                granted = registry.leave_line(service, token)
                if granted is not None:  # handed to us as we left: pass it on
                    _give_back(registry, service, by_name.get(granted), granted, token)
                return None
            event.clear()
            name = registry.wait_in_line(service, waiter, candidates, now)
            if name is not None:
                chosen = next((rep for rep in candidates if rep.name == name), None)
                if chosen is not None:
                    return chosen
                _give_back(registry, service, by_name.get(name), name, token)  # it left rotation meanwhile
                continue
            timeout = RENEW_SECONDS if until is None else max(0.0, min(RENEW_SECONDS, until - now))
            event.wait(timeout)


def _give_back(registry: Registry, service: str, rep: ReplicaConfig | None, name: str, token: str) -> None:
    if rep is None:  # no longer configured: free the slot, nobody can be handed it
        registry.drop(service, name, token)
    else:
        registry.release(service, rep, token, time.time())
