"""Replicas' live state in Redis, shared by every worker on every machine (issue 4, item 1):

- in-flight slots: a sorted set per replica of lease tokens scored by expiry; a slot is taken atomically
  only below max_concurrency and frees itself when a killed worker's lease runs out;
- health: up or down, from beat's probes (thresholds) and from refused connections;
- recent latency: a weighted mean of answered calls, with the circuit's counters;
- circuit: closed; open after N consecutive failures of real jobs or an error rate over a window (with a
  minimum of jobs in it); half-open after a cooldown (trial jobs pass); closed again by a success.
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


# One job's outcome on a replica. Counts consecutive failures and, per fixed window, jobs and failures.
# Returns 'opened' when this failure opened (or, a failed half-open trial, re-opened) the circuit,
# 'closed' when this success closed a circuit that was not closed, '' otherwise.
_OUTCOME = """
local key, now, ok = KEYS[1], tonumber(ARGV[1]), ARGV[2] == '1'
local threshold, cooldown = tonumber(ARGV[3]), tonumber(ARGV[4])
local window, min_requests, rate = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local latency = tonumber(ARGV[8])
local state = redis.call('HGET', key, 'state') or 'closed'
redis.call('EXPIRE', key, 86400)
if latency >= 0 then  -- recent latency: an exponentially weighted mean of answered calls
  local before = tonumber(redis.call('HGET', key, 'latency_ms'))
  redis.call('HSET', key, 'latency_ms', before and (0.8 * before + 0.2 * latency) or latency)
end
if now - tonumber(redis.call('HGET', key, 'win_start') or 0) >= window then
  redis.call('HSET', key, 'win_start', now, 'win_total', 0, 'win_fail', 0)
end
local total = redis.call('HINCRBY', key, 'win_total', 1)
if ok then
  redis.call('HSET', key, 'state', 'closed', 'fails', 0)
  if state ~= 'closed' then
    redis.call('HSET', key, 'win_start', now, 'win_total', 0, 'win_fail', 0)
    return 'closed'
  end
  return ''
end
local failed = redis.call('HINCRBY', key, 'win_fail', 1)
local fails = redis.call('HINCRBY', key, 'fails', 1)
local reason = nil
if state == 'open' then
  if now - tonumber(redis.call('HGET', key, 'opened_at') or 0) < cooldown then return '' end
  reason = 'trial'
elseif fails >= threshold then
  reason = 'consecutive'
elseif rate > 0 and total >= min_requests and failed / total >= rate then
  reason = 'error_rate'
end
if reason == nil then return '' end
redis.call('HSET', key, 'state', 'open', 'opened_at', now, 'reason', reason)
redis.call('HSET', key, 'win_start', now, 'win_total', 0, 'win_fail', 0)
return 'opened'
"""


@dataclass(frozen=True)
class ReplicaState:
    in_flight: int
    healthy: bool  # a replica never probed counts as healthy, so a fresh deployment serves at once
    circuit: str = "closed"  # closed | open | half_open (open, cooled down: trial jobs pass)
    latency_ms: float | None = None  # recent latency of answered calls (weighted mean); None before any

    @property
    def in_rotation(self) -> bool:
        return self.healthy and self.circuit != "open"


class Registry:
    def __init__(self, r: redis.Redis):
        self.r = r
        self._acquire = r.register_script(_ACQUIRE)
        self._outcome = r.register_script(_OUTCOME)

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
            pipe.hmget(self._circuit(service, rep.name), ["state", "opened_at", "latency_ms"])
        values = pipe.execute()
        out = {}
        for i, rep in enumerate(replicas):
            in_flight, health, (circuit, opened_at, latency) = values[3 * i : 3 * i + 3]
            state = (circuit or b"closed").decode()
            if state == "open" and now - float(opened_at or 0) >= cooldown:
                state = "half_open"
            out[rep.name] = ReplicaState(int(in_flight), health != b"down", state, float(latency) if latency else None)
        return out

    def record_outcome(
        self, service: str, name: str, ok: bool, cfg: CircuitConfig, now: float, latency: float | None = None
    ) -> str:
        """Count one job's outcome on the replica against its breaker (and its ``latency`` in seconds when it
        answered): 'opened' when this failure opened the circuit, 'closed' when this success closed it, ''
        when its state did not change."""
        args = [
            now,
            int(ok),
            cfg.failure_threshold,
            cfg.cooldown_seconds,
            cfg.window_seconds,
            cfg.min_requests,
            cfg.error_rate_threshold or 0,
            -1 if latency is None else round(latency * 1000, 3),
        ]
        result = self._outcome(keys=[self._circuit(service, name)], args=args)
        return result.decode() if isinstance(result, bytes) else str(result or "")

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
