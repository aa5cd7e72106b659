"""Per-tenant usage by day and by month (UTC), kept with each admission and release, for quotas."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import ColumnElement, Date, bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from gateway_core.models import TenantUsage

PERIODS = ("day", "month")


def period_starts(when: datetime) -> dict[str, date]:
    day = when.date()
    return {"day": day, "month": day.replace(day=1)}


@dataclass(frozen=True)
class PeriodUsage:
    jobs: int = 0
    credits: int = 0


def usage_columns(tenant_id: Any) -> list[ColumnElement[Any]]:
    """Scalar subqueries (jobs, credits for the day, then for the month) to read usage in the same
    statement that locks the tenant; bind ``usage_params(now)`` when executing."""
    cols: list[ColumnElement[Any]] = []
    for period in PERIODS:
        for col in (TenantUsage.jobs, TenantUsage.credits):
            cols.append(
                select(col)
                .where(
                    TenantUsage.tenant_id == tenant_id,
                    TenantUsage.period == period,
                    TenantUsage.starts_on == bindparam(f"usage_{period}", type_=Date),
                )
                .scalar_subquery()
            )
    return cols


def usage_params(now: datetime) -> dict[str, date]:
    return {f"usage_{period}": start for period, start in period_starts(now).items()}


def usage_from_row(values: tuple[Any, ...]) -> dict[str, PeriodUsage]:
    """The usage_columns values of a row as {period: PeriodUsage}."""
    return {
        period: PeriodUsage(int(values[2 * i] or 0), int(values[2 * i + 1] or 0)) for i, period in enumerate(PERIODS)
    }


def usage_now(session: Session, tenant_id: int, now: datetime) -> dict[str, PeriodUsage]:
    return usage_from_row(tuple(session.execute(select(*usage_columns(tenant_id)), usage_params(now)).one()))


def _upsert(dialect: str) -> Any:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(TenantUsage)
    return stmt.on_conflict_do_update(
        index_elements=[TenantUsage.tenant_id, TenantUsage.period, TenantUsage.starts_on],
        set_={
            "jobs": TenantUsage.jobs + stmt.excluded.jobs,
            "credits": func.max(TenantUsage.credits + stmt.excluded.credits, 0)
            if dialect == "sqlite"
            else func.greatest(TenantUsage.credits + stmt.excluded.credits, 0),
        },
    )


def add_usage(session: Session, tenant_id: int, when: datetime, *, jobs: int, credits: int) -> None:
    """Count jobs and credits against the day and month ``when`` falls in (one upsert, both rows)."""
    dialect = session.get_bind().dialect.name
    if dialect not in _UPSERTS:
        _UPSERTS[dialect] = _upsert(dialect)
    rows = [
        {"tenant_id": tenant_id, "period": period, "starts_on": start, "jobs": jobs, "credits": credits}
        for period, start in period_starts(when).items()
    ]
    session.execute(_UPSERTS[dialect], rows)


_UPSERTS: dict[str, Any] = {}
