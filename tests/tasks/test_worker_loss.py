"""A worker SIGKILLed in the middle of a job: the job still ends once, the tenant's slot comes back."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from gateway_core.models import CreditEntry
from gateway_core.states import JobState
from tests.conftest import ISOLATED_QUEUE, make_tenant, wait_state, wait_terminal
from tests.procs import start_worker

S = JobState


def test_killed_worker_neither_loses_the_job_nor_locks_the_tenant_out(
    client: Any, worker: Any, worker_env: dict[str, str], db: Any, tmp_path: Path
) -> None:
    tenant = make_tenant(db, concurrency_limit=1)
    doomed = start_worker(worker_env, [ISOLATED_QUEUE], tmp_path / "doomed.log", concurrency=1)
    rescuer = None
    try:
        job_id = client.post("/v1/jobs/codegen-isolated", headers=tenant.headers, json={"prompt": "x"}).json["id"]
        wait_state(db, job_id, S.PROCESSING, 20)  # the replica takes 4 s: the worker is mid-call
        doomed.signal(signal.SIGKILL)  # the whole worker, parent and pool child
        doomed.popen.wait(10)

        locked = client.post("/v1/jobs/codegen-isolated", headers=tenant.headers, json={"prompt": "y"})
        assert locked.status_code == 429 and locked.json["error"]["code"] == "CONCURRENCY_LIMIT"

        rescuer = start_worker(worker_env, [ISOLATED_QUEUE], tmp_path / "rescuer.log", concurrency=1)
        job = wait_terminal(db, job_id, timeout=60)  # lease runs out, the sweeper re-sends, the rescuer takes it
        assert job.state == S.SUCCEEDED and job.attempts == 2
        states = [e.to_state for e in job.events]
        assert states.count(S.PROCESSING) == 2 and states.count(S.SUCCEEDED) == 1
        assert any((e.detail or {}).get("reclaimed") for e in job.events)
        with db.transaction() as s:
            kinds = [e.kind for e in s.query(CreditEntry).filter_by(job_id=job_id).order_by(CreditEntry.id)]
        assert kinds == ["reserve", "capture"]  # charged once

        again = client.post("/v1/jobs/codegen-isolated", headers=tenant.headers, json={"prompt": "z"})
        assert again.status_code == 202, again.json
        assert wait_terminal(db, again.json["id"], timeout=30).state == S.SUCCEEDED
    finally:
        doomed.stop()
        if rescuer is not None:
            rescuer.stop()
