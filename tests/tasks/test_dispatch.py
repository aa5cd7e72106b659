"""The dispatch task against real replicas: failover, final failure, duplicates, the sweeper, dead workers."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Any

import httpx
import redis
from sqlalchemy import update

from gateway_core import lifecycle
from gateway_core.jobs import create_job, jobs_to_resend, mark_enqueued, send_committed, transition
from gateway_core.models import Job, utcnow
from gateway_core.settings import Settings
from gateway_core.states import JobState
from gateway_tasks.celery_app import create_celery
from gateway_tasks.publish import empty_queues, publish_dispatch
from gateway_tasks.registry import Registry
from tests.conftest import TenantKey, until, wait_message_handled, wait_state, wait_terminal

S = JobState


def _submit(client: Any, tenant: TenantKey, service: str, prompt: str = "sort numbers") -> str:
    resp = client.post(f"/v1/jobs/{service}", headers=tenant.headers, json={"prompt": prompt})
    assert resp.status_code == 202, resp.json
    return str(resp.json["id"])


def _processed(replica_url: str, job_id: str) -> int:
    return int(httpx.get(f"{replica_url}/stats").json()["processed"].get(job_id, 0))


def test_failing_replica_fails_over_to_a_healthy_one(client: Any, worker: Any, tenant: TenantKey, db: Any) -> None:
    # Two jobs: round-robin sends at least one first attempt to the replica that always fails.
    jobs = [wait_terminal(db, _submit(client, tenant, "codegen-flaky")) for _ in range(2)]
    assert all(j.state == S.SUCCEEDED and j.replica == "codegen-b" for j in jobs)
    failed_over = [j for j in jobs if j.attempts == 2]
    assert failed_over, "neither job was tried on the failing replica first"
    events = [(e.to_state.value, e.replica, (e.detail or {}).get("outcome")) for e in failed_over[0].events]
    assert events == [
        ("RECEIVED", None, None),
        ("QUEUED", None, None),
        ("DISPATCHED", "flaky", None),
        ("PROCESSING", "flaky", None),
        ("QUEUED", "flaky", "replica_error"),
        ("DISPATCHED", "codegen-b", None),
        ("PROCESSING", "codegen-b", None),
        ("SUCCEEDED", "codegen-b", "succeeded"),
    ]
    error = failed_over[0].events[4].detail
    assert error["code"] == "REPLICA_ERROR" and error["status"] == 503 and error["retry_in_seconds"] > 0


def test_a_retry_waits_in_the_database_and_the_sweeper_sends_it_when_due(
    client: Any, worker: Any, tenant: TenantKey, db: Any, settings: Settings
) -> None:
    job_id = _submit(client, tenant, "codegen-later")

    def first_attempt_failed() -> Job | None:
        with db.transaction() as s:
            job = s.get(Job, job_id)
            return job if job is not None and job.state == S.QUEUED and job.attempts == 1 else None

    job = until(first_attempt_failed, 20, "the first attempt failed")
    assert job.next_attempt_at is not None and job.next_attempt_at > utcnow() + timedelta(minutes=29)
    wait_message_handled(settings, "codegen-later", job_id)  # no countdown in the broker, none in a worker
    with db.transaction() as s:  # its time comes
        s.execute(update(Job).where(Job.id == job_id).values(next_attempt_at=utcnow()))
    job = wait_terminal(db, job_id)
    assert job.state == S.FAILED and job.error_code == "ALL_ATTEMPTS_FAILED" and job.attempts == 2


def test_a_late_sent_mark_does_not_hide_a_retry_already_scheduled(tenant: TenantKey, db: Any) -> None:
    """The web marks a job sent after publishing; a worker may have run it, failed and scheduled a retry first."""
    with db.transaction() as s:
        sent = create_job(s, tenant_id=tenant.tenant_id, service="codegen", request={"prompt": "x"})
    with db.transaction() as s:  # the worker's attempt fails before the web's mark lands
        job = s.get(Job, sent.id)
        job = transition(s, job, S.DISPATCHED, replica="codegen-a", attempt=1)
        job = transition(s, job, S.PROCESSING)
        now = utcnow()
        transition(s, job, S.QUEUED, values={"enqueued_at": None, "next_attempt_at": now})
    assert send_committed(db, lambda job_id, service, *, priority: True, sent)
    with db.transaction() as s:
        job = s.get(Job, sent.id)
        assert job.enqueued_at is None  # still the sweeper's to send
        due = jobs_to_resend(s, unsent_before=now, now=now + timedelta(seconds=1))
        assert sent.id in [j.id for j in due]


def test_all_replicas_failing_ends_in_failed_with_every_attempt(
    client: Any, worker: Any, tenant: TenantKey, db: Any, settings: Settings
) -> None:
    job_id = _submit(client, tenant, "codegen-down")
    job = wait_terminal(db, job_id)
    max_attempts = settings.services["codegen-down"].max_attempts
    assert job.state == S.FAILED and job.attempts == max_attempts
    assert job.error_code == "ALL_ATTEMPTS_FAILED"
    failures = [e for e in job.events if (e.detail or {}).get("outcome") == "replica_error"]
    assert [e.attempt for e in failures] == list(range(1, max_attempts + 1))
    assert {e.replica for e in failures} == {"down-1", "down-2"}  # failover alternates replicas

    got = client.get(f"/v1/jobs/{job_id}?include=events", headers=tenant.headers).json
    assert got["status"] == "FAILED" and got["error"]["code"] == "ALL_ATTEMPTS_FAILED" and got["result"] is None
    assert [e["to_state"] for e in got["events"]][-1] == "FAILED"


def test_redelivered_dispatch_messages_do_not_run_a_job_twice(
    client: Any, worker: Any, tenant: TenantKey, db: Any, settings: Settings, replicas: dict[str, str]
) -> None:
    celery = create_celery(settings)
    # While the slow replica works on it, the same message arrives twice more.
    job_id = _submit(client, tenant, "codegen-slow")
    wait_state(db, job_id, S.PROCESSING)
    assert publish_dispatch(celery, job_id, "codegen-slow") and publish_dispatch(celery, job_id, "codegen-slow")
    job = wait_terminal(db, job_id)
    assert job.state == S.SUCCEEDED
    # ... and once more after it finished.
    assert publish_dispatch(celery, job_id, "codegen-slow")
    wait_message_handled(settings, "codegen-slow", job_id)
    job = wait_terminal(db, job_id)
    assert [e.to_state for e in job.events].count(S.PROCESSING) == 1
    assert [e.to_state for e in job.events][-1] == S.SUCCEEDED
    assert _processed(replicas["slow"], job_id) == 1


def test_sweeper_sends_a_job_committed_but_never_published(worker: Any, tenant: TenantKey, db: Any) -> None:
    with db.transaction() as s:  # as if the web process died between commit and publish
        job_id = create_job(s, tenant_id=tenant.tenant_id, service="codegen", request={"prompt": "x"}).id
    job = wait_terminal(db, job_id, timeout=30)
    assert job.state == S.SUCCEEDED and job.enqueued_at is not None


def test_a_message_the_broker_lost_is_sent_again_once_its_queue_is_empty(
    worker: Any, tenant: TenantKey, db: Any, settings: Settings
) -> None:
    now = utcnow()
    window = timedelta(seconds=settings.gateway.resend_lost_after_seconds)
    with db.transaction() as s:  # sent a while ago, but the broker lost it (say a Redis without persistence)
        job_id = create_job(s, tenant_id=tenant.tenant_id, service="codegen", request={"prompt": "x"}).id
        mark_enqueued(s, job_id, now=now - window - timedelta(seconds=1))
        due = dict(unsent_before=now, lost_before=now - window, now=now)
        assert job_id not in [j.id for j in jobs_to_resend(s, **due)]  # a long queue may still hold it
        assert job_id not in [j.id for j in jobs_to_resend(s, **due, idle_services=["codegen"], in_hand=[job_id])]
        assert job_id in [j.id for j in jobs_to_resend(s, **due, idle_services=["codegen"])]
    job = wait_terminal(db, job_id, timeout=30)  # the sweeper finds svc.codegen empty and sends it
    assert job.state == S.SUCCEEDED and job.attempts == 1


def test_empty_queues_counts_only_messages_waiting(settings: Settings) -> None:
    app = create_celery(settings)
    name = f"jobgate.test-{uuid.uuid4().hex[:8]}"
    with app.connection_for_write() as conn:
        queue = conn.SimpleQueue(name)
        try:
            queue.put({"job": "x"})
            assert empty_queues(app, [name, f"{name}-never-declared"]) == {f"{name}-never-declared"}
            queue.get(timeout=5).ack()
            assert empty_queues(app, [name]) == {name}
        finally:
            queue.close()
            conn.default_channel.queue_delete(name)


def _orphan(db: Any, tenant: TenantKey, attempt: int, *, processing: bool, service: str = "codegen") -> str:
    """A job whose worker took it in flight and died: its lease has run out, nothing drives it."""
    with db.transaction() as s:
        job = create_job(s, tenant_id=tenant.tenant_id, service=service, request={"prompt": "x"})
        past = utcnow() - timedelta(seconds=1)
        job = transition(
            s,
            job,
            S.DISPATCHED,
            replica="codegen-a",
            attempt=attempt,
            values={"lease_expires_at": past, "enqueued_at": past - timedelta(minutes=5)},
        )
        if processing:
            job = transition(s, job, S.PROCESSING)
        return str(job.id)


def test_a_job_taken_over_when_no_replica_can_take_it_is_held(
    worker: Any, tenant: TenantKey, db: Any, settings: Settings
) -> None:
    # The service's one replica has no server: marked down now, as probes or a refused call would.
    Registry(redis.Redis.from_url(settings.redis_url)).mark_down("codegen-revive", "revive")
    job_id = _orphan(db, tenant, 1, processing=True, service="codegen-revive")
    try:
        job = wait_state(db, job_id, S.HELD, timeout=30)
        assert [(e.from_state, e.to_state) for e in job.events][-2:] == [(S.PROCESSING, S.QUEUED), (S.QUEUED, S.HELD)]
        assert job.attempts == 1 and job.next_attempt_at is not None  # the lost attempt counts; it waits
    finally:
        with db.transaction() as s:
            lifecycle.cancel(s, job_id, tenant.tenant_id)  # leaves nothing held behind for later tests


def test_job_of_a_dead_worker_is_reclaimed_after_its_lease(worker: Any, tenant: TenantKey, db: Any) -> None:
    job_id = _orphan(db, tenant, 1, processing=True)
    job = wait_terminal(db, job_id, timeout=30)
    assert job.state == S.SUCCEEDED and job.attempts == 2
    reclaim = [e for e in job.events if (e.detail or {}).get("reclaimed")]
    assert len(reclaim) == 1 and reclaim[0].from_state == S.PROCESSING


def test_a_job_reclaimed_while_every_slot_is_busy_waits_in_line_and_is_not_sent_again_meanwhile(
    worker: Any, tenant: TenantKey, db: Any, settings: Settings, replicas: dict[str, str]
) -> None:
    """A dead worker's job is taken over while the service's one slot is busy: it waits in line (no hold, no
    illegal PROCESSING -> HELD), and the sweeper, which sends again a lost message of the same age, leaves it
    alone because a live worker holds its message; the freed slot then runs it, once."""
    service = "codegen-narrow"
    narrow = settings.services[service].replicas[0]
    registry = Registry(redis.Redis.from_url(settings.redis_url))
    busy = f"test-busy-{uuid.uuid4().hex[:8]}"
    # Another call holds the only slot (once an earlier test's call has freed it).
    until(lambda: registry.acquire(service, narrow, busy, 60, time.time()), 30, "the narrow replica's slot")
    jobs: list[str] = []
    try:
        orphan = _orphan(db, tenant, 1, processing=True, service=service)
        jobs.append(orphan)
        until(lambda: any(t.startswith(orphan) for t in registry.waiting(service)), 20, "the reclaimed job in line")
        with db.transaction() as s:
            sent_at = s.get(Job, orphan).enqueued_at
            # A message of the same age that the broker lost: nothing holds it, the queue is empty.
            lost = create_job(s, tenant_id=tenant.tenant_id, service=service, request={"prompt": "lost"}).id
            mark_enqueued(s, lost, now=sent_at)
        jobs.append(lost)

        def resent() -> bool:
            with db.transaction() as s:
                return bool(s.get(Job, lost).enqueued_at != sent_at)

        until(resent, 60, "the lost message sent again")
        with db.transaction() as s:
            job = s.get(Job, orphan)
            assert job.enqueued_at == sent_at, "a job waiting in a worker's hands was sent again"
            assert job.state == S.PROCESSING and S.HELD not in [e.to_state for e in job.events]
        registry.release(service, narrow, busy, time.time())
        ended = [wait_terminal(db, job_id, timeout=30) for job_id in jobs]
        assert [j.state for j in ended] == [S.SUCCEEDED, S.SUCCEEDED]
        assert [e.to_state for e in ended[0].events][-4:] == [S.PROCESSING, S.DISPATCHED, S.PROCESSING, S.SUCCEEDED]
        assert ended[0].attempts == 2 and ended[1].attempts == 1
        assert [_processed(replicas["narrow"], job_id) for job_id in jobs] == [1, 1]
    finally:
        registry.release(service, narrow, busy, time.time())
        with db.transaction() as s:
            for job_id in jobs:
                if s.get(Job, job_id).state not in (S.SUCCEEDED, S.FAILED, S.CANCELED):
                    lifecycle.cancel(s, job_id, tenant.tenant_id)


def test_reclaim_with_no_attempts_left_fails_the_job(
    worker: Any, tenant: TenantKey, db: Any, settings: Settings
) -> None:
    job_id = _orphan(db, tenant, settings.services["codegen"].max_attempts, processing=False)
    job = wait_terminal(db, job_id, timeout=30)
    assert job.state == S.FAILED and job.error_code == "WORKER_LOST"
    with db.transaction() as s:
        assert s.get(Job, job_id).lease_expires_at is None


def test_submit_while_the_broker_is_down_is_accepted_and_sent_by_the_sweeper(
    settings: Settings, worker: Any, tenant: TenantKey, db: Any
) -> None:
    from gateway_web import create_app
    from tests.procs import free_port

    broker_down = create_app(settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"}))
    started = time.monotonic()
    resp = broker_down.test_client().post("/v1/jobs/codegen", headers=tenant.headers, json={"prompt": "x"})
    assert resp.status_code == 202, resp.json
    assert time.monotonic() - started < 5, "a submit must not hang while the broker is away"
    with db.transaction() as s:
        assert s.get(Job, resp.json["id"]).enqueued_at is None  # committed, not yet with any broker
    # The sweeper (beat in the test worker, on the live broker) sends it.
    job = wait_terminal(db, resp.json["id"], timeout=30)
    assert job.state == S.SUCCEEDED


def test_job_of_a_service_no_longer_configured_fails_instead_of_waiting_forever(
    worker: Any, tenant: TenantKey, db: Any
) -> None:
    with db.transaction() as s:
        job_id = create_job(s, tenant_id=tenant.tenant_id, service="retired", request={"prompt": "x"}).id
    job = wait_terminal(db, job_id, timeout=30)
    assert job.state == S.FAILED and job.error_code == "SERVICE_REMOVED"
