"""Replicas' live state in Redis, shared by every worker on every machine:

- in-flight slots: a sorted set per replica of lease tokens scored by expiry; a slot is taken atomically
  only below max_concurrency and frees itself when a killed worker's lease runs out;
- health: up or down, from beat's probes (thresholds) and from refused connections;
- recent latency: a weighted mean of answered calls, with the circuit's counters;
- circuit: closed; open after N consecutive failures of real jobs or an error rate over a window (with a
  minimum of jobs in it); half-open after a cooldown (trial jobs pass); closed again by a success;
- the waiting line of a service whose replicas are all busy: a sorted set of waiters ranked by (priority, time
  of submit). A slot that frees is handed in the same script to the first live waiter (its token enters the
  replica's slots) and the waiter's process is told on its pub/sub channel; while waiters exist a newcomer
  does not take a slot ahead of them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import redis

from gateway_core.settings import CircuitConfig, HealthConfig, ReplicaConfig

_ACQUIRE = """
local now, expiry, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('ZCARD', KEYS[2]) > 0 then return 0 end  -- jobs already wait for this service's slots
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= limit then return 0 end
redis.call('ZADD', KEYS[1], expiry, ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(expiry - now) + 60)
return 1
"""


# Hand free slots to the head of the waiting line. KEYS: waiting zset, waiter info hash, granted hash, then the
# slots zset of each replica that may take waiters, in order of preference; ARGV: now, then a name and a
# max_concurrency per replica. A waiter whose entry expired (its process died) is dropped, not served.
_DRAIN = """
local function drain(now, first, args_from)
  local n = #KEYS - first + 1
  for i = 0, n - 1 do
    local slots, name, limit = KEYS[first + i], ARGV[args_from + 2 * i], tonumber(ARGV[args_from + 2 * i + 1])
    redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
    while redis.call('ZCARD', slots) < limit do
      local head = redis.call('ZRANGE', KEYS[1], 0, 0)
      if #head == 0 then return end
      local member = head[1]
      redis.call('ZREM', KEYS[1], member)
      local info = redis.call('HGET', KEYS[2], member)
      redis.call('HDEL', KEYS[2], member)
      if info then
        local w = cjson.decode(info)
        if w.expires >= now then
          redis.call('ZADD', slots, now + w.lease, member)
          redis.call('EXPIRE', slots, math.ceil(w.lease) + 60)
          redis.call('HSET', KEYS[3], member, name)
          redis.call('EXPIRE', KEYS[3], 86400)
          redis.call('PUBLISH', w.channel, member)
        end
      end
    end
  end
end
"""

# Join (or stay in) the waiting line, then hand out what is free; the replica granted to this waiter, if any.
# KEYS as _DRAIN (from KEYS[4]: the replicas this job may use); ARGV: now, member, rank, waiter info (JSON),
# then name and max_concurrency per replica.
_WAIT = (
    _DRAIN
    + """
local now, member = tonumber(ARGV[1]), ARGV[2]
local mine = redis.call('HGET', KEYS[3], member)
if mine then redis.call('HDEL', KEYS[3], member) return mine end
redis.call('ZADD', KEYS[1], tonumber(ARGV[3]), member)
redis.call('HSET', KEYS[2], member, ARGV[4])
redis.call('EXPIRE', KEYS[1], 86400)
redis.call('EXPIRE', KEYS[2], 86400)
drain(now, 4, 5)
mine = redis.call('HGET', KEYS[3], member)
if mine then redis.call('HDEL', KEYS[3], member) return mine end
return false
"""
)

# Leave the waiting line; the replica granted meanwhile, if any (the caller releases that slot).
_LEAVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
local mine = redis.call('HGET', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return mine or false
"""

# Free a slot and hand it to the first waiter, unless the replica is out of rotation (down, or its circuit
# open: waiters then find another replica or are held). KEYS: waiting, info, granted, health, circuit, slots;
# ARGV: now, token, name, max_concurrency.
_RELEASE = (
    _DRAIN
    + """
redis.call('ZREM', KEYS[6], ARGV[2])
if redis.call('HGET', KEYS[4], 'state') == 'down' or redis.call('HGET', KEYS[5], 'state') == 'open' then
  return 0
end
drain(tonumber(ARGV[1]), 6, 3)
return 1
"""
)


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
class Waiter:
    """A job's place in a waiting line: ``token`` becomes its slot's token when granted; lower ``rank`` first;
    ``channel`` is where its process hears of the grant; the place lapses ``ttl`` seconds after its last renewal."""

    token: str
    rank: float
    channel: str
    lease_seconds: float
    ttl: float


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
        self._wait = r.register_script(_WAIT)
        self._leave = r.register_script(_LEAVE)
        self._release = r.register_script(_RELEASE)

    @staticmethod
    def _slots(service: str, name: str) -> str:
        return f"jobgate:replica:{service}:{name}:inflight"

    @staticmethod
    def _health(service: str, name: str) -> str:
        return f"jobgate:replica:{service}:{name}:health"

    @staticmethod
    def _circuit(service: str, name: str) -> str:
        return f"jobgate:replica:{service}:{name}:circuit"

    @staticmethod
    def _line(service: str) -> list[str]:
        """The waiting line's keys: ranks, waiter info, grants not yet taken."""
        return [f"jobgate:waiting:{service}", f"jobgate:waiting:{service}:info", f"jobgate:waiting:{service}:granted"]

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
        """Take one of the replica's max_concurrency slots until ``now + lease_seconds``, unless jobs already
        wait in the service's line (they come first)."""
        keys = [self._slots(service, replica.name), self._line(service)[0]]
        return bool(self._acquire(keys=keys, args=[now, now + lease_seconds, replica.max_concurrency, token]))

    def release(self, service: str, replica: ReplicaConfig, token: str, now: float) -> None:
        """Free the slot held by ``token``; the first job waiting in the line takes it at once."""
        keys = [*self._line(service), self._health(service, replica.name), self._circuit(service, replica.name)]
        keys.append(self._slots(service, replica.name))
        self._release(keys=keys, args=[now, token, replica.name, replica.max_concurrency])

    def drop(self, service: str, name: str, token: str) -> None:
        """Free a slot without handing it on (its replica is no longer configured)."""
        self.r.zrem(self._slots(service, name), token)

    def wait_in_line(self, service: str, waiter: Waiter, replicas: list[ReplicaConfig], now: float) -> str | None:
        """Join the service's waiting line (or renew the place held there) and hand what is free of
        ``replicas`` to the line's head; the name of the replica whose slot this waiter now holds, if any."""
        info = json.dumps({"channel": waiter.channel, "expires": now + waiter.ttl, "lease": waiter.lease_seconds})
        keys = [*self._line(service), *(self._slots(service, rep.name) for rep in replicas)]
        args: list[Any] = [now, waiter.token, waiter.rank, info]
        for rep in replicas:
            args += [rep.name, rep.max_concurrency]
        granted = self._wait(keys=keys, args=args)
        return granted.decode() if isinstance(granted, bytes) else None

    def leave_line(self, service: str, token: str) -> str | None:
        """Leave the waiting line; the replica whose slot was granted meanwhile (to release), if any."""
        granted = self._leave(keys=self._line(service), args=[token])
        return granted.decode() if isinstance(granted, bytes) else None

    def waiting(self, service: str) -> list[str]:
        """The tokens waiting in the service's line, first in line first."""
        return [m.decode() for m in self.r.zrange(self._line(service)[0], 0, -1)]  # type: ignore[union-attr]

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
