"""The credits ledger. Every movement is an entry; a tenant's balance and reserved credits are kept equal
to the sums of its entries, changed only here, under a row lock on the tenant."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.sql.dml import Insert

from gateway_core.db import Writes, insert_rows, write_together
from gateway_core.errors import GatewayError, InvalidRequestError, LedgerBelowZeroError, NotFoundError
from gateway_core.models import CreditEntry, Job, Tenant, utcnow
from gateway_core.usage import count_usage

KINDS = ("grant", "reserve", "capture", "release", "refund", "adjustment")
# The most one grant or adjustment may move: sums of many stay far inside the ledger's 64-bit columns.
MAX_GRANT = 10**12


class InsufficientCreditsError(GatewayError):
    code = "INSUFFICIENT_CREDITS"
    status = 402


def lock_tenant(session: Session, tenant_id: int) -> Tenant:
    """The tenant row, locked until the transaction ends (SELECT … FOR UPDATE)."""
    tenant = session.execute(
        select(Tenant).where(Tenant.id == tenant_id).with_for_update().execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if tenant is None:
        raise NotFoundError(f"no tenant {tenant_id}", details={"tenant_id": tenant_id})
    return tenant


@dataclass(frozen=True)
class Movement:
    kind: str
    amount: int  # change of the spendable balance
    reserved_change: int = 0  # change of the credits held for open jobs
    job_id: str | None = None
    note: str | None = None


def ledger_writes(tenant: Tenant, movements: list[Movement], now: datetime | None = None) -> Writes:
    """The writes that apply ``movements`` to a locked tenant: one ledger entry per movement, each with
    the sums after it, and the tenant row's counters — its new balance and reserved credits, and its usage
    as ``usage.count_usage`` left it. The loaded tenant shows the new sums."""
    now = now or utcnow()
    balance, reserved = tenant.credits_balance, tenant.credits_reserved
    params: dict[str, Any] = {}
    for i, m in enumerate(movements):
        balance, reserved = balance + m.amount, reserved + m.reserved_change
        if balance < 0 or reserved < 0:
            raise LedgerBelowZeroError(
                f"a {m.kind} of {m.amount} credits would take the balance or reserved credits below zero",
                details={"kind": m.kind, "amount": m.amount, "reserved_change": m.reserved_change},
            )
        entry = {
            "tenant_id": tenant.id,
            "job_id": m.job_id,
            "kind": m.kind,
            "amount": m.amount,
            "reserved_change": m.reserved_change,
            "balance_after": balance,
            "reserved_after": reserved,
            "note": m.note,
            "created_at": now,
        }
        params.update({f"entry{i}__{name}": value for name, value in entry.items()})
    set_committed_value(tenant, "credits_balance", balance)
    set_committed_value(tenant, "credits_reserved", reserved)
    params.update({f"tenant__{name}": getattr(tenant, name) for name in ("id", *_COUNTERS)})
    return Writes([_WRITE_COUNTERS, _entries_insert(len(movements))] if movements else [_WRITE_COUNTERS], params)


_TENANTS = cast(Table, Tenant.__table__)
_ENTRIES = cast(Table, CreditEntry.__table__)
_COUNTERS = [c.key for c in _TENANTS.columns if c.key.startswith(("credits_", "usage_"))]
_WRITE_COUNTERS = (
    update(_TENANTS)
    .where(_TENANTS.c.id == bindparam("tenant__id"))
    .values({name: bindparam(f"tenant__{name}", type_=_TENANTS.c[name].type) for name in _COUNTERS})
)


@functools.cache
def _entries_insert(count: int) -> Insert:
    columns = [c.key for c in _ENTRIES.columns if c.key != "id"]
    return insert_rows(_ENTRIES, [f"entry{i}" for i in range(count)], columns)


def grant(session: Session, tenant_id: int, amount: int, *, kind: str = "grant", note: str | None = None) -> Tenant:
    """Add credits (grant, refund) or correct them (adjustment, may be negative but not below zero)."""
    if kind not in ("grant", "refund", "adjustment"):
        raise InvalidRequestError(f"kind must be grant, refund or adjustment, got {kind!r}")
    if amount == 0 or (amount < 0 and kind != "adjustment"):
        raise InvalidRequestError(f"a {kind} needs a positive amount, got {amount}")
    if abs(amount) > MAX_GRANT:
        raise InvalidRequestError(f"one {kind} moves at most {MAX_GRANT} credits", details={"limit": MAX_GRANT})
    tenant = lock_tenant(session, tenant_id)
    if tenant.credits_balance + amount < 0:
        raise InvalidRequestError(
            f"an adjustment of {amount} would take the balance ({tenant.credits_balance}) below zero",
            details={"balance": tenant.credits_balance, "amount": amount},
        )
    write_together(session, ledger_writes(tenant, [Movement(kind, amount, note=note)]))
    return tenant


def check_affordable(tenant: Tenant, cost: int) -> None:
    if tenant.credits_balance < cost:
        raise InsufficientCreditsError(
            f"this job costs {cost} credit(s); the balance is {tenant.credits_balance}",
            details={"balance": tenant.credits_balance, "cost": cost, "reserved": tenant.credits_reserved},
        )


def reservation(tenant: Tenant, job_id: str, cost: int, now: datetime | None = None) -> Writes:
    """The writes that hold ``cost`` credits of a locked tenant for a job created with
    credits_reserved=cost (and write its counters); InsufficientCreditsError (402) when short."""
    check_affordable(tenant, cost)
    return ledger_writes(tenant, [Movement("reserve", -cost, cost, job_id)] if cost else [], now)


def settle(session: Session, job: Job, charged: int) -> None:
    """On success: capture ``charged`` of the job's reservation and release the rest."""
    charged = min(charged, job.credits_reserved)
    rest = job.credits_reserved - charged
    moves = [Movement("capture", 0, -charged, job.id)] if job.credits_reserved else []
    if rest:
        moves.append(Movement("release", rest, -rest, job.id))
    _give_back(session, job, moves, rest)
    job.credits_charged = charged


def release(session: Session, job: Job) -> None:
    """On failure or cancel: give the whole reservation back."""
    moves = [Movement("release", job.credits_reserved, -job.credits_reserved, job.id)] if job.credits_reserved else []
    _give_back(session, job, moves, job.credits_reserved)
    job.credits_charged = 0


def _give_back(session: Session, job: Job, moves: list[Movement], unused: int) -> None:
    """Apply a finished job's ledger movements and take its unused credits off its day's and month's usage."""
    tenant = lock_tenant(session, job.tenant_id)
    count_usage(tenant, job.created_at, jobs=0, credits=-unused)
    write_together(session, ledger_writes(tenant, moves))


def entries_page(session: Session, tenant_id: int, *, before: int | None, limit: int) -> list[CreditEntry]:
    """Newest entries first; ``before`` is the cursor (an entry id) from the previous page."""
    stmt = select(CreditEntry).where(CreditEntry.tenant_id == tenant_id)
    if before is not None:
        stmt = stmt.where(CreditEntry.id < before)
    return list(session.scalars(stmt.order_by(CreditEntry.id.desc()).limit(limit)))
