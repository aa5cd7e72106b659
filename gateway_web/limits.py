"""Rate limits (seed 001/002) with flask-limiter on Redis, shared by every gateway instance:

- tier: per tenant, the tier's windows (e.g. free 10/minute;100/hour;1000/day) over all API routes, each
  request weighing its endpoint's cost (a submit its service's cost_weight, a read rate_limits.read_cost);
- endpoint: per tenant and service, where the service sets rate_limit;
- global: all tenants together.

Every limited response carries RateLimit-Limit / -Remaining / -Reset (seconds); a 429 names the limit
hit and carries Retry-After. When Redis is unreachable the limits hold per process (in-memory
fallback); credits and concurrency are decided in the database and do not depend on Redis.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response
from flask_limiter import Limiter, RateLimitExceeded

from gateway_core.settings import Settings
from gateway_web.auth import principal
from gateway_web.errors import error_response

SCOPES = ("tier", "endpoint", "global")


def _tenant_key() -> str:
    return f"tenant:{principal().tenant_id}"


def make_limiter(app: Flask, settings: Settings) -> Limiter:
    rl = settings.rate_limits
    limiter = Limiter(
        key_func=_tenant_key,
        storage_uri=settings.redis_url,
        storage_options={"socket_connect_timeout": 0.5, "socket_timeout": 0.5},  # type: ignore[dict-item]
        strategy="moving-window",
        key_prefix="jobgate",
        headers_enabled=False,  # set below in the IETF RateLimit-* form
        in_memory_fallback_enabled=rl.in_memory_fallback,
        enabled=rl.enabled,
    )
    limiter.init_app(app)
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
