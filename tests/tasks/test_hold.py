"""Hold (issue 4): when no replica can take a job it waits HELD — not FAILED — in the database, and runs
as soon as one can; past the service's max hold it fails with NO_REPLICA_AVAILABLE and its credits go back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from gateway_core.models import CreditEntry, Job
from gateway_core.states import JobState
from tests.conftest import REVIVE_PORT, TenantKey, wait_state, wait_terminal
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


def test_a_replica_never_gets_more_than_its_max_concurrency(
    client: Any, worker: Any, tenant: TenantKey, db: Any, replicas: dict[str, str]
) -> None:
    ids = [
        client.post("/v1/jobs/codegen-narrow", headers=tenant.headers, json={"prompt": str(i)}).json["id"]
        for i in range(4)
    ]
    jobs = [wait_terminal(db, job_id, timeout=60) for job_id in ids]
    assert all(j.state == S.SUCCEEDED for j in jobs)
    assert any(S.HELD in [e.to_state for e in j.events] for j in jobs)  # waited for the slot, then ran
    assert httpx.get(f"{replicas['narrow']}/stats").json()["max_in_flight"] == 1
