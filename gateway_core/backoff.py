"""Retry delays: exponential with jitter, capped."""

from __future__ import annotations

import random


def backoff_seconds(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before attempt ``attempt + 1``: base·2^(attempt-1), capped, jittered into its upper half."""
    delay = min(cap, base * (2 ** max(0, attempt - 1)))
    return (rng or random).uniform(delay / 2, delay)
