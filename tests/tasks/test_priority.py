"""Priority (issue 4, item 8): under contention enterprise jobs start before pro before free — Celery
message priorities (Redis priority steps; RabbitMQ x-max-priority), on both brokers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import PRIORITY_QUEUE, make_tenant, wait_terminal
from tests.procs import start_worker


def test_enterprise_before_pro_before_free(
    client: Any, worker: Any, worker_env: dict[str, str], db: Any, tmp_path: Path
) -> None:
    ids = {}
    for tier in ("free", "pro", "enterprise"):  # they arrive in the worst order, while no worker is free
        tenant = make_tenant(db, tier=tier)
        resp = client.post("/v1/jobs/codegen-priority", headers=tenant.headers, json={"prompt": tier})
        assert resp.status_code == 202
        ids[tier] = resp.json["id"]
    busy = start_worker(worker_env, [PRIORITY_QUEUE], tmp_path / "priority-worker.log", concurrency=1)
    try:
        jobs = {tier: wait_terminal(db, job_id, timeout=30) for tier, job_id in ids.items()}
    finally:
        busy.stop()
    assert sorted(jobs, key=lambda tier: jobs[tier].started_at) == ["enterprise", "pro", "free"]
