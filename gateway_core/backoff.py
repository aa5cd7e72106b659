"""Retry delays: a schedule (seed 003's 5 s, 15 s, 45 s by default), jittered."""

from __future__ import annotations

import random


def retry_delay(attempt: int, schedule: list[float], rng: random.Random | None = None) -> float:
    """Delay before the retry that follows attempt ``attempt`` (1-based): the schedule's entry for it, the
    last one once the schedule runs out, jittered into its upper half so retries do not arrive together."""
    delay = schedule[min(max(attempt, 1), len(schedule)) - 1]
    return (rng or random).uniform(delay / 2, delay)
