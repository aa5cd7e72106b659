"""What a job costs in credits: estimated at submit, charged at success (never more than reserved)."""

from __future__ import annotations

from typing import Any

from gateway_core.settings import PricingConfig, ServiceConfig


def price(pricing: PricingConfig, units: float) -> int:
    """``max(minimum, int(units * rate + 0.5))`` — for audio seconds at 5.555556 this is seed 003's formula."""
    return max(pricing.minimum, int(units * pricing.rate + 0.5))


def estimate(svc: ServiceConfig, request: dict[str, Any], audio_seconds: float | None) -> int:
    """Credits to reserve: audio priced by its measured duration, token services by max_tokens."""
    p = svc.pricing
    if p.unit == "audio_second":
        return price(p, audio_seconds or 0.0)
    if p.unit == "token":
        return price(p, float(request.get("max_tokens") or 0))
    return price(p, 1)


def charge(svc: ServiceConfig | None, reserved: int, audio_seconds: float | None, usage: dict[str, Any]) -> int:
    """Credits to capture on success, capped at the reservation.

    Audio is charged by the duration the gateway measured (never a client's or replica's figure); token
    services by the replica's reported completion_tokens when it reports them, else the reservation."""
    if svc is None:
        return reserved
    p = svc.pricing
    if p.unit == "audio_second" and audio_seconds is not None:
        return min(reserved, price(p, audio_seconds))
    tokens = usage.get("completion_tokens")
    if p.unit == "token" and isinstance(tokens, int | float) and not isinstance(tokens, bool) and tokens >= 0:
        return min(reserved, price(p, float(tokens)))
    return reserved
