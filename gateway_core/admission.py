"""Admission: whether a job may enter, decided and recorded in one transaction under the tenant's row lock —
idempotent replay, concurrency cap, quotas, credits reserved, job created. Rate limits run before this,
in the web layer (flask-limiter on Redis)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Integer, bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gateway_core.credits import check_affordable, reservation
from gateway_core.db import Database, write_together
from gateway_core.errors import (
    ConcurrencyLimitError,
    IdempotencyKeyReusedError,
    NotFoundError,
    NotRetriableError,
    QuotaExceededError,
)
from gateway_core.jobs import Dispatcher, get_job, loaded, new_job, send_committed, transition
from gateway_core.models import ACTIVE_SQL, Job, Tenant, utcnow
from gateway_core.pricing import estimate
from gateway_core.settings import Settings, TierConfig
from gateway_core.states import JobState
from gateway_core.tenants import TIER_PRIORITY
from gateway_core.usage import PeriodUsage, count_usage, usage_now

IDEMPOTENCY_WINDOW = timedelta(hours=24)


@dataclass
class JobInput:
    service: str
    request: dict[str, Any]
    audio: bytes | None = None
    audio_content_type: str | None = None
    audio_seconds: float | None = None


@dataclass
class Admitted:
    job: Job
    replayed: bool  # an earlier request with the same Idempotency-Key created it


def limits_of(tenant: Tenant, tier: TierConfig) -> dict[str, int | None]:
    """The tenant's effective limits: its own overrides, else its tier's."""
    return {
        "concurrency": tenant.concurrency_limit or tier.concurrency,
        "daily_credits": tenant.daily_credit_quota if tenant.daily_credit_quota is not None else tier.daily_credits,
        "monthly_credits": (
            tenant.monthly_credit_quota if tenant.monthly_credit_quota is not None else tier.monthly_credits
        ),
        "daily_jobs": tenant.daily_job_quota if tenant.daily_job_quota is not None else tier.daily_jobs,
        "monthly_jobs": tenant.monthly_job_quota if tenant.monthly_job_quota is not None else tier.monthly_jobs,
    }


def active_jobs_column(tenant_id: Any) -> Any:
    return (
        select(func.count())
        .select_from(Job)
        .where(Job.tenant_id == tenant_id, ACTIVE_SQL)  # the partial index's own predicate: it is used
        .scalar_subquery()
    )


def active_jobs(session: Session, tenant_id: int) -> int:
    return int(session.scalar(select(active_jobs_column(tenant_id))) or 0)


# Built once: the same statement for every admission, so SQLAlchemy compiles it once.
_TENANT = bindparam("tenant_id", type_=Integer)
_LOCK_AND_READ = (
    select(Tenant, active_jobs_column(_TENANT))
    .where(Tenant.id == _TENANT)
    .with_for_update(of=Tenant)
    .execution_options(populate_existing=True)
)


def _lock_and_read(session: Session, tenant_id: int, now: datetime) -> tuple[Tenant, int, dict[str, PeriodUsage]]:
    """Lock the tenant and read its active jobs and usage in one statement (one round trip)."""
    row = session.execute(_LOCK_AND_READ, {"tenant_id": tenant_id}).one_or_none()
    if row is None:
        raise NotFoundError(f"no tenant {tenant_id}", details={"tenant_id": tenant_id})
    return row[0], int(row[1]), usage_now(row[0], now)


def _replay(session: Session, tenant_id: int, key: str, request_hash: str, now: datetime) -> Job | None:
    job = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))
    if job is None:
        return None
    if job.created_at < now - IDEMPOTENCY_WINDOW:  # expired: the key is free again
        session.execute(update(Job).where(Job.id == job.id).values(idempotency_key=None))
        return None
    if job.request_hash != request_hash:
        raise IdempotencyKeyReusedError(
            "this Idempotency-Key was used with a different request",
            details={"idempotency_key": key, "job_id": job.id},
        )
    return job


def _check_quotas(limits: dict[str, int | None], usage: dict[str, Any], cost: int) -> None:
    for period in ("day", "month"):
        prefix = "daily" if period == "day" else "monthly"
        used = usage[period]
        for what, used_now, adding in (("jobs", used.jobs, 1), ("credits", used.credits, cost)):
            limit = limits[f"{prefix}_{what}"]
            if limit is not None and used_now + adding > limit:
                raise QuotaExceededError(
                    f"{prefix} {what} quota of {limit} reached ({used_now} used)",
                    details={"quota": f"{prefix}_{what}", "limit": limit, "used": used_now, "requested": adding},
                )


def _check_room(settings: Settings, tenant: Tenant, active: int, usage: dict[str, PeriodUsage], cost: int) -> None:
    """Raise why one more job of ``cost`` credits may not enter now: concurrency cap, quotas, credits."""
    limits = limits_of(tenant, settings.tiers[tenant.tier])
    cap = limits["concurrency"]
    if cap is not None and active >= cap:
        raise ConcurrencyLimitError(
            f"{active} jobs already in progress; the limit is {cap}", details={"limit": cap, "active": active}
        )
    _check_quotas(limits, usage, cost)
    check_affordable(tenant, cost)


def admit(
    session: Session,
    settings: Settings,
    *,
    tenant_id: int,
    job_input: JobInput,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> Admitted:
    """Admit a job or raise why not (409/422 idempotency, 429 concurrency or quota, 402 credits)."""
    now = utcnow()
    tenant, active, usage = _lock_and_read(session, tenant_id, now)
    if idempotency_key and request_hash:
        earlier = _replay(session, tenant_id, idempotency_key, request_hash, now)
        if earlier is not None:
            return Admitted(earlier, replayed=True)
    svc = settings.services[job_input.service]
    cost = estimate(svc, job_input.request, job_input.audio_seconds)
    _check_room(settings, tenant, active, usage, cost)
    job, job_writes = new_job(
        tenant_id=tenant_id,
        service=job_input.service,
        request=job_input.request,
        input_data=job_input.audio,
        input_content_type=job_input.audio_content_type,
        audio_seconds=job_input.audio_seconds,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        credits_reserved=cost,
        priority=TIER_PRIORITY.get(tenant.tier, 6),
        now=now,
    )
    # The job, its events, the reservation and the usage: one round trip after the locked read.
    count_usage(tenant, now, jobs=1, credits=cost)
    write_together(session, job_writes + reservation(tenant, job.id, cost, now))
    return Admitted(loaded(session, job), replayed=False)


def submit(
    db: Database,
    settings: Settings,
    dispatcher: Dispatcher,
    *,
    tenant_id: int,
    job_input: JobInput,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> Admitted:
    """Admit a job in its own transaction and send it once committed (the job row is its own outbox: a send
    the broker refuses is left to the sweeper); a replayed Idempotency-Key returns the earlier job, unsent."""

    def admit_once() -> Admitted:
        with db.transaction() as s:
            return admit(
                s,
                settings,
                tenant_id=tenant_id,
                job_input=job_input,
                idempotency_key=idempotency_key,
                request_hash=request_hash,
            )

    try:
        admitted = admit_once()
    except IntegrityError:
        if idempotency_key is None:
            raise
        admitted = admit_once()  # a concurrent twin with the same Idempotency-Key committed first: replay it
    if not admitted.replayed:
        send_committed(db, dispatcher, admitted.job)
    return admitted


def reopen(session: Session, tenant: Tenant, job: Job, credits: int, *, detail: dict[str, Any]) -> Job | None:
    """Send an ended job (FAILED or CANCELED) back to QUEUED for a new round of attempts under the same id,
    with ``credits`` reserved again (``tenant`` locked by the caller); None when it moved meanwhile. Counted in
    the usage of the job's own day and month, where its settlement gives back what it did not use (dropped when
    that period has ended: the spend is in the ledger either way)."""
    now = utcnow()
    count_usage(tenant, job.created_at, jobs=1, credits=credits)
    write_together(session, reservation(tenant, job.id, credits, now))
    return transition(
        session,
        job,
        JobState.QUEUED,
        attempt=0,
        now=now,
        detail=detail,
        values={
            "error_code": None,
            "error_message": None,
            "finished_at": None,
            "credits_reserved": credits,
            "credits_charged": None,
            "enqueued_at": None,
            "held_since": None,
            "next_attempt_at": None,
            "lease_expires_at": None,
        },
    )


RETRIABLE = (JobState.FAILED, JobState.CANCELED)


def retry(db: Database, settings: Settings, dispatcher: Dispatcher, *, tenant_id: int, job_id: str) -> Job:
    """A client's retry: re-run its FAILED or CANCELED job under the same id, admitted as a new job would be
    (concurrency cap, quotas, credits reserved again at today's price), then sent once committed."""
    with db.transaction() as s:
        job = get_job(s, job_id, tenant_id=tenant_id)
        if job.state not in RETRIABLE:
            raise NotRetriableError(
                f"job {job_id} is {job.state}; only a FAILED or CANCELED job can be retried",
                details={"status": job.state.value},
            )
        svc = settings.services.get(job.service)
        if svc is None:
            raise NotRetriableError(
                f"service {job.service} is no longer configured",
                code="SERVICE_REMOVED",
                details={"service": job.service},
            )
        tenant, active, usage = _lock_and_read(s, tenant_id, utcnow())
        cost = estimate(svc, job.request, job.audio_seconds)
        _check_room(settings, tenant, active, usage, cost)
        retried = reopen(s, tenant, job, cost, detail={"outcome": "retried", "after": job.state.value})
        if retried is None:  # retried by a concurrent request between our read and our guarded update
            raise NotRetriableError(f"job {job_id} was retried already", details={"status": JobState.QUEUED.value})
    send_committed(db, dispatcher, retried)
    return retried
