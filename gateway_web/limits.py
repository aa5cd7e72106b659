"""Rate limits (seed 001/002) with flask-limiter on Redis, shared by every gateway instance, as sliding
window counters (two counters per limit and key, so memory and time stay constant however high a limit is):

- tier: per tenant, the tier's submit windows (e.g. free 10/minute;100/hour;1000/day), a submit weighing its
  service's cost_weight (admin calls and retries weigh rate_limits.read_cost);
- read: per tenant, the tier's read windows (read_rate_limit, e.g. free 120/minute) over reads — polls, lists,
  cancels, the credits page — each weighing rate_limits.read_cost: polling never eats the submit budget;
- endpoint: per tenant and service, where the service sets rate_limit;
- global: all tenants together.

All of a request's windows are checked in one Redis round trip (``PlannedWindowsRedisStorage``). Every
limited response carries RateLimit-Limit / -Remaining / -Reset (seconds), read from the window that check
saw; a 429 names the limit hit and carries Retry-After. When
Redis is unreachable the limits hold per process (in-memory fallback); credits and concurrency are
decided in the database and do not depend on Redis.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import redis
from flask import Flask, Response
from flask_limiter import Limiter, RateLimitExceeded
from limits import RateLimitItem, parse_many
from limits.storage import RedisStorage

from gateway_core.settings import Settings
from gateway_web.auth import principal
from gateway_web.errors import error_response

SCOPES = ("tier", "read", "endpoint", "global")
BUDGETS = {"submit": "tier", "read": "read"}  # which tier limit a view draws on, by its limiter scope
KEY_PREFIX = "jobgate"


Window = tuple[int, float, int, float]  # previous count, previous ttl (s), current count, current ttl (s)
Entry = tuple[str, int, int, int]  # key, limit, expiry (s), amount


class _Seen(threading.local):
    """What this thread's current request has planned and checked (dropped at teardown)."""

    def __init__(self) -> None:
        self.plan: list[Entry] = []
        self.acquired: dict[str, bool] = {}
        self.windows: dict[str, Window] = {}


class PlannedWindowsRedisStorage(RedisStorage):
    """limits' Redis storage for sliding-window counters (a registered custom backend, scheme
    ``jobgate+redis``) that checks all of a request's windows in one round trip.

    flask-limiter asks for one window at a time. Before it does, ``limited`` hands the storage the
    request's plan: every window of its tier, endpoint and global limits, in the order flask-limiter
    takes them. The first question about a planned window runs one script over the whole plan — each
    window checked and taken as limits' own acquire_sliding_window.lua does, stopping at the first that is
    full, as flask-limiter stops — and the answers to the rest wait for their questions. The script also
    returns each window as it left it, so the RateLimit-* headers cost no round trip either. A window
    outside the plan (or past the full one, should flask-limiter still ask) is checked alone. Needs one
    Redis, not a Cluster: the windows' keys are in different slots."""

    STORAGE_SCHEME = ["jobgate+redis", "jobgate+rediss", "jobgate+redis+unix"]
    SCRIPT_ACQUIRE_ALL = """
-- KEYS: each window's previous and current counter; ARGV: each window's limit, expiry (s) and amount.
-- Returns {acquired, previous count, previous ttl, current count, current ttl} per window checked.
local out = {}
for i = 1, #KEYS / 2 do
    local previous_key, current_key = KEYS[2 * i - 1], KEYS[2 * i]
    local limit = tonumber(ARGV[3 * i - 2])
    local expiry = tonumber(ARGV[3 * i - 1]) * 1000
    local amount = tonumber(ARGV[3 * i])
    local current_ttl = tonumber(redis.call('pttl', current_key))
    if current_ttl > 0 and current_ttl < expiry then
        redis.call('rename', current_key, previous_key)
        redis.call('set', current_key, 0, 'PX', current_ttl + expiry)
    end
    local previous_count = tonumber(redis.call('get', previous_key)) or 0
    local previous_ttl = math.max(tonumber(redis.call('pttl', previous_key)) or 0, 0)
    local current_count = tonumber(redis.call('get', current_key)) or 0
    current_ttl = math.max(tonumber(redis.call('pttl', current_key)) or 0, 0)
    local weighted_count = math.floor(previous_count * previous_ttl / expiry) + current_count
    local acquired = 0
    if amount <= limit and weighted_count + amount <= limit then
        acquired = 1
        if redis.call('exists', current_key) == 1 then
            current_count = redis.call('incrby', current_key, amount)
        else
            redis.call('set', current_key, amount, 'PX', expiry * 2)
            current_count = amount
            current_ttl = expiry * 2 - 1  -- as a read right after would see it (limits takes ttl % expiry)
        end
    end
    out[i] = {acquired, previous_count, previous_ttl, current_count, current_ttl}
    if acquired == 0 then break end
end
return out
"""

    SCRIPT_WINDOW = """
-- KEYS: a window's previous and current counter; ARGV: its expiry (s). Shifts an expired current window
-- to previous, as acquiring does, and returns {previous count, previous ttl, current count, current ttl}.
local expiry = tonumber(ARGV[1]) * 1000
local current_ttl = tonumber(redis.call('pttl', KEYS[2]))
if current_ttl > 0 and current_ttl < expiry then
    redis.call('rename', KEYS[2], KEYS[1])
    redis.call('set', KEYS[2], 0, 'PX', current_ttl + expiry)
end
local previous_count, previous_ttl = redis.call('get', KEYS[1]), redis.call('pttl', KEYS[1])
return {previous_count, previous_ttl, redis.call('get', KEYS[2]), redis.call('pttl', KEYS[2])}
"""

    def __init__(self, uri: str, **options: Any) -> None:
        super().__init__(uri.removeprefix("jobgate+"), **options)
        self._seen = _Seen()

    def initialize_storage(self, uri: str) -> None:
        super().initialize_storage(uri)
        connection = self.get_connection()
        self.lua_acquire_all = connection.register_script(self.SCRIPT_ACQUIRE_ALL.encode())
        self.lua_window = connection.register_script(self.SCRIPT_WINDOW.encode())

    def window_keys(self, key: str) -> list[str]:
        """A window's previous and current counters. The braces keep both in one Redis Cluster slot, and
        the names are those limits' own Redis storage uses, so counters carry over between the two."""
        return [self.prefixed_key(f"{{{key}}}/-1"), self.prefixed_key(f"{{{key}}}")]

    def plan(self, entries: list[Entry]) -> None:
        """The windows this request's limits will ask about, in the order they will."""
        self._seen.plan = entries

    def forget(self) -> None:
        self._seen.plan, self._seen.acquired, self._seen.windows = [], {}, {}

    def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        seen = self._seen
        if key not in seen.acquired and any(entry[0] == key for entry in seen.plan):
            plan, seen.plan = seen.plan, []
            self._acquire_all(plan)
        if key not in seen.acquired:  # outside the plan, or past the full window the plan stopped at
            self._acquire_all([(key, limit, expiry, amount)])
        return seen.acquired.pop(key)

    def _acquire_all(self, entries: list[Entry]) -> None:
        keys: list[str] = []
        args: list[int] = []
        for key, limit, expiry, amount in entries:
            keys += self.window_keys(key)
            args += [limit, expiry, amount]
        for (key, *_), result in zip(entries, self.lua_acquire_all(keys, args), strict=False):
            acquired, prev_count, prev_ttl, cur_count, cur_ttl = result
            self._seen.acquired[key] = bool(acquired)
            self._seen.windows[key] = (int(prev_count), prev_ttl / 1000, int(cur_count), cur_ttl / 1000)

    def get_sliding_window(self, key: str, expiry: int) -> Window:
        seen = self._seen.windows.pop(key, None)
        if seen is not None:
            return seen
        prev_count, prev_ttl, cur_count, cur_ttl = self.lua_window(self.window_keys(key), [expiry])
        return (
            int(prev_count or 0),
            max(0.0, float(prev_ttl or 0)) / 1000,
            int(cur_count or 0),
            max(0.0, float(cur_ttl or 0)) / 1000,
        )


def _storage_uri(redis_url: str) -> str:
    scheme = redis_url.split("://", 1)[0]
    return f"jobgate+{redis_url}" if f"jobgate+{scheme}" in PlannedWindowsRedisStorage.STORAGE_SCHEME else redis_url


def _tenant_key() -> str:
    return f"tenant:{principal().tenant_id}"


def make_limiter(app: Flask, settings: Settings) -> Limiter:
    rl = settings.rate_limits
    # A bounded pool: a gevent worker may have thousands of requests in flight, and a limits check is one short
    # round trip; a request that cannot get a connection within 0.5 s counts as Redis away.
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=64, timeout=0.5, socket_connect_timeout=0.5, socket_timeout=0.5
    )
    app.extensions["jobgate"].limit_pool = pool  # closed with the app
    limiter = Limiter(
        key_func=_tenant_key,
        storage_uri=_storage_uri(settings.redis_url),
        storage_options={"connection_pool": pool},  # type: ignore[dict-item]
        strategy="sliding-window-counter",
        key_prefix=KEY_PREFIX,
        headers_enabled=False,  # set below in the IETF RateLimit-* form
        in_memory_fallback_enabled=rl.in_memory_fallback,
        # With the in-memory fallback on, a request whose storage call fails just after another one switched
        # this process to the fallback is let through (logged) rather than answered 500: many requests in
        # flight fail together. With it off, Redis being away stays an error.
        swallow_errors=rl.in_memory_fallback,
        enabled=rl.enabled,
    )
    limiter.init_app(app)

    storage = limiter.storage if rl.enabled else None
    if isinstance(storage, PlannedWindowsRedisStorage):
        app.teardown_request(lambda _: storage.forget())

    weights: dict[str, int] = {}
    app.extensions["jobgate_limits"] = (limiter, weights)

    @app.after_request
    def _headers(resp: Response) -> Response:
        if not rl.enabled:
            return resp
        try:
            # The headers describe the limit that was hit, else the tenant's own tier budget. Each limit
            # described costs a Redis round trip, so only one is.
            evaluated = limiter.current_limits
            breached = [lim for lim in evaluated if lim.breached]
            tier = [lim for lim in evaluated if "/tier/" in lim.key or "/read/" in lim.key]
            current = (breached or tier or evaluated or [None])[0]  # type: ignore[list-item]
        except Exception:  # storage went away after the check: no headers rather than a 500
            current = None
        if current is not None:
            try:
                reset = max(0, math.ceil(current.window[0] - time.time()))
                resp.headers["RateLimit-Limit"] = str(current.limit.amount)
                resp.headers["RateLimit-Remaining"] = str(max(0, current.remaining))
                resp.headers["RateLimit-Reset"] = str(reset)
                if resp.status_code == 429:
                    resp.headers["Retry-After"] = str(max(1, reset))
            except Exception:  # storage went away between the check and here: no headers rather than a 500
                pass
        return resp

    @app.errorhandler(RateLimitExceeded)
    def _limited(exc: RateLimitExceeded) -> Response:
        scope = exc.description if exc.description in SCOPES else "tier"
        item = exc.limit.limit
        return error_response(
            429,
            "RATE_LIMITED",
            f"{scope} rate limit exceeded: {item}",
            {"scope": scope, "limit": str(item), "tier": principal().tier},
        )

    return limiter


def limited(
    app: Flask,
    settings: Settings,
    view: Callable[..., Any],
    *,
    weight: int,
    endpoint_limit: str | None,
    budget: Literal["submit", "read"] = "submit",
) -> Callable[..., Any]:
    """Wrap an API view in its tier budget (submits or reads), the global and (if any) endpoint limits,
    costing ``weight`` units; each request's windows are planned for the storage first, so they are checked in
    one round trip."""
    limiter, _ = app.extensions["jobgate_limits"]
    rl = settings.rate_limits
    endpoint_scope = f"endpoint:{view.__name__}"
    tier_scope = BUDGETS[budget]

    def tier_limit() -> str:
        tier = settings.tiers[principal().tier]
        return tier.rate_limit if budget == "submit" else tier.read_rate_limit

    # (scope, limit string, key, cost) of each limit, as flask-limiter will key and charge it.
    def limits_of_request() -> list[tuple[str, str, str, int]]:
        tenant = _tenant_key()
        out = [(tier_scope, tier_limit(), tenant, weight)]
        if endpoint_limit:
            out.append((endpoint_scope, endpoint_limit, tenant, 1))
        if rl.global_limit:
            out.append(("global", rl.global_limit, "all", 1))
        return out

    view = limiter.shared_limit(tier_limit, scope=tier_scope, cost=weight, error_message=tier_scope)(view)
    if endpoint_limit:
        view = limiter.shared_limit(endpoint_limit, scope=endpoint_scope, error_message="endpoint")(view)
    if rl.global_limit:
        view = limiter.shared_limit(rl.global_limit, scope="global", key_func=lambda: "all", error_message="global")(
            view
        )
    limited_view = view

    @functools.wraps(limited_view)
    def planned(*args: Any, **kwargs: Any) -> Any:
        storage = limiter.storage if rl.enabled else None
        if isinstance(storage, PlannedWindowsRedisStorage):
            windows = [
                (item, item.key_for(KEY_PREFIX, key, scope), cost)
                for scope, text, key, cost in limits_of_request()
                for item in _parsed(text)
            ]
            # flask-limiter takes the limits by window length (a stable sort).
            windows.sort(key=lambda w: w[0].GRANULARITY.seconds)
            storage.plan([(key, item.amount, item.get_expiry(), cost) for item, key, cost in windows])
        return limited_view(*args, **kwargs)

    return planned


@functools.cache
def _parsed(text: str) -> list[RateLimitItem]:
    return parse_many(text)
