"""Retry delays follow seed 003's schedule by default, jittered."""

from __future__ import annotations

import random

from gateway_core.backoff import retry_delay
from gateway_core.settings import parse_settings


def test_default_schedule_is_seed_003s_jittered_into_the_upper_half() -> None:
    svc = parse_settings({"services": {"c": {"kind": "codegen", "replicas": [{"name": "a", "url": "http://h"}]}}})
    schedule = svc.services["c"].retry_schedule_seconds
    assert schedule == [5, 15, 45]
    rng = random.Random(7)
    for attempt, expected in [(1, 5), (2, 15), (3, 45), (4, 45), (9, 45)]:
        delays = [retry_delay(attempt, schedule, rng) for _ in range(200)]
        assert all(expected / 2 <= d <= expected for d in delays)
        assert max(delays) - min(delays) > expected / 4  # jittered, not a fixed delay
