"""Hold: when no replica is available (unhealthy, circuit open) a job waits HELD — not FAILED — in the database,
and runs as soon as one can; past the service's max hold it fails with NO_REPLICA_AVAILABLE and its credits go
back. Busy is not down: a job whose replicas are healthy but full waits for the next free slot instead."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from gateway_core.models import CreditEntry, Job
from gateway_core.states import JobState
from tests.conftest import REVIVE_PORT, TenantKey, make_tenant, wait_state, wait_terminal
from tests.procs import BIN, Proc

S = JobState


def test_held_job_runs_when_a_replica_comes_back(
    client: Any, worker: Any, tenant: TenantKey, db: Any, tmp_path: Path
) -> None:
    job_id = client.post("/v1/jobs/codegen-revive", headers=tenant.headers, json={"prompt": "x"}).json["id"]
    # Probes (or the first refused connection) took the replica out of rotation.
    held = wait_state(db, job_id, S.HELD, 20)
    assert held.attempts <= 1 and held.held_since is not None and held.next_attempt_at is not None
    seen = {held.next_attempt_at}
    deadline = time.monotonic() + 20
    while len(seen) < 3:  # two more tries came due and found no replica: still waiting, no busy loop of events
        with db.transaction() as s:
            job = s.get(Job, job_id)
            assert job is not None and job.state == S.HELD
            seen.add(job.next_attempt_at)
            s.refresh(job, ["events"])
            assert [e.to_state for e in job.events].count(S.HELD) == 1
        assert time.monotonic() < deadline, "the held job was not tried again"
        time.sleep(0.1)

    replica = Proc(
        [str(BIN / "jobgate"), "replica", "--service", "codegen", "--name", "revive", "--port", str(REVIVE_PORT)],
        tmp_path / "revive.log",
    )
    try:
        replica.wait_for(lambda o: "listening on" in o, 30, "revived replica")
        back = time.monotonic()
        job = wait_terminal(db, job_id, timeout=30)
        resumed_in = time.monotonic() - back
        assert job.state == S.SUCCEEDED and job.replica == "revive"
        assert resumed_in < 10, f"took {resumed_in:.1f} s to resume"
        assert job.held_since is None and job.next_attempt_at is None
        states = [e.to_state for e in job.events]
        assert states[-4:] == [S.HELD, S.DISPATCHED, S.PROCESSING, S.SUCCEEDED]
        hold_event = next(e for e in job.events if e.to_state == S.HELD)
        assert hold_event.detail == {"outcome": "no_replica", "replicas": {"revive": "unhealthy"}}
    finally:
        replica.stop()


def test_held_past_the_maximum_fails_with_no_replica_available(
    client: Any, worker: Any, tenant: TenantKey, db: Any
) -> None:
    job_id = client.post("/v1/jobs/codegen-never", headers=tenant.headers, json={"prompt": "x"}).json["id"]
    job = wait_terminal(db, job_id, timeout=30)
    assert job.state == S.FAILED and job.error_code == "NO_REPLICA_AVAILABLE"
    # Probes had already taken the replica out (or the first refused connection did): holding itself
    # consumes no attempts.
    assert job.attempts <= 1
    with db.transaction() as s:
        kinds = [e.kind for e in s.query(CreditEntry).filter_by(job_id=job_id).order_by(CreditEntry.id)]
    assert kinds == ["reserve", "release"]
    got = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json
    assert got["error"]["code"] == "NO_REPLICA_AVAILABLE"


def _dispatched_at(job: Job) -> Any:
    return next(e.at for e in job.events if e.to_state == S.DISPATCHED)


def test_busy_is_not_down_a_freed_slot_starts_the_next_waiting_job_at_once_in_priority_order(
    client: Any, worker: Any, db: Any, replicas: dict[str, str]
) -> None:
    """Replica "narrow" takes one job at a time (800 ms each). Jobs that find it full are not held: they wait
    in line, without a database write, and each freed slot goes straight to the best-ranked one."""
    free, pro, enterprise = (make_tenant(db, tier=t) for t in ("free", "pro", "enterprise"))

    def submit(tenant: TenantKey, prompt: str) -> str:
        resp = client.post("/v1/jobs/codegen-narrow", headers=tenant.headers, json={"prompt": prompt})
        assert resp.status_code == 202, resp.json
        return str(resp.json["id"])

    first = submit(pro, "first")
    wait_state(db, first, (S.DISPATCHED, S.PROCESSING), 20)  # it holds the only slot
    low = [submit(free, "low-1"), submit(free, "low-2")]
    high = submit(enterprise, "high")
    jobs = {job_id: wait_terminal(db, job_id, timeout=60) for job_id in [first, *low, high]}

    assert all(j.state == S.SUCCEEDED for j in jobs.values())
    for job in jobs.values():  # waiting wrote nothing: no hold, no re-queue, one attempt
        assert [e.to_state for e in job.events] == [
            S.RECEIVED,
            S.QUEUED,
            S.DISPATCHED,
            S.PROCESSING,
            S.SUCCEEDED,
        ], job.events
    order = sorted(jobs, key=lambda job_id: _dispatched_at(jobs[job_id]))
    assert order == [first, high, *low]  # enterprise before free; free ones in the order they came
    for before, after in zip(order, order[1:], strict=False):
        ended = next(e.at for e in jobs[before].events if e.to_state == S.SUCCEEDED)
        # The slot is handed over as the call ends, before its outcome is even recorded: the next job is
        # dispatched by then, or a moment later; never a polling interval (hold retry 0.5 s, sweep 1 s) later.
        gap = (_dispatched_at(jobs[after]) - ended).total_seconds()
        assert gap < 0.3, f"job {after} started {gap:.3f} s after the slot freed"
    assert httpx.get(f"{replicas['narrow']}/stats").json()["max_in_flight"] == 1
