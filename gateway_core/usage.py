"""Per-tenant usage by day and by month (UTC), kept with each admission and release, for quotas."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, Date, Table, bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert

from gateway_core.db import Writes
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


def usage_write(session: Session, tenant_id: int, when: datetime, *, jobs: int, credits: int) -> Writes:
    """The upserts that count jobs and credits against the day and month ``when`` falls in (credits never
    below zero)."""
    params: dict[str, Any] = {f"usage__{period}": start for period, start in period_starts(when).items()}
    params.update({"usage__tenant_id": tenant_id, "usage__jobs": jobs, "usage__credits": credits})
    return Writes(list(_upserts(session.get_bind().dialect.name)), params)


@functools.cache
def _upserts(dialect: str) -> tuple[Insert, ...]:
    """One upsert per period (a single-row statement: SQLAlchemy caches those, not multi-row ones)."""
    floor = func.greatest if dialect == "postgresql" else func.max
    upserts = []
    for period in PERIODS:
        stmt = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(_USAGE).values(
            tenant_id=bindparam("usage__tenant_id"),
            period=period,
            starts_on=bindparam(f"usage__{period}", type_=Date),
            jobs=bindparam("usage__jobs"),
            credits=bindparam("usage__credits"),
        )
        upserts.append(
            stmt.on_conflict_do_update(
                index_elements=[_USAGE.c.tenant_id, _USAGE.c.period, _USAGE.c.starts_on],
                set_={
                    "jobs": _USAGE.c.jobs + stmt.excluded.jobs,
                    "credits": floor(_USAGE.c.credits + stmt.excluded.credits, 0),
                },
            )
        )
    return tuple(upserts)


_USAGE = cast(Table, TenantUsage.__table__)
