"""Per-tenant usage by day and by month (UTC), kept with each admission and release, for quotas."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy.orm import Session

from gateway_core.models import TenantUsage


def period_starts(when: datetime) -> dict[str, date]:
    day = when.date()
    return {"day": day, "month": day.replace(day=1)}


@dataclass(frozen=True)
class PeriodUsage:
    jobs: int = 0
    credits: int = 0


def usage_now(session: Session, tenant_id: int, now: datetime) -> dict[str, PeriodUsage]:
    out: dict[str, PeriodUsage] = {}
    for period, start in period_starts(now).items():
        row = session.get(TenantUsage, (tenant_id, period, start))
        out[period] = PeriodUsage(row.jobs, row.credits) if row else PeriodUsage()
    return out


def add_usage(session: Session, tenant_id: int, when: datetime, *, jobs: int, credits: int) -> None:
    """Count jobs and credits against the day and month ``when`` falls in (callers hold the tenant lock)."""
    for period, start in period_starts(when).items():
        row = session.get(TenantUsage, (tenant_id, period, start))
        if row is None:
            row = TenantUsage(tenant_id=tenant_id, period=period, starts_on=start, jobs=0, credits=0)
            session.add(row)
        row.jobs += jobs
        row.credits = max(0, row.credits + credits)
