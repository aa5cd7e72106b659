"""The credits ledger. Every movement is an entry; a tenant's balance and reserved credits are kept equal
to the sums of its entries, changed only here, under a row lock on the tenant."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway_core.errors import GatewayError, InvalidRequestError, NotFoundError
from gateway_core.models import CreditEntry, Job, Tenant, utcnow
from gateway_core.usage import add_usage

KINDS = ("grant", "reserve", "capture", "release", "refund", "adjustment")


class InsufficientCreditsError(GatewayError):
    code = "INSUFFICIENT_CREDITS"
    status = 402


def lock_tenant(session: Session, tenant_id: int) -> Tenant:
    """The tenant row, locked until the transaction ends (SELECT … FOR UPDATE; SQLite locks the file)."""
    tenant = session.execute(
        select(Tenant).where(Tenant.id == tenant_id).with_for_update().execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if tenant is None:
        raise NotFoundError(f"no tenant {tenant_id}", details={"tenant_id": tenant_id})
    return tenant


def _record(
    session: Session,
    tenant: Tenant,
    kind: str,
    amount: int,
    reserved_change: int = 0,
    *,
    job_id: str | None = None,
    note: str | None = None,
    now: datetime | None = None,
) -> CreditEntry:
    tenant.credits_balance += amount
    tenant.credits_reserved += reserved_change
    if tenant.credits_balance < 0 or tenant.credits_reserved < 0:
        raise AssertionError(f"ledger entry {kind} {amount}/{reserved_change} would go below zero")
    entry = CreditEntry(
        tenant_id=tenant.id,
        job_id=job_id,
        kind=kind,
        amount=amount,
        reserved_change=reserved_change,
        balance_after=tenant.credits_balance,
        reserved_after=tenant.credits_reserved,
        note=note,
        created_at=now or utcnow(),
    )
    session.add(entry)
    return entry


def grant(session: Session, tenant_id: int, amount: int, *, kind: str = "grant", note: str | None = None) -> Tenant:
    """Add credits (grant, refund) or correct them (adjustment, may be negative but not below zero)."""
    if kind not in ("grant", "refund", "adjustment"):
        raise InvalidRequestError(f"kind must be grant, refund or adjustment, got {kind!r}")
    if amount == 0 or (amount < 0 and kind != "adjustment"):
        raise InvalidRequestError(f"a {kind} needs a positive amount, got {amount}")
    tenant = lock_tenant(session, tenant_id)
    if tenant.credits_balance + amount < 0:
        raise InvalidRequestError(
            f"an adjustment of {amount} would take the balance ({tenant.credits_balance}) below zero",
            details={"balance": tenant.credits_balance, "amount": amount},
        )
    _record(session, tenant, kind, amount, note=note)
    session.flush()
    return tenant


def check_affordable(tenant: Tenant, cost: int) -> None:
    if tenant.credits_balance < cost:
        raise InsufficientCreditsError(
            f"this job costs {cost} credit(s); the balance is {tenant.credits_balance}",
            details={"balance": tenant.credits_balance, "cost": cost, "reserved": tenant.credits_reserved},
        )


def reserve(session: Session, tenant: Tenant, job: Job, cost: int, now: datetime | None = None) -> None:
    """Hold ``cost`` credits of a locked tenant for ``job`` (created with credits_reserved=cost);
    InsufficientCreditsError (402) when short."""
    check_affordable(tenant, cost)
    if cost:
        _record(session, tenant, "reserve", -cost, cost, job_id=job.id, now=now)


def settle(session: Session, job: Job, charged: int) -> None:
    """On success: capture ``charged`` of the job's reservation and release the rest."""
    charged = min(charged, job.credits_reserved)
    tenant = lock_tenant(session, job.tenant_id)
    if job.credits_reserved:
        _record(session, tenant, "capture", 0, -charged, job_id=job.id)
    rest = job.credits_reserved - charged
    if rest:
        _record(session, tenant, "release", rest, -rest, job_id=job.id)
        add_usage(session, job.tenant_id, job.created_at, jobs=0, credits=-rest)
    job.credits_charged = charged


def release(session: Session, job: Job) -> None:
    """On failure or cancel: give the whole reservation back."""
    tenant = lock_tenant(session, job.tenant_id)
    if job.credits_reserved:
        _record(session, tenant, "release", job.credits_reserved, -job.credits_reserved, job_id=job.id)
        add_usage(session, job.tenant_id, job.created_at, jobs=0, credits=-job.credits_reserved)
    job.credits_charged = 0


def entries_page(session: Session, tenant_id: int, *, before: int | None, limit: int) -> list[CreditEntry]:
    """Newest entries first; ``before`` is the cursor (an entry id) from the previous page."""
    stmt = select(CreditEntry).where(CreditEntry.tenant_id == tenant_id)
    if before is not None:
        stmt = stmt.where(CreditEntry.id < before)
    return list(session.scalars(stmt.order_by(CreditEntry.id.desc()).limit(limit)))
