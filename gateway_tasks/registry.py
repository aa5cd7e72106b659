"""Replicas' live state in Redis, shared by every worker on every machine (issue 4, item 1):

- in-flight slots: a sorted set per replica of lease tokens scored by expiry; a slot is taken atomically
  only below max_concurrency and frees itself when a killed worker's lease runs out;
- health: up or down, from beat's probes (thresholds) and from refused connections;
- circuit: closed, open after consecutive failures of real jobs, half-open after a cooldown (trial jobs
  pass), closed again by a success.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis

from gateway_core.settings import CircuitConfig, HealthConfig, ReplicaConfig

_ACQUIRE = """
local now, expiry, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= limit then return 0 end
redis.call('ZADD', KEYS[1], expiry, ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(expiry - now) + 60)
return 1
"""


# Returns 1 when this failure opened (or re-opened) the circuit.
_FAILURE = """
local fails = redis.call('HINCRBY', KEYS[1], 'fails', 1)
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
redis.call('EXPIRE', KEYS[1], 86400)
if state == 'open' then
  if tonumber(ARGV[1]) - tonumber(redis.call('HGET', KEYS[1], 'opened_at') or 0) < tonumber(ARGV[3]) then
    return 0
  end
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[1])  -- a failed trial: open again
  return 1
end
if fails >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[1])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class ReplicaState:
    in_flight: int
    healthy: bool  # a replica never probed counts as healthy, so a fresh deployment serves at once
    circuit: str = "closed"  # closed | open | half_open (open, cooled down: trial jobs pass)

    @property
    def in_rotation(self) -> bool:
        return self.healthy and self.circuit != "open"


class Registry:
    def __init__(self, r: redis.Redis):
        self.r = r
        self._acquire = r.register_script(_ACQUIRE)
        self._failure = r.register_script(_FAILURE)

    @staticmethod
    def _slots(service: str, name: str) -> str:
        return f"jobgate:replica:{service}:{name}:inflight"

    @staticmethod
    def _health(service: str, name: str) -> str:
        return f"jobgate:replica:{service}:{name}:health"

    @staticmethod
    def _circuit(service: str, name: str) -> str:
        return f"jobgate:replica:{service}:{name}:circuit"

    def snapshot(
        self, service: str, replicas: list[ReplicaConfig], now: float, cooldown: float
    ) -> dict[str, ReplicaState]:
        """In-flight count, health and circuit of each replica, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for rep in replicas:
            pipe.zcount(self._slots(service, rep.name), f"({now}", "+inf")
            pipe.hget(self._health(service, rep.name), "state")
            pipe.hmget(self._circuit(service, rep.name), ["state", "opened_at"])
        values = pipe.execute()
        out = {}
        for i, rep in enumerate(replicas):
            in_flight, health, (circuit, opened_at) = values[3 * i : 3 * i + 3]
            state = (circuit or b"closed").decode()
            if state == "open" and now - float(opened_at or 0) >= cooldown:
                state = "half_open"
            out[rep.name] = ReplicaState(int(in_flight), health != b"down", state)
        return out

    def record_failure(self, service: str, name: str, cfg: CircuitConfig, now: float) -> bool:
        """Count a failed job on the replica; True when this opened its circuit."""
        keys = [self._circuit(service, name)]
        return bool(self._failure(keys=keys, args=[now, cfg.failure_threshold, cfg.cooldown_seconds]))

    def record_success(self, service: str, name: str) -> bool:
        """A job succeeded on the replica: its circuit closes. True when it was not closed before."""
        key = self._circuit(service, name)
        pipe = self.r.pipeline()
        pipe.hget(key, "state")
        pipe.hset(key, mapping={"state": "closed", "fails": 0})
        before, _ = pipe.execute()
        return before not in (None, b"closed")

    def acquire(self, service: str, replica: ReplicaConfig, token: str, lease_seconds: float, now: float) -> bool:
        """Take one of the replica's max_concurrency slots until ``now + lease_seconds``."""
        keys = [self._slots(service, replica.name)]
        return bool(self._acquire(keys=keys, args=[now, now + lease_seconds, replica.max_concurrency, token]))

    def release(self, service: str, name: str, token: str) -> None:
        self.r.zrem(self._slots(service, name), token)

    def mark_down(self, service: str, name: str) -> None:
        """A refused connection takes the replica out of rotation until probes bring it back."""
        self.r.hset(self._health(service, name), mapping={"state": "down", "ok": 0, "fail": 0})

    def record_probe(self, service: str, name: str, ok: bool, cfg: HealthConfig) -> str:
        """Count a probe result; ``healthy_threshold`` successes bring a down replica back,
        ``unhealthy_threshold`` failures take an up one out. Returns the state after."""
        key = self._health(service, name)
        raw = self.r.hgetall(key)
        state = raw.get(b"state", b"up").decode()  # type: ignore[union-attr]
        oks = int(raw.get(b"ok", 0)) + 1 if ok else 0  # type: ignore[union-attr]
        fails = 0 if ok else int(raw.get(b"fail", 0)) + 1  # type: ignore[union-attr]
        if state == "down" and oks >= cfg.healthy_threshold:
            state = "up"
        elif state == "up" and fails >= cfg.unhealthy_threshold:
            state = "down"
        self.r.hset(key, mapping={"state": state, "ok": oks, "fail": fails})
        self.r.expire(key, max(60, math.ceil(cfg.interval_seconds * 20)))
        return state
