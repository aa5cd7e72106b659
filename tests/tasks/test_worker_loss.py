"""A dispatch worker SIGKILLed with many replica calls in flight: every job still ends once, charged once, and
the tenant's concurrency slots come back."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from gateway_core.models import CreditEntry, Job
from gateway_core.states import JobState
from tests.conftest import ISOLATED_QUEUE, assert_ledger_invariants, make_tenant, until, wait_terminal
from tests.procs import start_worker

S = JobState
IN_FLIGHT = 12


def test_a_worker_killed_with_many_calls_in_flight_ends_every_job_once(
    client: Any, worker: Any, worker_env: dict[str, str], db: Any, tmp_path: Path
) -> None:
    tenant = make_tenant(db, concurrency_limit=IN_FLIGHT)
    doomed = start_worker(worker_env, [ISOLATED_QUEUE], tmp_path / "doomed.log", concurrency=2 * IN_FLIGHT)
    rescuer = None
    try:
        ids = []
        for i in range(IN_FLIGHT):
            resp = client.post("/v1/jobs/codegen-crowd", headers=tenant.headers, json={"prompt": f"p{i}"})
            assert resp.status_code == 202, resp.json
            ids.append(resp.json["id"])

        def processing() -> int:
            with db.transaction() as s:
                return int(s.scalar(select(func.count()).where(Job.id.in_(ids), Job.state == S.PROCESSING)) or 0)

        until(lambda: processing() == IN_FLIGHT, 30, "every job in flight in one worker process")
        doomed.signal(signal.SIGKILL)  # the whole worker: one process holding every call
        doomed.popen.wait(10)

        locked = client.post("/v1/jobs/codegen-crowd", headers=tenant.headers, json={"prompt": "one more"})
        assert locked.status_code == 429 and locked.json["error"]["code"] == "CONCURRENCY_LIMIT"

        rescuer = start_worker(worker_env, [ISOLATED_QUEUE], tmp_path / "rescuer.log", concurrency=2 * IN_FLIGHT)
        jobs = [wait_terminal(db, job_id, timeout=90) for job_id in ids]
        for job in jobs:
            assert job.state == S.SUCCEEDED and job.attempts == 2, (job.id, job.state, job.error_code)
            states = [e.to_state for e in job.events]
            assert states.count(S.PROCESSING) == 2 and states.count(S.SUCCEEDED) == 1
            assert any((e.detail or {}).get("reclaimed") for e in job.events)
        with db.transaction() as s:
            for job_id in ids:
                kinds = [e.kind for e in s.query(CreditEntry).filter_by(job_id=job_id).order_by(CreditEntry.id)]
                assert kinds == ["reserve", "capture"], (job_id, kinds)  # charged once
        assert_ledger_invariants(db, tenant.tenant_id)

        again = client.post("/v1/jobs/codegen-crowd", headers=tenant.headers, json={"prompt": "z"})
        assert again.status_code == 202, again.json
        assert wait_terminal(db, again.json["id"], timeout=30).state == S.SUCCEEDED
    finally:
        doomed.stop()
        if rescuer is not None:
            rescuer.stop()
