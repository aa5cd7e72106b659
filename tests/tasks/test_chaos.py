"""Failures of real processes: a replica SIGKILLed under load, and a poison job that takes its worker down on
every attempt (a worker killed with many calls in flight: test_worker_loss.py)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import select

from gateway_core.models import CreditEntry, DeadLetter, Job
from gateway_core.settings import Settings
from gateway_core.states import JobState
from tests.conftest import (
    CHAOS_PORT,
    ISOLATED_QUEUE,
    Inbox,
    TenantKey,
    make_tenant,
    until,
    wait_message_handled,
    wait_terminal,
)
from tests.procs import Proc, start_replica, start_worker

S = JobState


def _submit(client: Any, tenant: TenantKey, service: str, prompt: str = "x") -> str:
    resp = client.post(f"/v1/jobs/{service}", headers=tenant.headers, json={"prompt": prompt})
    assert resp.status_code == 202, resp.json
    return str(resp.json["id"])


def _circuit(settings: Settings, replica: str) -> str:
    r = redis.Redis.from_url(settings.redis_url)
    return (r.hget(f"jobgate:replica:codegen-chaos:{replica}:circuit", "state") or b"closed").decode()


def test_a_replica_killed_under_load_loses_no_job_and_comes_back_through_its_circuit(
    client: Any, worker: Any, db: Any, settings: Settings, tmp_path: Path
) -> None:
    tenant = make_tenant(db, tier="enterprise", credits=10_000, concurrency_limit=1000)
    # Calls last 5 s: the two seen in flight are still mid-call when the kill lands (with 1 s, both could
    # finish between the look and the kill, and fewer than two jobs failed over).
    chaos, _ = start_replica(tmp_path, "codegen", "chaos", latency_ms=5000, port=CHAOS_PORT)
    revived: Proc | None = None
    try:
        # Until probes see it up, jobs go to codegen-c alone.
        until(lambda: wait_terminal(db, _submit(client, tenant, "codegen-chaos")).replica == "chaos", 30, "in rotation")
        ids = [_submit(client, tenant, "codegen-chaos", f"p{i}") for i in range(40)]

        def on_chaos() -> int:
            with db.transaction() as s:
                return len(s.scalars(select(Job.id).where(Job.replica == "chaos", Job.state == S.PROCESSING)).all())

        until(lambda: on_chaos() >= 2, 30, "two jobs in flight on the replica")
        chaos.signal(signal.SIGKILL)
        chaos.popen.wait(10)

        jobs = [wait_terminal(db, job_id, timeout=60) for job_id in ids]
        assert all(j.state == S.SUCCEEDED for j in jobs), {j.id: j.error_code for j in jobs if j.state != S.SUCCEEDED}
        failed_over = [j for j in jobs if j.attempts > 1]
        assert len(failed_over) >= 2 and all(j.replica == "codegen-c" for j in failed_over)
        assert _circuit(settings, "chaos") == "open"  # two failures in a row

        revived, _ = start_replica(tmp_path, "codegen", "chaos", port=CHAOS_PORT)
        # Probes bring it back (2 successes), the cooldown (1 s) lets a trial through, the trial closes it.
        until(lambda: wait_terminal(db, _submit(client, tenant, "codegen-chaos")).replica == "chaos", 30, "back")
        assert _circuit(settings, "chaos") == "closed"
    finally:
        chaos.stop()
        if revived is not None:
            revived.stop()


def test_a_poison_job_stops_after_its_attempts_dead_lettered_refunded_and_alerted_once(
    client: Any,
    worker: Any,
    worker_env: dict[str, str],
    db: Any,
    settings: Settings,
    tmp_path: Path,
    webhook_inbox: tuple[Inbox, str],
) -> None:
    tenant = make_tenant(db, credits=10)
    isolated = start_worker(worker_env, [ISOLATED_QUEUE], tmp_path / "isolated-0.log", concurrency=1)
    try:
        job_id = _submit(client, tenant, "codegen-poison")
        killed: set[int] = set()
        deadline = time.monotonic() + 120
        # Every attempt takes its worker down (as a crash in the call would): kill the worker each time, and
        # start another (as its supervisor would).
        while True:
            with db.transaction() as s:
                job = s.get(Job, job_id)
                assert job is not None
                state, attempts = job.state, job.attempts
            if state in (S.SUCCEEDED, S.FAILED, S.CANCELED):
                break
            if state == S.PROCESSING and attempts not in killed:
                isolated.signal(signal.SIGKILL)
                isolated.stop()
                killed.add(attempts)
                log = tmp_path / f"isolated-{len(killed)}.log"
                isolated = start_worker(worker_env, [ISOLATED_QUEUE], log, concurrency=1)
            assert time.monotonic() < deadline, f"still {state} after {sorted(killed)} kills"
            time.sleep(0.05)

        job = wait_terminal(db, job_id)
        assert job.state == S.FAILED and job.error_code == "WORKER_LOST", job.error_message
        assert killed == {1, 2, 3} and job.attempts == 3  # max_attempts, then no further try
        with db.transaction() as s:
            kinds = [e.kind for e in s.query(CreditEntry).filter_by(job_id=job_id).order_by(CreditEntry.id)]
            letters = s.scalars(select(DeadLetter).where(DeadLetter.job_id == job_id)).all()
        assert kinds == ["reserve", "release"] and len(letters) == 1  # refunded once, one dead letter
        until(lambda: webhook_inbox[0].matching(kind="job_failed", service="codegen-poison"), 20, "alert")
        wait_message_handled(settings, "codegen-poison", job_id)  # no dispatch of it is left anywhere: no loop
        assert len(webhook_inbox[0].matching(kind="job_failed", service="codegen-poison")) == 1
        assert wait_terminal(db, job_id).attempts == 3
    finally:
        isolated.stop()
