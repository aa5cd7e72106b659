"""How a job ends: each terminal transition and its effect on the ledger, in one transaction.

The transition is guarded (see jobs.transition), so a duplicate or stale message that loses the race
changes neither the job nor the credits: effects happen exactly once.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from gateway_core import deadletters
from gateway_core.credits import release, settle
from gateway_core.deadletters import DEAD_LETTER_CODES
from gateway_core.errors import JobFinishedError
from gateway_core.jobs import get_job, transition
from gateway_core.models import Job
from gateway_core.pricing import charge
from gateway_core.settings import ServiceConfig
from gateway_core.states import TERMINAL, JobState

S = JobState


def succeed(
    session: Session, job: Job, svc: ServiceConfig | None, output: dict[str, Any], usage: dict[str, Any]
) -> Job | None:
    """SUCCEEDED with its result; capture what it cost, release the rest of the reservation."""
    done = transition(
        session,
        job,
        S.SUCCEEDED,
        detail={"outcome": "succeeded"},
        values={"result": {"output": output, "usage": usage}},
    )
    if done is not None:
        settle(session, done, charge(svc, done.credits_reserved, done.audio_seconds, usage))
    return done


def fail(session: Session, job: Job, code: str, message: str, *, detail: dict[str, Any] | None = None) -> Job | None:
    """FAILED for good, with a stable code; the whole reservation goes back."""
    done = transition(
        session,
        job,
        S.FAILED,
        detail=detail,
        values={"error_code": code, "error_message": message, "lease_expires_at": None},
    )
    if done is not None:
        release(session, done)
        if code in DEAD_LETTER_CODES:
            deadletters.record(session, done)
    return done


def hold(
    session: Session, job: Job, *, now: datetime, retry_in: float, max_hold: float, replicas: dict[str, str]
) -> Job | None:
    """No replica can take the job: HELD until ``now + retry_in`` (beat re-sends it from the database), or
    FAILED with NO_REPLICA_AVAILABLE once it has waited ``max_hold`` seconds. Attempts are not consumed."""
    held_since = job.held_since or now
    if (now - held_since).total_seconds() >= max_hold:
        return fail(
            session,
            job,
            "NO_REPLICA_AVAILABLE",
            f"no replica could take the job for {max_hold:g} s",
            detail={"outcome": "no_replica", "replicas": replicas},
        )
    schedule = {
        "held_since": held_since,
        "next_attempt_at": now + timedelta(seconds=retry_in),
        "enqueued_at": None,
        "lease_expires_at": None,
    }
    if job.state == S.PROCESSING:
        # Taken over from a worker that died mid-call, and no replica can take it now: the lost attempt
        # sends it back to QUEUED (as a failed attempt would), from where it is held like any queued job.
        requeued = transition(
            session, job, S.QUEUED, now=now, detail={"outcome": "worker_lost"}, values={"lease_expires_at": None}
        )
        if requeued is None:
            return None
        job = requeued
    if job.state == S.HELD:  # still held: move the next try, without another event
        res = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.state == S.HELD, Job.attempts == job.attempts)
            .values(updated_at=now, **schedule)
            .execution_options(synchronize_session=False)
        )
        return session.get(Job, job.id, populate_existing=True) if res.rowcount == 1 else None  # type: ignore[attr-defined]
    return transition(
        session, job, S.HELD, now=now, values=schedule, detail={"outcome": "no_replica", "replicas": replicas}
    )


def cancel(session: Session, job_id: str, tenant_id: int) -> Job:
    """CANCELED at the client's request; the reservation goes back. A worker still calling a replica
    for it finds the job moved on and records nothing."""
    for _ in range(3):  # a worker may move the job between our read and our guarded update
        job = get_job(session, job_id, tenant_id=tenant_id)
        if job.state in TERMINAL:
            raise JobFinishedError(f"job {job_id} already ended {job.state}", details={"status": job.state.value})
        done = transition(session, job, S.CANCELED, detail={"outcome": "canceled"})
        if done is not None:
            release(session, done)
            return done
        session.expire(job)
    raise JobFinishedError(f"job {job_id} kept changing; try again", details={"id": job_id})


def deadline_left(job: Job, deadline_seconds: float | None, now: datetime) -> float | None:
    """Seconds left before the job's overall deadline (its service's deadline_seconds); None without one."""
    if deadline_seconds is None:
        return None
    return deadline_seconds - (now - job.created_at).total_seconds()


def fail_past_deadline(session: Session, job: Job, deadline_seconds: float | None, now: datetime) -> bool:
    """Fail the job with DEADLINE_EXCEEDED when its overall deadline has passed; True when it did."""
    left = deadline_left(job, deadline_seconds, now)
    if left is None or left > 0:
        return False
    message = f"not done within the service's deadline of {deadline_seconds:g} s after submit"
    fail(session, job, "DEADLINE_EXCEEDED", message, detail={"outcome": "deadline", "attempts": job.attempts})
    return True
