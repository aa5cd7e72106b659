"""Dead letters (seed 000's fourth error state, seed 003's DLQ): jobs that failed for good for a reason an
operator can act on, kept in the database (Redis has no dead-letter queue), listed and replayed by admins."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway_core.admission import reopen
from gateway_core.credits import lock_tenant
from gateway_core.db import Database
from gateway_core.errors import InvalidRequestError, NotFoundError
from gateway_core.jobs import Dispatcher, send_committed
from gateway_core.models import DeadLetter, Job, utcnow
from gateway_core.pricing import estimate
from gateway_core.settings import Settings
from gateway_core.states import JobState

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
    its credits again (402 when the tenant is short); an admin's, so the tenant's caps and quotas do not apply."""
    letter = session.get(DeadLetter, letter_id)
    if letter is None:
        raise NotFoundError(f"no dead letter {letter_id}", details={"id": letter_id})
    job = session.get(Job, letter.job_id)
    if letter.replayed_at is not None or job is None or job.state != JobState.FAILED:
        raise InvalidRequestError(f"dead letter {letter_id} was already replayed", code="ALREADY_REPLAYED")
    replayed = reopen(
        session,
        lock_tenant(session, job.tenant_id),
        job,
        credits,
        detail={"outcome": "replayed", "dead_letter": letter_id},
    )
    if replayed is None:  # replayed by another admin between our read and our guarded update
        raise InvalidRequestError(f"dead letter {letter_id} was already replayed", code="ALREADY_REPLAYED")
    letter.replayed_at = utcnow()
    return replayed


def replay_and_send(db: Database, settings: Settings, dispatcher: Dispatcher, letter_id: int) -> Job:
    """The replay command: re-open a dead-lettered job with its credits reserved again at today's price,
    commit, and send it."""
    with db.transaction() as s:
        letter = s.get(DeadLetter, letter_id)
        svc = settings.services.get(letter.service) if letter else None
        if letter is not None and svc is None:
            raise InvalidRequestError(f"service {letter.service} is no longer configured", code="SERVICE_REMOVED")
        job = s.get(Job, letter.job_id) if letter else None
        cost = estimate(svc, job.request, job.audio_seconds) if svc and job else 0
        job = replay(s, letter_id, cost)
    send_committed(db, dispatcher, job)
    return job
