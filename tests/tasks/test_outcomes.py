"""A replica's answer is kept through a database outage that starts while the call is in flight: the worker
records it once PostgreSQL is back, and the replica never runs the job again."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
from sqlalchemy.engine import make_url

from gateway_core.models import CreditEntry
from gateway_core.states import JobState
from tests.conftest import ISOLATED_QUEUE, admin_pg, make_tenant, until, wait_state, wait_terminal
from tests.procs import Proc, start_worker

S = JobState


@contextmanager
def database_away_from(proc: Proc, database_url: str) -> Iterator[None]:
    """PostgreSQL drops the connections of ``proc`` and refuses new connections to the test database until the
    block ends (the other processes' open connections carry on)."""
    url = make_url(database_url)
    name, pg_port = url.database, url.port or 5432
    ports = [
        c.laddr.port for c in psutil.Process(proc.pid).net_connections("tcp") if c.raddr and c.raddr.port == pg_port
    ]
    admin = admin_pg()
    try:
        admin.cursor().execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        admin.cursor().execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND client_port = ANY(%s)",
            (name, ports),
        )
        yield
    finally:
        admin.cursor().execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        admin.close()


def test_an_answer_that_arrives_while_the_database_is_down_is_recorded_once_it_is_back(
    client: Any,
    worker: Any,
    worker_env: dict[str, str],
    db: Any,
    database_url: str,
    replicas: dict[str, str],
    tmp_path: Path,
) -> None:
    tenant = make_tenant(db)
    isolated = start_worker(worker_env, [ISOLATED_QUEUE], tmp_path / "isolated.log", concurrency=2)
    try:
        job_id = client.post("/v1/jobs/codegen-isolated", headers=tenant.headers, json={"prompt": "keep me"}).json["id"]
        wait_state(db, job_id, S.PROCESSING, 20)  # the replica takes 4 s
        with database_away_from(isolated, database_url):
            until(lambda: httpx.get(f"{replicas['slower']}/stats").json()["processed"].get(job_id), 20, "answered")
            # The worker has met the closed database with the answer in hand (its log says so).
            isolated.wait_for(lambda out: "not currently accepting connections" in out, 20, "record attempted")

        job = wait_terminal(db, job_id, timeout=30)
        assert job.state == S.SUCCEEDED and job.attempts == 1, (job.state, job.error_code)
        assert [e.to_state for e in job.events].count(S.PROCESSING) == 1
        assert httpx.get(f"{replicas['slower']}/stats").json()["processed"][job_id] == 1  # inference ran once
        with db.transaction() as s:
            kinds = [e.kind for e in s.query(CreditEntry).filter_by(job_id=job_id).order_by(CreditEntry.id)]
        assert kinds == ["reserve", "capture"]
    finally:
        isolated.stop()
