"""A job's dispatch, decided in one place: claim it on a replica slot, record each attempt's outcome, and decide
what comes next (succeed, retry on another replica after a backoff, hold, fail).

The database is the only I/O here. Which replica takes a job is asked of an injected ``Chooser`` (the workers'
balancer over Redis), and the replica call itself is the caller's: it gets a ``Claimed`` job, calls, and brings
back an ``Answer`` or an ``AttemptFailed`` for ``record``.
"""

from __future__ import annotations

import enum
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session

from gateway_core import lifecycle
from gateway_core.backoff import retry_delay
from gateway_core.db import Database
from gateway_core.jobs import claimable, failed_replicas, lease_until, transition
from gateway_core.models import Job, utcnow
from gateway_core.settings import ReplicaConfig, ServiceConfig, Settings
from gateway_core.states import IN_FLIGHT, JobState

log = logging.getLogger(__name__)
S = JobState

# PostgreSQL away for a moment (a restart, a failover, a dropped connection, an exhausted pool).
DATABASE_BLIPS = (OperationalError, InterfaceError, PoolTimeoutError)


class Outcome(enum.StrEnum):
    """What one dispatch did with its job."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # for good: credits released, dead-lettered when its code says so
    RETRYING = "retrying"  # back to QUEUED, due again after a backoff (the sweeper sends it)
    HELD = "held"  # no replica available: HELD until its next try
    SKIPPED = "skipped"  # not claimable now: another worker has it, its retry is not due, or it ended
    SUPERSEDED = "superseded"  # moved on while this worker had it (canceled, or taken over after its lease)
    MISSING = "missing"  # no such job


@dataclass(frozen=True)
class Slot:
    """A slot taken on ``replica`` under ``token`` (None: taken without Redis, nothing to release)."""

    replica: ReplicaConfig
    token: str | None


@dataclass(frozen=True)
class Full:
    """Every replica in rotation is busy: the job waits for a slot to free."""


@dataclass(frozen=True)
class Unavailable:
    """No replica is in rotation (unhealthy, circuit open): the job is held. ``reasons`` by replica."""

    reasons: dict[str, str] = field(default_factory=dict)


Pick = Slot | Full | Unavailable


class Chooser(Protocol):
    """Picks the replica for a job's attempt and takes a slot on it under ``token``."""

    def pick(self, job: Job, svc: ServiceConfig, *, token: str, lease_seconds: float, avoid: set[str]) -> Pick: ...

    def release(self, service: str, slot: Slot) -> None:
        """Give back a slot that will not be used."""
        ...


@dataclass(frozen=True)
class Claimed:
    """A job in PROCESSING on ``slot``: what to send the replica and how long to wait for its answer."""

    job_id: str
    service: str
    svc: ServiceConfig
    slot: Slot
    attempt: int
    request: dict[str, Any]
    audio: tuple[str, bytes] | None  # (content type, bytes) of an uploaded input
    timeout: float
    lease_ends: float  # time.monotonic() when the job's lease runs out: past it another worker may take it over

    @property
    def replica(self) -> ReplicaConfig:
        return self.slot.replica


@dataclass(frozen=True)
class Wait:
    """Every replica in rotation is busy: wait in the service's line for a slot under ``token``, then
    ``take_granted``, which claims the job only if it is still as observed."""

    job_id: str
    service: str
    svc: ServiceConfig
    observed: tuple[JobState, int]
    attempt: int
    token: str
    priority: int
    submitted_at: datetime
    lease_seconds: float
    avoid: set[str]
    until: float | None  # epoch seconds of the job's deadline


@dataclass(frozen=True)
class Answer:
    """The replica's answer to an attempt."""

    output: dict[str, Any]
    usage: dict[str, Any]


@dataclass(frozen=True)
class AttemptFailed:
    """A failed attempt: a ``retriable`` one sends the job to another replica after a backoff, the rest fail it."""

    code: str
    message: str
    retriable: bool
    status: int | None = None  # the replica's HTTP status, when it answered


def claim(db: Database, settings: Settings, job_id: str, chooser: Chooser) -> Claimed | Wait | Outcome:
    """Move a claimable job to PROCESSING on a slot the chooser gives; or say it must wait for one; or hold,
    fail or skip it (the Outcome)."""
    now = utcnow()
    with db.transaction() as s:
        job = s.get(Job, job_id)
        if job is None:
            log.warning("dispatch of unknown job %s ignored", job_id)
            return Outcome.MISSING
        if not claimable(job, now):
            return Outcome.SKIPPED
        svc = settings.services.get(job.service)
        if svc is None:
            lifecycle.fail(s, job, "SERVICE_REMOVED", f"service {job.service} is not configured")
            return Outcome.FAILED
        if lifecycle.fail_past_deadline(s, job, svc.deadline_seconds, now):
            return Outcome.FAILED
        if job.state in IN_FLIGHT and job.attempts >= svc.max_attempts:  # its last worker died mid-attempt
            message = f"worker lost during attempt {job.attempts} of {svc.max_attempts}"
            lifecycle.fail(s, job, "WORKER_LOST", message, detail={"outcome": "worker_lost"})
            return Outcome.FAILED
        attempt = job.attempts + 1
        lease = max(r.timeout for r in svc.replicas) + settings.gateway.lease_margin_seconds
        token = f"{job_id}:{attempt}:{uuid.uuid4().hex[:8]}"
        avoid = failed_replicas(job)
        pick = chooser.pick(job, svc, token=token, lease_seconds=lease, avoid=avoid)
        if isinstance(pick, Full):
            # Waiting is not holding: a job taken over from a dead worker keeps its state until a slot frees.
            deadline = None if svc.deadline_seconds is None else job.created_at.timestamp() + svc.deadline_seconds
            observed = (job.state, job.attempts)
            return Wait(
                job_id, job.service, svc, observed, attempt, token, job.priority, job.created_at, lease, avoid, deadline
            )
        if isinstance(pick, Unavailable):
            return _hold(s, settings, job, svc, pick, now)
        claimed = _take(s, settings, job, svc, pick, attempt, now)
        if claimed is None:
            chooser.release(job.service, pick)
            return Outcome.SUPERSEDED
        return claimed


def take_granted(db: Database, settings: Settings, wait: Wait, slot: Slot, chooser: Chooser) -> Claimed | Outcome:
    """Claim a job that waited in line and was granted ``slot``, unless it moved meanwhile (canceled, or taken
    over), in which case the slot goes back."""
    with db.transaction() as s:
        job = s.get(Job, wait.job_id)
        claimed = None
        if job is not None and (job.state, job.attempts) == wait.observed:
            claimed = _take(s, settings, job, wait.svc, slot, wait.attempt, utcnow())
    if claimed is None:
        chooser.release(wait.service, slot)
        return Outcome.SUPERSEDED
    return claimed


def _hold(s: Session, settings: Settings, job: Job, svc: ServiceConfig, pick: Unavailable, now: datetime) -> Outcome:
    gw = settings.gateway
    held_for = (now - (job.held_since or now)).total_seconds()
    retry_in = min(gw.hold_retry_max_seconds, max(gw.hold_retry_seconds, held_for / 2))
    done = lifecycle.hold(s, job, now=now, retry_in=retry_in, max_hold=svc.max_hold_seconds, replicas=pick.reasons)
    if done is None:
        return Outcome.SUPERSEDED
    return Outcome.HELD if done.state == S.HELD else Outcome.FAILED


def _take(
    s: Session, settings: Settings, job: Job, svc: ServiceConfig, slot: Slot, attempt: int, now: datetime
) -> Claimed | None:
    """DISPATCHED on the slot's replica for ``attempt``, under a lease of the replica's timeout and a margin,
    then PROCESSING in the same transaction (the call follows at once); None when the job moved meanwhile."""
    replica = slot.replica
    margin = settings.gateway.lease_margin_seconds
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
    # The upload is a deferred column: read only for a job that carries one (its length is measured at submit).
    audio = None
    if processing.audio_seconds is not None and processing.input_data is not None:
        audio = (processing.input_content_type or "application/octet-stream", processing.input_data)
    lease_ends = time.monotonic() + replica.timeout + margin - (utcnow() - now).total_seconds()
    return Claimed(
        processing.id, processing.service, svc, slot, attempt, processing.request, audio, timeout, lease_ends
    )


def still_processing(db: Database, claimed: Claimed) -> bool:
    """Whether the job is still in PROCESSING for this attempt: not canceled, not taken over. A database that
    is away says nothing new: the call goes on."""
    try:
        with db.transaction() as s:
            row = s.execute(select(Job.state, Job.attempts).where(Job.id == claimed.job_id)).one_or_none()
    except DATABASE_BLIPS:
        return True
    return row is not None and row.state == S.PROCESSING and row.attempts == claimed.attempt


def record(
    db: Database, claimed: Claimed, outcome: Answer | AttemptFailed, *, sleep: Callable[[float], None] = time.sleep
) -> Outcome:
    """Record one attempt's outcome. The replica has answered, so a database that is away is waited for here,
    the answer kept in memory, until the job's lease runs out (past it another worker may take the job over;
    then the last error is raised): retrying the whole dispatch instead would find the job PROCESSING under its
    lease and leave it to be run again. An outcome that cannot be recorded for any other reason fails the job
    (credits released, dead-lettered) instead of leaving it PROCESSING for every later attempt to trip on."""
    pause = 0.2
    while True:
        try:
            return _record_once(db, claimed, outcome)
        except DATABASE_BLIPS as exc:
            if time.monotonic() + pause > claimed.lease_ends:
                log.error(
                    "outcome of job %s (attempt %d) not recorded, giving up: %s", claimed.job_id, claimed.attempt, exc
                )
                raise
            log.warning("outcome of job %s not recorded yet (%s); trying again in %.1f s", claimed.job_id, exc, pause)
            sleep(pause)
            pause = min(2 * pause, 2.0)
        except Exception as exc:
            log.exception("the outcome of job %s (attempt %d) could not be recorded", claimed.job_id, claimed.attempt)
            return _fail_unrecorded(db, claimed, exc)


def _fail_unrecorded(db: Database, claimed: Claimed, exc: Exception) -> Outcome:
    with db.transaction() as s:
        job = s.get(Job, claimed.job_id)
        if job is None or job.state != S.PROCESSING or job.attempts != claimed.attempt:
            return Outcome.SUPERSEDED
        message = f"the replica answered but its outcome could not be recorded: {exc.__class__.__name__}"
        detail = {"outcome": "not_recorded", "error": f"{exc.__class__.__name__}: {str(exc)[:500]}"}
        lifecycle.fail(s, job, "OUTCOME_NOT_RECORDED", message, detail=detail)
    return Outcome.FAILED


def _record_once(db: Database, claimed: Claimed, outcome: Answer | AttemptFailed) -> Outcome:
    """SUCCEEDED, FAILED, or back to QUEUED for another replica after a backoff."""
    svc, attempt = claimed.svc, claimed.attempt
    with db.transaction() as s:
        job = s.get(Job, claimed.job_id)
        if job is None or job.state != S.PROCESSING or job.attempts != attempt:
            return Outcome.SUPERSEDED  # the lease ran out and another worker took the job over, or it was canceled
        if isinstance(outcome, Answer):
            lifecycle.succeed(s, job, svc, outcome.output, outcome.usage)
            return Outcome.SUCCEEDED
        detail: dict[str, Any] = {
            "outcome": "replica_error",
            "code": outcome.code,
            "message": outcome.message,
            "status": outcome.status,
        }
        if not outcome.retriable:
            lifecycle.fail(s, job, outcome.code, outcome.message, detail=detail)
            return Outcome.FAILED
        if attempt >= svc.max_attempts:
            message = f"{attempt} attempts failed; last: {outcome.code}: {outcome.message}"
            lifecycle.fail(s, job, "ALL_ATTEMPTS_FAILED", message, detail=detail)
            return Outcome.FAILED
        retry_in = retry_delay(attempt, svc.retry_schedule_seconds)
        left = lifecycle.deadline_left(job, svc.deadline_seconds, utcnow())
        if left is not None and left <= retry_in:
            message = (
                f"{attempt} attempt(s) failed and the deadline of {svc.deadline_seconds:g} s comes before the next"
            )
            lifecycle.fail(s, job, "DEADLINE_EXCEEDED", message, detail=detail)
            return Outcome.FAILED
        detail["retry_in_seconds"] = round(retry_in, 3)
        # The retry waits in PostgreSQL, not in the broker: the sweeper sends it when next_attempt_at comes.
        due = utcnow() + timedelta(seconds=retry_in)
        transition(
            s,
            job,
            S.QUEUED,
            detail=detail,
            values={"lease_expires_at": None, "enqueued_at": None, "next_attempt_at": due},
        )
    return Outcome.RETRYING
