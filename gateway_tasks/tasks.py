"""Celery tasks: dispatch a job to a replica (idempotent, bounded) and sweep jobs no message drives."""

from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import gevent
import httpx
import redis
from celery import Task, shared_task
from sqlalchemy import func, select

from gateway_core import dispatch
from gateway_core.deadletters import DEAD_LETTER_CODES
from gateway_core.dispatch import DATABASE_BLIPS, Outcome
from gateway_core.jobs import jobs_to_resend, mark_enqueued
from gateway_core.models import Job, utcnow
from gateway_core.settings import ReplicaConfig
from gateway_core.states import JobState
from gateway_tasks.alerts import SEND_TASK, deliver, raise_alert
from gateway_tasks.balancer import ReplicaChooser
from gateway_tasks.celery_app import WorkerContext
from gateway_tasks.in_hand import holding
from gateway_tasks.pool import gevent_active
from gateway_tasks.publish import DISPATCH_TASK, empty_queues, publish_dispatch
from gateway_tasks.replicas import ReplicaError, build_payload, call_replica, cancel_at_replica
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
    autoretry_for=(*DATABASE_BLIPS, redis.ConnectionError, redis.TimeoutError),
    retry_backoff=True,
    retry_backoff_max=20,
    max_retries=8,
)
def dispatch_job(self: Task, job_id: str, service: str | None = None) -> str:
    """Claim the job, call one replica, and record the outcome; a message for a job that moved on does nothing.

    ``service`` is only for routing (celeryconfig.dispatch_router); the job row says what to do.
    """
    ctx = _ctx(self)
    outcome = _dispatch(self, ctx, job_id)
    if outcome is Outcome.FAILED:
        _alert_if_dead_lettered(self, ctx, job_id)
    return outcome


def _alert_if_dead_lettered(task: Task, ctx: WorkerContext, job_id: str) -> None:
    with ctx.db.transaction() as s:
        job = s.get(Job, job_id)
        if job is None or job.error_code not in DEAD_LETTER_CODES:
            return
        message = f"job {job.id} failed for good: {job.error_code}: {job.error_message}"
        detail = {"job_id": job.id, "tenant_id": job.tenant_id, "code": job.error_code}
        service = job.service
    raise_alert(task.app, ctx.redis, ctx.settings.alerts, "job_failed", service, message, detail)


def _dispatch(task: Task, ctx: WorkerContext, job_id: str) -> Outcome:
    """The I/O around gateway_core.dispatch: wait in line for a slot, call the replica, feed its circuit."""
    chooser = ReplicaChooser(ctx.registry, ctx.settings)
    claim = dispatch.claim(ctx.db, ctx.settings, job_id, chooser)
    while isinstance(claim, dispatch.Wait):
        slot = _wait_in_line(ctx, chooser, claim)
        if slot is None:  # no replica in rotation any more, or past the deadline: decided on the next round
            claim = dispatch.claim(ctx.db, ctx.settings, job_id, chooser)
        else:
            claim = dispatch.take_granted(ctx.db, ctx.settings, claim, slot, chooser)
    if isinstance(claim, Outcome):
        return claim
    service, replica = claim.service, claim.replica
    started = time.monotonic()
    try:
        result = _call_while_processing(ctx, claim)
        if result is None:  # canceled while the replica worked: it was told to stop
            return Outcome.SUPERSEDED
        if isinstance(result, dispatch.Answer):
            _feed_circuit(task, ctx, service, replica.name, ok=True, latency=time.monotonic() - started)
        else:
            err = result
            if err.code == "REPLICA_UNREACHABLE":
                ctx.registry.mark_down(service, replica.name)
            if err.retriable:
                answered = err.status is not None
                latency = time.monotonic() - started if answered else None
                _feed_circuit(task, ctx, service, replica.name, ok=False, latency=latency)
    finally:
        chooser.release(service, claim.slot)
    # A database blip is waited out in place until the lease runs out; then the task is retried and the
    # sweeper takes the job over.
    return dispatch.record(ctx.db, claim, result)


def _call(ctx: WorkerContext, claim: dispatch.Claimed) -> dispatch.Answer | ReplicaError:
    try:
        return call_replica(ctx.http, claim.replica, build_payload(claim), timeout=claim.timeout)
    except ReplicaError as err:
        return err


def _call_while_processing(ctx: WorkerContext, claim: dispatch.Claimed) -> dispatch.Answer | ReplicaError | None:
    """The replica's answer; or None, the call dropped and the replica asked to stop, as soon as the job ends
    otherwise (canceled by its client): each end is announced, and the job's greenlet wakes to look whether it
    is still this attempt's. Outside a gevent worker the call simply runs to its end."""
    if not gevent_active():
        return _call(ctx, claim)
    with ctx.ends.expecting(claim.job_id) as ended:
        call = gevent.spawn(_call, ctx, claim)
        try:
            while True:
                gevent.wait([call, ended], count=1)
                if call.ready():
                    return call.get()
                ended.clear()
                if not dispatch.still_processing(ctx.db, claim):
                    call.kill()
                    cancel_at_replica(ctx.http, claim.replica, claim.job_id)
                    log.info("job %s ended during its call to %s: call dropped", claim.job_id, claim.replica.name)
                    return None
        finally:
            if not call.ready():  # this greenlet was stopped itself (a worker shutting down): so is the call
                call.kill()


def _wait_in_line(ctx: WorkerContext, chooser: ReplicaChooser, wait: dispatch.Wait) -> dispatch.Slot | None:
    replica = wait_for_slot(
        ctx.registry,
        ctx.grants,
        wait.service,
        token=wait.token,
        rank=rank(wait.priority, wait.submitted_at),
        lease_seconds=wait.lease_seconds,
        configured=wait.svc.replicas,
        in_rotation=functools.partial(chooser.in_rotation, wait.service, wait.svc, wait.avoid),
        until=wait.until,
    )
    return None if replica is None else dispatch.Slot(replica, wait.token)


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


@shared_task(bind=True, name="jobgate.sweep_jobs", ignore_result=True)
def sweep_jobs(self: Task) -> int:
    """The one scheduler of delayed work: send jobs committed but never published, retries whose time has
    come, held jobs due for another try, jobs whose message the broker lost, and in-flight jobs whose worker's
    lease ran out."""
    ctx = _ctx(self)
    gw = ctx.settings.gateway
    services = ctx.settings.services
    # A job sent a while ago and still QUEUED, whose message no live worker holds while its service's queue is
    # empty, has lost its message (a queue with messages may just be long: re-sending from it would duplicate a
    # backlog). Neither the queues nor the workers' hands readable: no message counts as lost this time.
    lost_before: datetime | None = None
    held: set[str] = set()
    idle: list[str] = []
    try:
        empty = empty_queues(self.app, [ctx.settings.queue_for(name) for name in services])
        held = holding(ctx.redis, time.time())
        idle = [name for name in services if ctx.settings.queue_for(name) in empty]
        lost_before = utcnow() - timedelta(seconds=gw.resend_lost_after_seconds)
    except Exception as exc:  # the broker is away: the sends below fail too, and the next sweep tries again
        log.warning("could not tell which messages are lost: %s", exc)
    now = utcnow()
    sent: list[str] = []
    with ctx.db.transaction() as s:
        # Sent and marked under the rows' locks: another sweeper skips them, and a crash before the commit
        # leaves them unmarked, to be sent again (a duplicate message finds nothing to claim).
        for job in jobs_to_resend(
            s,
            unsent_before=now - timedelta(seconds=gw.sweep_unsent_after_seconds),
            now=now,
            lost_before=lost_before,
            idle_services=idle,
            in_hand=held,
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
