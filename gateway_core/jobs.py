"""Jobs: creation, guarded state transitions with their events, and what a worker may claim.

Every change here runs inside the caller's transaction and only flushes; the caller commits.
A transition is a guarded ``UPDATE … WHERE state = <observed> AND attempts = <observed>``: when a
concurrent worker or a duplicate message moved the job first, nothing matches and the caller backs off.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, cast

from sqlalchemy import Table, bindparam, false, insert, literal, or_, select, true, tuple_, update
from sqlalchemy.orm import Session, make_transient_to_detached

from gateway_core.db import Database, Writes, insert_rows, note_moved, write_together
from gateway_core.errors import NotFoundError
from gateway_core.models import Job, JobEvent, utcnow
from gateway_core.states import IN_FLIGHT, TERMINAL, JobState, check_transition

S = JobState


def new_job(
    *,
    tenant_id: int,
    service: str,
    request: dict[str, Any],
    input_data: bytes | None = None,
    input_content_type: str | None = None,
    audio_seconds: float | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    credits_reserved: int = 0,
    priority: int = 6,
    now: datetime | None = None,
) -> tuple[Job, Writes]:
    """An admitted job in QUEUED, and the statements that record it with its RECEIVED and QUEUED events
    (for ``write_together`` with whatever else the same transaction writes)."""
    now = now or utcnow()
    values: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "tenant_id": tenant_id,
        "service": service,
        "state": S.QUEUED,
        "request": request,
        "input_data": input_data,
        "input_content_type": input_content_type,
        "audio_seconds": audio_seconds,
        "attempts": 0,
        "priority": priority,
        "credits_reserved": credits_reserved,
        "idempotency_key": idempotency_key,
        "request_hash": request_hash,
        "created_at": now,
        "updated_at": now,
    }
    job = Job(**values, **dict.fromkeys(_UNSET))
    params = {f"job__{name}": value for name, value in values.items()}
    for prefix, before, after in (("received", None, S.RECEIVED), ("queued", S.RECEIVED, S.QUEUED)):
        event = {"job_id": values["id"], "at": now, "from_state": before, "to_state": after, "attempt": 0}
        params.update({f"{prefix}__{name}": value for name, value in event.items()})
    return job, Writes(list(_RECORD_JOB), params)


def create_job(session: Session, **fields: Any) -> Job:
    """Record a job in QUEUED (see ``new_job``) in one round trip; not yet sent to the broker."""
    job, writes = new_job(**fields)
    write_together(session, writes)
    return loaded(session, job)


def loaded(session: Session, job: Job) -> Job:
    """Put a job just inserted by ``new_job``'s statements into the session as if read back, without
    reading it: every column is set, its events load when asked for."""
    make_transient_to_detached(job)
    session.add(job)
    return job


_JOBS = cast(Table, Job.__table__)
_EVENTS = cast(Table, JobEvent.__table__)
_SET_AT_CREATION = (
    "id tenant_id service state request input_data input_content_type audio_seconds attempts priority "
    "credits_reserved idempotency_key request_hash created_at updated_at"
).split()
_UNSET = [c.key for c in _JOBS.columns if c.key not in _SET_AT_CREATION]  # all NULL for a new job
_EVENT_COLUMNS = ["job_id", "at", "from_state", "to_state", "attempt"]
_RECORD_JOB = (
    insert(_JOBS).values({name: bindparam(f"job__{name}", type_=_JOBS.c[name].type) for name in _SET_AT_CREATION}),
    insert_rows(_EVENTS, ["received", "queued"], _EVENT_COLUMNS),
)


def transition(
    session: Session,
    job: Job,
    to: JobState,
    *,
    replica: str | None = None,
    attempt: int | None = None,
    detail: dict[str, Any] | None = None,
    values: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> Job | None:
    """Move ``job`` from the state it was read in to ``to`` and append the event.

    Raises IllegalTransitionError when the table forbids it; returns None when the row changed
    since it was read (another worker or message got there first), the job refreshed otherwise.
    """
    observed_state, observed_attempts = job.state, job.attempts
    check_transition(observed_state, to)
    now = now or utcnow()
    new_attempts = observed_attempts if attempt is None else attempt
    changes: dict[str, Any] = {"state": to, "updated_at": now, "attempts": new_attempts, **(values or {})}
    if replica is not None:
        changes["replica"] = replica
    if to in TERMINAL:
        changes.update(finished_at=now, lease_expires_at=None)
    # RETURNING refreshes the job in the session from the row as updated: no second read.
    moved = session.scalars(
        update(Job)
        .where(Job.id == job.id, Job.state == observed_state, Job.attempts == observed_attempts)
        .values(**changes)
        .returning(Job)
        .execution_options(synchronize_session=False, populate_existing=True)
    ).one_or_none()
    if moved is None:
        return None
    note_moved(session, job.id, ended=to in TERMINAL)
    session.add(
        JobEvent(
            job_id=job.id,
            at=now,
            from_state=observed_state,
            to_state=to,
            replica=replica if replica is not None else job.replica,
            attempt=new_attempts,
            detail=detail,
        )
    )
    # Written with the session's next statement or at commit, in one batch with what else is pending.
    return moved


CLOCK_SLACK = timedelta(seconds=1)


def claimable(job: Job, now: datetime) -> bool:
    """A worker may take the job: it waits for balancing, or its worker's lease ran out."""
    if job.state == S.QUEUED:  # a retry waits for its time (a message may come early: redelivered, duplicated)
        # A second of slack: the sweeper that sent it when due may run on a clock a little ahead of ours.
        return job.next_attempt_at is None or job.next_attempt_at <= now + CLOCK_SLACK
    if job.state == S.HELD:
        return True
    return job.state in IN_FLIGHT and job.lease_expires_at is not None and job.lease_expires_at <= now


def lease_until(now: datetime, seconds: float) -> datetime:
    return now + timedelta(seconds=seconds)


def get_job(session: Session, job_id: str, *, tenant_id: int | None = None) -> Job:
    """The job, only if it belongs to tenant_id when given; NotFoundError otherwise (no existence leak)."""
    job = session.get(Job, job_id)
    if job is None or (tenant_id is not None and job.tenant_id != tenant_id):
        raise NotFoundError(f"no job {job_id}", details={"id": job_id})
    return job


class Dispatcher(Protocol):
    """Hands a job's dispatch message to the broker; False when the broker cannot take it now."""

    def __call__(self, job_id: str, service: str, *, priority: int) -> bool: ...


def send_committed(db: Database, dispatcher: Dispatcher, job: Job) -> bool:
    """Send a job whose row is committed and mark it sent; a job the broker cannot take now stays unmarked,
    and the sweeper sends it (the job row is its own outbox). The one way a committed job is sent."""
    if not dispatcher(job.id, job.service, priority=job.priority):
        return False
    with db.transaction() as s:
        # Only if the job is still as it was sent: a worker may have run it, failed, and scheduled a retry
        # (enqueued_at NULL, for the sweeper to send) before this mark lands.
        s.execute(
            update(Job)
            .where(Job.id == job.id, Job.state == S.QUEUED, Job.attempts == job.attempts, Job.enqueued_at.is_(None))
            .values(enqueued_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return True


def mark_enqueued(session: Session, *job_ids: str, now: datetime | None = None) -> None:
    """Record that the jobs' dispatch messages are with the broker (the job row is its own outbox)."""
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids))
        .values(enqueued_at=now or utcnow())
        .execution_options(synchronize_session=False)
    )


def jobs_to_resend(
    session: Session,
    *,
    unsent_before: datetime,
    now: datetime,
    lost_before: datetime | None = None,
    idle_services: Collection[str] = (),
    in_hand: Collection[str] = (),
    limit: int = 500,
) -> list[Job]:
    """Jobs no message is driving, locked (SKIP LOCKED) for the caller to send and mark in its transaction:
    committed but never handed to the broker; QUEUED for a retry whose time has come; in flight with their
    worker's lease run out; HELD and due for another try. And, when ``lost_before`` is given, jobs whose message
    was lost: sent before ``lost_before``, held by no live worker (``in_hand``), and nothing since — QUEUED while
    their service's queue holds nothing (``idle_services``: a queue with messages may just be long), or in flight
    or HELD with that message sent after their lease ran out or their try came due."""
    lost: Any = false()
    dropped: Any = false()
    if lost_before is not None:
        unheld = Job.id.not_in(list(in_hand)) if in_hand else true()
        dropped = (Job.enqueued_at < lost_before) & unheld
        if idle_services:
            lost = (Job.state == S.QUEUED) & Job.service.in_(list(idle_services)) & dropped
    stmt = (
        select(Job)
        .where(
            or_(
                (Job.state == S.QUEUED)
                & Job.enqueued_at.is_(None)
                & Job.next_attempt_at.is_(None)
                & (Job.updated_at < unsent_before),
                (Job.state == S.QUEUED) & (Job.next_attempt_at <= now) & Job.enqueued_at.is_(None),
                lost,
                Job.state.in_(list(IN_FLIGHT))
                & (Job.lease_expires_at < now)
                & (Job.enqueued_at.is_(None) | (Job.enqueued_at < Job.lease_expires_at) | dropped),
                (Job.state == S.HELD)
                & (Job.next_attempt_at <= now)
                & (Job.enqueued_at.is_(None) | (Job.enqueued_at < Job.next_attempt_at) | dropped),
            )
        )
        .order_by(Job.updated_at)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    return list(session.scalars(stmt))


@dataclass(frozen=True)
class JobFilter:
    """Which of a tenant's jobs a list shows: any of ``states`` (all when empty), one service, a created range
    (``created_after`` inclusive, ``created_before`` exclusive)."""

    states: tuple[JobState, ...] = ()
    service: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


def jobs_page(
    session: Session, tenant_id: int, flt: JobFilter, *, after: tuple[datetime, str] | None, limit: int
) -> list[Job]:
    """Up to ``limit`` of the tenant's jobs, newest first (ties by id), after the position ``after`` (the
    created_at and id of the last job of the previous page). A position, not an offset: jobs submitted while a
    client pages are newer than every page after the first, so pages neither repeat nor skip a job."""
    stmt = select(Job).where(Job.tenant_id == tenant_id)
    if flt.states:
        stmt = stmt.where(Job.state.in_(flt.states))
    if flt.service is not None:
        stmt = stmt.where(Job.service == flt.service)
    if flt.created_after is not None:
        stmt = stmt.where(Job.created_at >= flt.created_after)
    if flt.created_before is not None:
        stmt = stmt.where(Job.created_at < flt.created_before)
    if after is not None:
        at, job_id = after
        stmt = stmt.where(tuple_(Job.created_at, Job.id) < tuple_(literal(at, Job.created_at.type), literal(job_id)))
    return list(session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)))


def events_after(session: Session, job_id: str, after_id: int) -> list[JobEvent]:
    """The job's events with an id above ``after_id``, in the order they happened (ids only grow)."""
    stmt = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id).order_by(JobEvent.id)
    return list(session.scalars(stmt))


def failed_replicas(job: Job) -> set[str]:
    """Replicas whose attempt at this job failed, so failover can prefer the others."""
    if not job.attempts:  # never tried: nothing failed, and its events need not be read
        return set()
    return {ev.replica for ev in job.events if ev.replica and ev.detail and ev.detail.get("outcome") == "replica_error"}
