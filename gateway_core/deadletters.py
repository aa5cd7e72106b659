"""Dead letters (seed 000's fourth error state, seed 003's DLQ): jobs that failed for good for a reason an
operator can act on, kept in the database (Redis has no dead-letter queue), listed and replayed by admins."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from gateway_core.credits import lock_tenant, reservation
from gateway_core.db import write_together
from gateway_core.errors import InvalidRequestError, NotFoundError
from gateway_core.models import DeadLetter, Job, JobEvent, utcnow
from gateway_core.states import JobState
from gateway_core.usage import count_usage

# Failures an operator can act on; a replica rejecting bad input (REPLICA_REJECTED) is the client's to fix.
DEAD_LETTER_CODES = frozenset(
    {
        "ALL_ATTEMPTS_FAILED",
        "NO_REPLICA_AVAILABLE",
        "WORKER_LOST",
        "SERVICE_REMOVED",
        "DEADLINE_EXCEEDED",
        "OUTCOME_NOT_RECORDED",
    }
)


def attempts_of(job: Job) -> list[dict[str, Any]]:
    """Every failed attempt of the job, from its events."""
    return [
        {"attempt": e.attempt, "replica": e.replica, "at": e.at.isoformat(), **(e.detail or {})}
        for e in job.events
        if e.detail and e.detail.get("outcome") in ("replica_error", "worker_lost", "no_replica")
    ]


def record(session: Session, job: Job) -> DeadLetter:
    """Write the failed job (in the transaction that failed it)."""
    session.flush()
    session.refresh(job, ["events"])
    letter = DeadLetter(
        job_id=job.id,
        tenant_id=job.tenant_id,
        service=job.service,
        error_code=job.error_code or "UNKNOWN",
        error_message=job.error_message or "",
        payload=job.request,
        attempts=attempts_of(job),
    )
    session.add(letter)
    return letter


def page(session: Session, *, service: str | None, before: int | None, limit: int) -> list[DeadLetter]:
    stmt = select(DeadLetter)
    if service:
        stmt = stmt.where(DeadLetter.service == service)
    if before is not None:
        stmt = stmt.where(DeadLetter.id < before)
    return list(session.scalars(stmt.order_by(DeadLetter.id.desc()).limit(limit)))


def replay(session: Session, letter_id: int, credits: int) -> Job:
    """Send a dead-lettered job back to QUEUED for a new round of attempts on the same job id, reserving
    its credits again (402 when the tenant is short). The one way out of FAILED, and only by an admin."""
    letter = session.get(DeadLetter, letter_id)
    if letter is None:
        raise NotFoundError(f"no dead letter {letter_id}", details={"id": letter_id})
    job = session.get(Job, letter.job_id)
    if letter.replayed_at is not None or job is None or job.state != JobState.FAILED:
        raise InvalidRequestError(f"dead letter {letter_id} was already replayed", code="ALREADY_REPLAYED")
    now = utcnow()
    tenant = lock_tenant(session, job.tenant_id)
    # Counted in the usage of the job's own day and month, where its settlement gives back what it did not
    # use; dropped when that period has ended (the replay's spend is in the ledger either way).
    count_usage(tenant, job.created_at, jobs=1, credits=credits)
    write_together(session, reservation(tenant, job.id, credits, now))
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == JobState.FAILED)
        .values(
            state=JobState.QUEUED,
            attempts=0,
            error_code=None,
            error_message=None,
            finished_at=None,
            credits_reserved=credits,
            credits_charged=None,
            enqueued_at=None,
            updated_at=now,
            held_since=None,
            next_attempt_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    session.add(
        JobEvent(
            job_id=job.id,
            at=now,
            from_state=JobState.FAILED,
            to_state=JobState.QUEUED,
            detail={"outcome": "replayed", "dead_letter": letter_id},
        )
    )
    letter.replayed_at = now
    session.flush()
    replayed = session.get(Job, job.id, populate_existing=True)
    assert replayed is not None
    return replayed
