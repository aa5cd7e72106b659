"""Circuit breaking (issue 4, item 3): a replica failing real jobs leaves rotation after N consecutive
failures (its jobs complete on the others), is alerted, and comes back through a half-open trial."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import redis

from gateway_core.settings import Settings
from gateway_core.states import JobState
from tests.conftest import Inbox, TenantKey, wait_terminal

# Circuit breakers live in Redis: the RabbitMQ pass of the suite leaves this module out.
pytestmark = pytest.mark.broker_independent

S = JobState


def _circuit(settings: Settings) -> str:
    state = redis.Redis.from_url(settings.redis_url).hget("jobgate:replica:codegen-circuit:flippy:circuit", "state")
    return (state or b"closed").decode()


def _replicas_tried(job: Any) -> set[str]:
    return {e.replica for e in job.events if e.to_state == S.DISPATCHED}


def test_circuit_opens_on_failures_and_closes_after_a_successful_trial(
    client: Any,
    worker: Any,
    tenant: TenantKey,
    db: Any,
    settings: Settings,
    replicas: dict[str, str],
    webhook_inbox: tuple[Inbox, str],
) -> None:
    def run_one() -> Any:
        job_id = client.post("/v1/jobs/codegen-circuit", headers=tenant.headers, json={"prompt": "x"}).json["id"]
        return wait_terminal(db, job_id, timeout=30)

    jobs = []
    while _circuit(settings) != "open":
        jobs.append(run_one())
        assert len(jobs) <= 10, "the circuit never opened"
    opened = time.monotonic()
    assert all(j.state == S.SUCCEEDED and j.replica == "codegen-b" for j in jobs)  # no job lost to it

    # Jobs that end within the 6 s cooldown never try flippy (those that end later prove nothing: drop them).
    while_open = [job for job in (run_one() for _ in range(3)) if time.monotonic() - opened < 6]
    assert while_open, "three jobs took the whole cooldown"
    assert all(_replicas_tried(j) == {"codegen-b"} and j.attempts == 1 for j in while_open)
    deadline = time.monotonic() + 20
    while not webhook_inbox[0].matching(kind="circuit_open", service="codegen-circuit"):
        assert time.monotonic() < deadline, "no circuit_open alert"
        time.sleep(0.2)

    assert httpx.post(f"{replicas['flippy']}/admin/fail-rate", json={"fail_rate": 0}).status_code == 200
    deadline = time.monotonic() + 30  # past the cooldown a trial job goes to flippy, and its success closes it
    while "flippy" not in _replicas_tried(run_one()):
        assert time.monotonic() < deadline, "no trial job reached flippy after the cooldown"
    assert _circuit(settings) == "closed"


def test_an_error_rate_over_the_window_opens_the_circuit(settings: Settings) -> None:
    from gateway_core.settings import CircuitConfig
    from gateway_tasks.registry import Registry

    registry = Registry(redis.Redis.from_url(settings.redis_url))
    cfg = CircuitConfig(failure_threshold=100, error_rate_threshold=0.5, window_seconds=30, min_requests=10)
    t0 = 1_000_000.0

    def outcomes(name: str, pattern: str, start: float, step: float = 1.0) -> list[str]:
        return [registry.record_outcome("rate", name, c == "+", cfg, start + i * step) for i, c in enumerate(pattern)]

    # Never two failures in a row, but half of ten jobs failed within 30 s: open at the tenth.
    assert outcomes("r1", "+-+-+-+-+-", t0) == [""] * 9 + ["opened"]
    # 40 % failed: stays closed.
    assert "opened" not in outcomes("r2", "++-++-++-+", t0)
    # The same failures spread over windows of 30 s never reach ten jobs in one window.
    assert "opened" not in outcomes("r3", "+-+-+-+-+-+-", t0, step=7)
    # Consecutive failures still open it on their own, and a success after the cooldown closes it.
    strict = cfg.model_copy(update={"failure_threshold": 3})
    assert [registry.record_outcome("rate", "r4", False, strict, t0 + i) for i in range(3)] == ["", "", "opened"]
    assert registry.record_outcome("rate", "r4", True, strict, t0 + 10) == "closed"
