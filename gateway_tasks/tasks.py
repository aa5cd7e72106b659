"""Celery tasks: dispatch a job to a replica (idempotent, bounded) and sweep jobs no message drives."""

from __future__ import annotations

import functools
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import redis
from celery import Task, shared_task
from sqlalchemy import func, select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session

from gateway_core import lifecycle
from gateway_core.backoff import retry_delay
from gateway_core.deadletters import DEAD_LETTER_CODES
from gateway_core.jobs import (
    claimable,
    failed_replicas,
    jobs_to_resend,
    lease_until,
    mark_enqueued,
    transition,
)
from gateway_core.models import Job, utcnow
from gateway_core.settings import ReplicaConfig, ServiceConfig
from gateway_core.states import IN_FLIGHT, JobState
from gateway_tasks.alerts import SEND_TASK, deliver, raise_alert
from gateway_tasks.balancer import choose, in_rotation
from gateway_tasks.celery_app import WorkerContext
from gateway_tasks.publish import DISPATCH_TASK, empty_queues, publish_dispatch
from gateway_tasks.replicas import ReplicaError, build_payload, call_replica
from gateway_tasks.waiting import rank, wait_for_slot

log = logging.getLogger(__name__)
S = JobState


def _ctx(task: Task) -> WorkerContext:
    ctx: WorkerContext = task.app.jobgate
    ctx.refresh()
    return ctx


@shared_task(
    bind=True,
    name=DISPATCH_TASK,
    # Only infrastructure blips are retried by Celery; replica failures are the job's own attempts.
    autoretry_for=(OperationalError, InterfaceError, PoolTimeoutError, redis.ConnectionError, redis.TimeoutError),
    retry_backoff=True,
    retry_backoff_max=20,
    max_retries=8,
)
def dispatch_job(self: Task, job_id: str, service: str | None = None) -> str:
    """Claim the job, call one replica, and record the outcome; a message for a job that moved on does nothing.

    ``service`` is only for routing (celeryconfig.dispatch_router); the job row says what to do.
    """
    ctx = _ctx(self)
    result = _dispatch(self, ctx, job_id)
    if result == "failed":
        _alert_if_dead_lettered(self, ctx, job_id)
    return result


def _alert_if_dead_lettered(task: Task, ctx: WorkerContext, job_id: str) -> None:
    with ctx.db.transaction() as s:
        job = s.get(Job, job_id)
        if job is None or job.error_code not in DEAD_LETTER_CODES:
            return
        message = f"job {job.id} failed for good: {job.error_code}: {job.error_message}"
        detail = {"job_id": job.id, "tenant_id": job.tenant_id, "code": job.error_code}
        service = job.service
    raise_alert(task.app, ctx.redis, ctx.settings.alerts, "job_failed", service, message, detail)


def _dispatch(self: Task, ctx: WorkerContext, job_id: str) -> str:
    claim = _claim(ctx, job_id)
    if isinstance(claim, str):
        return claim
    name, replica, token = claim.service, claim.replica, claim.token
    started = time.monotonic()
    outcome: dict[str, Any] | ReplicaError
    try:
        try:
            outcome = call_replica(ctx.http, replica, claim.payload, timeout=claim.timeout)
            _feed_circuit(self, ctx, name, replica.name, ok=True, latency=time.monotonic() - started)
        except ReplicaError as err:
            outcome = err
            if err.code == "REPLICA_UNREACHABLE":
                ctx.registry.mark_down(name, replica.name)
            if err.retriable:
                answered = err.status is not None
                latency = time.monotonic() - started if answered else None
                _feed_circuit(self, ctx, name, replica.name, ok=False, latency=latency)
    finally:
        _release(ctx, name, replica, token)
    return _record(self, ctx, job_id, claim.svc, claim.attempt, outcome, claim.lease_ends)


def _release(ctx: WorkerContext, service: str, replica: ReplicaConfig, token: str | None) -> None:
    """Free the slot (the first job waiting for one takes it); a slot Redis cannot free now frees itself when
    its lease runs out, and must not cost the job its outcome. No token: no slot was taken (Redis was away)."""
    if token is None:
        return
    try:
        ctx.registry.release(service, replica, token, time.time())
    except redis.RedisError as exc:
        log.warning("slot of %s/%s not released (%s); it frees itself at its lease's end", service, replica.name, exc)


def _feed_circuit(
    task: Task, ctx: WorkerContext, service: str, replica: str, *, ok: bool, latency: float | None
) -> None:
    """Real traffic feeds each replica's circuit breaker and recent latency; an opening is alerted."""
    try:
        cfg = ctx.settings.circuit_for(service)
        if ctx.registry.record_outcome(service, replica, ok, cfg, time.time(), latency) == "opened":
            log.warning("circuit of replica %s/%s opened", service, replica)
            rate = (
                f" or {cfg.error_rate_threshold:.0%} of its jobs in {cfg.window_seconds:g} s"
                if cfg.error_rate_threshold
                else ""
            )
            raise_alert(
                task.app,
                ctx.redis,
                ctx.settings.alerts,
                "circuit_open",
                service,
                f"replica {replica} failed {cfg.failure_threshold} jobs in a row{rate}; out of rotation for "
                f"{cfg.cooldown_seconds:g} s, then trial jobs",
                {"replica": replica},
            )
    except redis.RedisError as exc:  # the breaker is advisory; a job must not fail because Redis did
        log.warning("circuit state unavailable: %s", exc)


def _claim(ctx: WorkerContext, job_id: str) -> str | _Claimed:
    """Move a claimable job to PROCESSING on a replica slot, waiting for one while the service's replicas are
    all busy; or hold, fail, or skip it (returns why)."""
    while True:
        step = _try_claim(ctx, job_id)
        if not isinstance(step, _Wait):
            return step
        replica = wait_for_slot(
            ctx.registry,
            ctx.grants,
            step.service,
            token=step.token,
            rank=step.rank,
            lease_seconds=step.lease_seconds,
            configured=step.svc.replicas,
            in_rotation=functools.partial(
                in_rotation,
                ctx.registry,
                step.service,
                step.svc,
                avoid=step.avoid,
                cooldown=ctx.settings.circuit_for(step.service).cooldown_seconds,
                zone=ctx.settings.gateway.zone,
            ),
            until=step.until,
        )
        if replica is None:
            continue  # no replica in rotation any more, or past the deadline: decided on the next round
        with ctx.db.transaction() as s:
            job = s.get(Job, job_id)
            claimed = None
            if job is not None and (job.state, job.attempts) == step.observed:
                claimed = _take(ctx, s, job, step.svc, replica, step.token, step.attempt, utcnow())
        if claimed is None:  # canceled or taken over while it waited
            _release(ctx, step.service, replica, step.token)
            return "superseded"
        return claimed


@dataclass(frozen=True)
class _Wait:
    """Every replica in rotation is busy: wait in the service's line, then claim if the job has not moved."""

    service: str
    svc: ServiceConfig
    observed: tuple[JobState, int]
    attempt: int
    token: str
    rank: float
    lease_seconds: float
    avoid: set[str]
    until: float | None


def _try_claim(ctx: WorkerContext, job_id: str) -> str | _Wait | _Claimed:
    settings = ctx.settings
    now = utcnow()
    with ctx.db.transaction() as s:
        job = s.get(Job, job_id)
        if job is None:
            log.warning("dispatch of unknown job %s ignored", job_id)
            return "missing"
        if not claimable(job, now):
            return f"skipped:{job.state}"
        svc = settings.services.get(job.service)
        if svc is None:
            lifecycle.fail(s, job, "SERVICE_REMOVED", f"service {job.service} is not configured")
            return "failed"
        if lifecycle.fail_past_deadline(s, job, svc.deadline_seconds, now):
            return "failed"
        if job.state in IN_FLIGHT and job.attempts >= svc.max_attempts:  # its last worker died mid-attempt
            message = f"worker lost during attempt {job.attempts} of {svc.max_attempts}"
            lifecycle.fail(s, job, "WORKER_LOST", message, detail={"outcome": "worker_lost"})
            return "failed"
        attempt = job.attempts + 1
        lease = max(r.timeout for r in svc.replicas) + settings.gateway.lease_margin_seconds
        token = f"{job_id}:{attempt}:{uuid.uuid4().hex[:8]}"
        avoid = failed_replicas(job)
        choice = choose(
            ctx.registry,
            job.service,
            svc,
            token=token,
            lease_seconds=lease,
            avoid=avoid,
            cooldown=settings.circuit_for(job.service).cooldown_seconds,
            key=str(job.tenant_id),
            zone=settings.gateway.zone,
        )
        if choice.busy:
            deadline = None if svc.deadline_seconds is None else job.created_at.timestamp() + svc.deadline_seconds
            return _Wait(
                job.service,
                svc,
                (job.state, job.attempts),
                attempt,
                token,
                rank(job.priority, job.created_at),
                lease,
                avoid,
                deadline,
            )
        if choice.replica is None:
            gw = settings.gateway
            held_for = (now - (job.held_since or now)).total_seconds()
            retry_in = min(gw.hold_retry_max_seconds, max(gw.hold_retry_seconds, held_for / 2))
            done = lifecycle.hold(
                s, job, now=now, retry_in=retry_in, max_hold=svc.max_hold_seconds, replicas=choice.reasons
            )
            return "held" if done is not None and done.state == S.HELD else "failed"
        claimed = _take(ctx, s, job, svc, choice.replica, choice.token, attempt, now)
        if claimed is None:
            _release(ctx, job.service, choice.replica, choice.token)
            return "lost-race"
        return claimed


@dataclass(frozen=True)
class _Claimed:
    """A job in PROCESSING on a slot of ``replica`` held under ``token``: what to send and how long to wait."""

    service: str
    svc: ServiceConfig
    replica: ReplicaConfig
    token: str | None
    attempt: int
    payload: dict[str, Any]
    timeout: float
    lease_ends: float  # time.monotonic() when the job's lease runs out


def _take(
    ctx: WorkerContext,
    s: Session,
    job: Job,
    svc: ServiceConfig,
    replica: ReplicaConfig,
    token: str | None,
    attempt: int,
    now: datetime,
) -> _Claimed | None:
    """DISPATCHED on ``replica`` for ``attempt``, under a lease of the replica's timeout and a margin, then
    PROCESSING in the same transaction (the call follows at once); None when the job moved meanwhile."""
    margin = ctx.settings.gateway.lease_margin_seconds
    dispatched = transition(
        s,
        job,
        S.DISPATCHED,
        replica=replica.name,
        attempt=attempt,
        detail={"reclaimed": True} if job.state in IN_FLIGHT else None,
        now=now,
        values={
            "lease_expires_at": lease_until(now, replica.timeout + margin),
            "dispatched_at": job.dispatched_at or now,
            "held_since": None,
            "next_attempt_at": None,
        },
    )
    if dispatched is None:
        return None
    started = utcnow()
    processing = transition(s, dispatched, S.PROCESSING, now=started, values={"started_at": job.started_at or started})
    if processing is None:
        return None
    left = lifecycle.deadline_left(processing, svc.deadline_seconds, started)
    timeout = replica.timeout if left is None else max(0.1, min(replica.timeout, left))
    payload = build_payload(processing, svc.kind)
    lease_ends = time.monotonic() + replica.timeout + margin - (utcnow() - now).total_seconds()
    return _Claimed(processing.service, svc, replica, token, attempt, payload, timeout, lease_ends)


# PostgreSQL or Redis away for a moment (a restart, a failover, a dropped connection, an exhausted pool).
TRANSIENT_ERRORS = (OperationalError, InterfaceError, PoolTimeoutError, redis.ConnectionError, redis.TimeoutError)


def _record(
    task: Task,
    ctx: WorkerContext,
    job_id: str,
    svc: ServiceConfig,
    attempt: int,
    outcome: dict[str, Any] | ReplicaError,
    lease_ends: float,
) -> str:
    """Record one attempt's outcome. The replica has answered, so a database or Redis that is away is waited
    for here, the answer kept in memory, until the job's lease runs out (past it another worker may take the
    job over): retrying the task instead would find the job PROCESSING under its lease and leave it to be run
    again. An outcome that cannot be recorded
    for any other reason fails the job (credits released, dead-lettered, alerted) instead of leaving it
    PROCESSING for every later attempt to trip on."""
    give_up = lease_ends
    pause = 0.2
    while True:
        try:
            return _record_outcome(task, ctx, job_id, svc, attempt, outcome)
        except TRANSIENT_ERRORS as exc:
            if time.monotonic() + pause > give_up:
                log.error("outcome of job %s (attempt %d) not recorded, giving up: %s", job_id, attempt, exc)
                raise  # the task is retried; the sweeper takes the job over when its lease runs out
            log.warning("outcome of job %s not recorded yet (%s); trying again in %.1f s", job_id, exc, pause)
            time.sleep(pause)
            pause = min(2 * pause, 2.0)
        except Exception as exc:
            log.exception("the outcome of job %s (attempt %d) could not be recorded", job_id, attempt)
            return _fail_unrecorded(ctx, job_id, attempt, exc)


def _fail_unrecorded(ctx: WorkerContext, job_id: str, attempt: int, exc: Exception) -> str:
    with ctx.db.transaction() as s:
        job = s.get(Job, job_id)
        if job is None or job.state != S.PROCESSING or job.attempts != attempt:
            return "superseded"
        message = f"the replica answered but its outcome could not be recorded: {exc.__class__.__name__}"
        detail = {"outcome": "not_recorded", "error": f"{exc.__class__.__name__}: {str(exc)[:500]}"}
        lifecycle.fail(s, job, "OUTCOME_NOT_RECORDED", message, detail=detail)
    return "failed"


def _record_outcome(
    task: Task,
    ctx: WorkerContext,
    job_id: str,
    svc: ServiceConfig,
    attempt: int,
    outcome: dict[str, Any] | ReplicaError,
) -> str:
    """Record one attempt's outcome: SUCCEEDED, FAILED, or back to QUEUED for another replica after a backoff."""
    retry_in: float | None = None
    with ctx.db.transaction() as s:
        job = s.get(Job, job_id)
        if job is None or job.state != S.PROCESSING or job.attempts != attempt:
            return "superseded"  # the lease ran out and another worker took the job over, or it was canceled
        if isinstance(outcome, dict):
            lifecycle.succeed(s, job, svc, outcome["output"], outcome.get("usage") or {})
            return "succeeded"
        detail: dict[str, Any] = {
            "outcome": "replica_error",
            "code": outcome.code,
            "message": outcome.message,
            "status": outcome.status,
        }
        if not outcome.retriable:
            lifecycle.fail(s, job, outcome.code, outcome.message, detail=detail)
            return "failed"
        if attempt >= svc.max_attempts:
            message = f"{attempt} attempts failed; last: {outcome.code}: {outcome.message}"
            lifecycle.fail(s, job, "ALL_ATTEMPTS_FAILED", message, detail=detail)
            return "failed"
        retry_in = retry_delay(attempt, svc.retry_schedule_seconds)
        left = lifecycle.deadline_left(job, svc.deadline_seconds, utcnow())
        if left is not None and left <= retry_in:
            message = (
                f"{attempt} attempt(s) failed and the deadline of {svc.deadline_seconds:g} s comes before the next"
            )
            lifecycle.fail(s, job, "DEADLINE_EXCEEDED", message, detail=detail)
            return "failed"
        detail["retry_in_seconds"] = round(retry_in, 3)
        # The retry waits in PostgreSQL, not in the broker: the sweeper sends it when next_attempt_at comes.
        due = utcnow() + timedelta(seconds=retry_in)
        values = {"lease_expires_at": None, "enqueued_at": None, "next_attempt_at": due}
        transition(s, job, S.QUEUED, detail=detail, values=values)
    return "retrying"


@shared_task(bind=True, name="jobgate.sweep_jobs", ignore_result=True)
def sweep_jobs(self: Task) -> int:
    """The one scheduler of delayed work: send jobs committed but never published, retries whose time has
    come, held jobs due for another try, jobs whose message the broker lost, and in-flight jobs whose worker's
    lease ran out."""
    ctx = _ctx(self)
    gw = ctx.settings.gateway
    services = ctx.settings.services
    # A job still QUEUED a visibility timeout after it was sent, while its service's queue is empty, has
    # lost its message (a queue with messages may just be long: re-sending from it would duplicate a backlog).
    try:
        empty = empty_queues(self.app, [ctx.settings.queue_for(name) for name in services])
    except Exception as exc:  # the broker is away: the sends below fail too, and the next sweep tries again
        log.warning("could not read the queues' lengths: %s", exc)
        empty = set()
    idle = [name for name in services if ctx.settings.queue_for(name) in empty]
    now = utcnow()
    sent: list[str] = []
    with ctx.db.transaction() as s:
        # Sent and marked under the rows' locks: another sweeper skips them, and a crash before the commit
        # leaves them unmarked, to be sent again (a duplicate message finds nothing to claim).
        for job in jobs_to_resend(
            s,
            unsent_before=now - timedelta(seconds=gw.sweep_unsent_after_seconds),
            resent_before=now - timedelta(seconds=gw.visibility_timeout_seconds),
            now=now,
            idle_services=idle,
        ):
            if not publish_dispatch(self.app, job.id, job.service, priority=job.priority):
                break  # the broker is away: the next sweep tries again
            sent.append(job.id)
        if sent:
            mark_enqueued(s, *sent)
        held_long = s.execute(
            select(Job.service, func.count())
            .where(Job.state == S.HELD, Job.held_since < now - timedelta(seconds=ctx.settings.alerts.held_age_seconds))
            .group_by(Job.service)
        ).all()
    for service, count in held_long:
        age = ctx.settings.alerts.held_age_seconds
        raise_alert(
            self.app,
            ctx.redis,
            ctx.settings.alerts,
            "held_too_long",
            service,
            f"{count} job(s) held for over {age:g} s",
            {"held_jobs": count},
        )
    if sent:
        log.info("sweeper sent %d job(s)", len(sent))
    return len(sent)


@shared_task(bind=True, name="jobgate.probe_replicas", ignore_result=True)
def probe_replicas(self: Task) -> dict[str, str]:
    """GET every replica's /health at once and count the results against the thresholds (seed 002)."""
    ctx = _ctx(self)
    cfg = ctx.settings.gateway.health
    targets = [(name, rep) for name, svc in ctx.settings.services.items() for rep in svc.replicas]

    def probe(rep: ReplicaConfig) -> bool:
        try:
            return ctx.http.get(f"{rep.base_url}/health", timeout=cfg.timeout_seconds).status_code == 200
        except httpx.HTTPError:
            return False

    with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
        results = list(pool.map(probe, [rep for _, rep in targets]))
    states: dict[str, str] = {}
    down: dict[str, list[bool]] = {}
    for (service, rep), ok in zip(targets, results, strict=True):
        states[f"{service}/{rep.name}"] = state = ctx.registry.record_probe(service, rep.name, ok, cfg)
        down.setdefault(service, []).append(state == "down")
    for service, flags in down.items():
        if all(flags):
            raise_alert(
                self.app,
                ctx.redis,
                ctx.settings.alerts,
                "no_healthy_replica",
                service,
                f"all {len(flags)} replica(s) of {service} are failing their health checks",
                {},
            )
    return states


@shared_task(
    bind=True,
    name=SEND_TASK,
    autoretry_for=(OSError, httpx.HTTPError),
    retry_backoff=True,
    max_retries=5,
    ignore_result=True,
)
def send_alert(self: Task, alert: dict[str, Any]) -> list[str]:
    """Deliver one admin alert by email and webhook."""
    ctx = _ctx(self)
    return deliver(ctx.settings.alerts, ctx.http, alert)
