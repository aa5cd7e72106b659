"""Per-tenant usage in the current day and month (UTC), for quotas.

Counters on the tenant row (read by the admission's locked read, written with its credits in the same
statement), changed under the tenant's lock at each admission, replay and give-back. The counters of a
period that has ended read as zero and restart at the next admission; what was spent in past periods is
in the ledger (credit_entries) and the jobs table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy.orm.attributes import set_committed_value

from gateway_core.models import Tenant

PERIODS = ("day", "month")


def period_starts(when: datetime) -> dict[str, date]:
    day = when.date()
    return {"day": day, "month": day.replace(day=1)}


@dataclass(frozen=True)
class PeriodUsage:
    jobs: int = 0
    credits: int = 0


def usage_now(tenant: Tenant, now: datetime) -> dict[str, PeriodUsage]:
    """The tenant's usage in the day and month ``now`` falls in."""
    return {period: _counted(tenant, period, start) for period, start in period_starts(now).items()}


def count_usage(tenant: Tenant, when: datetime, *, jobs: int, credits: int) -> None:
    """Add to a locked tenant's counters for the day and month ``when`` falls in (credits never below
    zero). Counters of an older period restart; a change for a period that has already ended (the give-back
    of a job admitted yesterday) is dropped. Changes only the loaded tenant: ``tenant_row_write`` writes it."""
    for period, start in period_starts(when).items():
        since = getattr(tenant, f"usage_{period}")
        if since is not None and since > start:
            continue
        used = _counted(tenant, period, start)
        set_committed_value(tenant, f"usage_{period}", start)
        set_committed_value(tenant, f"usage_{period}_jobs", max(used.jobs + jobs, 0))
        set_committed_value(tenant, f"usage_{period}_credits", max(used.credits + credits, 0))


def _counted(tenant: Tenant, period: str, start: date) -> PeriodUsage:
    if getattr(tenant, f"usage_{period}") != start:
        return PeriodUsage()
    return PeriodUsage(getattr(tenant, f"usage_{period}_jobs"), getattr(tenant, f"usage_{period}_credits"))
