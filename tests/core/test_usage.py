"""Usage counters for quotas: the current day and month on the tenant row, restarting with each period."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway_core.models import Tenant
from gateway_core.usage import PeriodUsage, count_usage, usage_now


def test_counters_restart_with_each_period_and_give_backs_of_ended_periods_are_dropped() -> None:
    t = Tenant(name="t", tier="pro", usage_day_jobs=0, usage_day_credits=0, usage_month_jobs=0, usage_month_credits=0)
    mon, tue = datetime(2026, 11, 30, 23, 0, tzinfo=UTC), datetime(2026, 12, 1, 1, 0, tzinfo=UTC)
    assert usage_now(t, mon) == {"day": PeriodUsage(), "month": PeriodUsage()}

    count_usage(t, mon, jobs=1, credits=10)
    count_usage(t, mon, jobs=1, credits=5)
    assert usage_now(t, mon) == {"day": PeriodUsage(2, 15), "month": PeriodUsage(2, 15)}
    # The next day (and month) starts from nothing; Monday's counters read as zero on Tuesday.
    assert usage_now(t, tue) == {"day": PeriodUsage(), "month": PeriodUsage()}
    count_usage(t, tue, jobs=1, credits=7)
    # A job admitted on Monday gives back its unused credits on Tuesday: Monday has ended, nothing changes.
    count_usage(t, mon, jobs=0, credits=-10)
    assert usage_now(t, tue) == {"day": PeriodUsage(1, 7), "month": PeriodUsage(1, 7)}
    # A give-back in the same period lowers it, never below zero.
    count_usage(t, tue, jobs=0, credits=-20)
    assert usage_now(t, tue) == {"day": PeriodUsage(1, 0), "month": PeriodUsage(1, 0)}
