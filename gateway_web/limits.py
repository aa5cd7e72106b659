"""Rate limits (seed 001/002) with flask-limiter on Redis, shared by every gateway instance, as sliding
window counters (two counters per limit and key, so memory and time stay constant however high a limit is):

- tier: per tenant, the tier's windows (e.g. free 10/minute;100/hour;1000/day) over all API routes, each
  request weighing its endpoint's cost (a submit its service's cost_weight, a read rate_limits.read_cost);
- endpoint: per tenant and service, where the service sets rate_limit;
- global: all tenants together.

Every limited response carries RateLimit-Limit / -Remaining / -Reset (seconds), read from the window the
limit's own check saw (no second round trip); a 429 names the limit hit and carries Retry-After. When
Redis is unreachable the limits hold per process (in-memory fallback); credits and concurrency are
decided in the database and do not depend on Redis.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response
from flask_limiter import Limiter, RateLimitExceeded
from limits.storage import RedisStorage

from gateway_core.settings import Settings
from gateway_web.auth import principal
from gateway_web.errors import error_response

SCOPES = ("tier", "endpoint", "global")


class _Seen(threading.local):
    windows: dict[str, tuple[int, float, int, float]]

    def __init__(self) -> None:
        self.windows = {}


class WindowReadingRedisStorage(RedisStorage):
    """limits' Redis storage (a registered custom backend, scheme ``jobgate+redis``) whose sliding-window
    check also returns the window it saw. That window is kept for the rest of the request (per thread,
    dropped at teardown), so describing the limit in the response headers needs no second round trip."""

    STORAGE_SCHEME = ["jobgate+redis", "jobgate+rediss", "jobgate+redis+unix"]
    # limits' acquire_sliding_window.lua, returning {acquired, previous count, previous ttl, current count,
    # current ttl} (the window after the hit) instead of a bare boolean.
    SCRIPT_ACQUIRE_AND_READ = """
local limit = tonumber(ARGV[1])
local expiry = tonumber(ARGV[2]) * 1000
local amount = tonumber(ARGV[3])
local current_ttl = tonumber(redis.call('pttl', KEYS[2]))
if current_ttl > 0 and current_ttl < expiry then
    redis.call('rename', KEYS[2], KEYS[1])
    redis.call('set', KEYS[2], 0, 'PX', current_ttl + expiry)
end
local previous_count = tonumber(redis.call('get', KEYS[1])) or 0
local previous_ttl = math.max(tonumber(redis.call('pttl', KEYS[1])) or 0, 0)
local current_count = tonumber(redis.call('get', KEYS[2])) or 0
current_ttl = math.max(tonumber(redis.call('pttl', KEYS[2])) or 0, 0)
local weighted_count = math.floor(previous_count * previous_ttl / expiry) + current_count
local acquired = 0
if amount <= limit and weighted_count + amount <= limit then
    acquired = 1
    if redis.call('exists', KEYS[2]) == 1 then
        current_count = redis.call('incrby', KEYS[2], amount)
    else
        redis.call('set', KEYS[2], amount, 'PX', expiry * 2)
        current_count = amount
        current_ttl = expiry * 2 - 1  -- as a read right after would see it (limits takes ttl % expiry)
    end
end
return {acquired, previous_count, previous_ttl, current_count, current_ttl}
"""

    def __init__(self, uri: str, **options: Any) -> None:
        super().__init__(uri.removeprefix("jobgate+"), **options)
        self._seen = _Seen()

    def initialize_storage(self, uri: str) -> None:
        super().initialize_storage(uri)
        self.lua_acquire_and_read = self.get_connection().register_script(self.SCRIPT_ACQUIRE_AND_READ.encode())

    def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        previous_key = self.prefixed_key(self._previous_window_key(key))
        current_key = self.prefixed_key(self._current_window_key(key))
        acquired, prev_count, prev_ttl, cur_count, cur_ttl = self.lua_acquire_and_read(
            [previous_key, current_key], [limit, expiry, amount]
        )
        self._seen.windows[key] = (int(prev_count), prev_ttl / 1000, int(cur_count), cur_ttl / 1000)
        return bool(acquired)

    def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        seen = self._seen.windows.pop(key, None)
        return seen if seen is not None else super().get_sliding_window(key, expiry)

    def forget(self) -> None:
        self._seen.windows.clear()


def _storage_uri(redis_url: str) -> str:
    scheme = redis_url.split("://", 1)[0]
    return f"jobgate+{redis_url}" if f"jobgate+{scheme}" in WindowReadingRedisStorage.STORAGE_SCHEME else redis_url


def _tenant_key() -> str:
    return f"tenant:{principal().tenant_id}"


def make_limiter(app: Flask, settings: Settings) -> Limiter:
    rl = settings.rate_limits
    limiter = Limiter(
        key_func=_tenant_key,
        storage_uri=_storage_uri(settings.redis_url),
        storage_options={"socket_connect_timeout": 0.5, "socket_timeout": 0.5},  # type: ignore[dict-item]
        strategy="sliding-window-counter",
        key_prefix="jobgate",
        headers_enabled=False,  # set below in the IETF RateLimit-* form
        in_memory_fallback_enabled=rl.in_memory_fallback,
        enabled=rl.enabled,
    )
    limiter.init_app(app)

    storage = limiter.storage if rl.enabled else None
    if isinstance(storage, WindowReadingRedisStorage):
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
            tier = [lim for lim in evaluated if "/tier/" in lim.key]
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
    app: Flask, settings: Settings, view: Callable[..., Any], *, weight: int, endpoint_limit: str | None
) -> Callable[..., Any]:
    """Wrap an API view in the tier, global and (if any) endpoint limits, costing ``weight`` units."""
    limiter, _ = app.extensions["jobgate_limits"]

    def tier_limit() -> str:
        return settings.tiers[principal().tier].rate_limit

    view = limiter.shared_limit(tier_limit, scope="tier", cost=weight, error_message="tier")(view)
    if endpoint_limit:
        view = limiter.limit(endpoint_limit, error_message="endpoint")(view)
    if settings.rate_limits.global_limit:
        view = limiter.shared_limit(
            settings.rate_limits.global_limit, scope="global", key_func=lambda: "all", error_message="global"
        )(view)
    return view
