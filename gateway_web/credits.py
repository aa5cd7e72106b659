"""Credits: a tenant's balance, reservations, usage against quotas, and its ledger."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, Field

from gateway_core import credits as ledger
from gateway_core.admission import active_jobs, limits_of
from gateway_core.models import CreditEntry, Tenant, utcnow
from gateway_core.settings import Settings
from gateway_core.usage import period_starts, usage_now
from gateway_web.auth import SECURITY, principal
from gateway_web.context import ctx
from gateway_web.errors import ErrorEnvelope
from gateway_web.limits import limited
from gateway_web.openapi import JobgateOpenAPI

ERRORS: dict[str | int, Any] = {401: ErrorEnvelope, 429: ErrorEnvelope}


class EntryOut(BaseModel):
    id: int
    kind: str
    amount: int = Field(description="change of the spendable balance")
    reserved_change: int = Field(description="change of the credits held for open jobs")
    balance_after: int
    reserved_after: int
    job_id: str | None
    note: str | None
    created_at: datetime


class PeriodOut(BaseModel):
    starts_on: date
    jobs: int
    credits: int = Field(description="credits reserved or spent in the period (released ones excluded)")
    job_quota: int | None
    credit_quota: int | None


class CreditsOut(BaseModel):
    balance: int = Field(description="spendable credits")
    reserved: int = Field(description="credits held by jobs not yet finished")
    concurrency_limit: int | None
    active_jobs: int
    rate_limit: str = Field(description="the submit budget of the tenant's tier")
    read_rate_limit: str = Field(description="the read budget (polls, lists, cancels, this page)")
    usage: dict[str, PeriodOut]
    entries: list[EntryOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for older entries")


class CreditsQuery(BaseModel):
    cursor: int | None = Field(default=None, ge=1, description="from next_cursor")
    limit: int = Field(default=50, ge=1, le=200)


def entry_out(e: CreditEntry) -> EntryOut:
    return EntryOut.model_validate(e, from_attributes=True)


def make_blueprint(app: JobgateOpenAPI) -> APIBlueprint:
    settings: Settings = app.extensions["jobgate"].settings
    cost = settings.rate_limits.read_cost
    bp = APIBlueprint("credits", __name__, url_prefix="/v1", abp_tags=[Tag(name="credits")], abp_security=SECURITY)

    def read_credits(query: CreditsQuery) -> Response:
        """Balance, reserved credits, usage against quotas, and the ledger newest first (cursor-paged)."""
        tenant_id = principal().tenant_id
        now = utcnow()
        with ctx().db.transaction() as s:
            tenant = s.get(Tenant, tenant_id)
            assert tenant is not None
            tier = settings.tiers[tenant.tier]
            limits = limits_of(tenant, tier)
            used = usage_now(tenant, now)
            entries = ledger.entries_page(s, tenant_id, before=query.cursor, limit=query.limit)
            starts = period_starts(now)
            out = CreditsOut(
                balance=tenant.credits_balance,
                reserved=tenant.credits_reserved,
                concurrency_limit=limits["concurrency"],
                active_jobs=active_jobs(s, tenant_id),
                rate_limit=tier.rate_limit,
                read_rate_limit=tier.read_rate_limit,
                usage={
                    period: PeriodOut(
                        starts_on=starts[period],
                        jobs=used[period].jobs,
                        credits=used[period].credits,
                        job_quota=limits[f"{prefix}_jobs"],
                        credit_quota=limits[f"{prefix}_credits"],
                    )
                    for period, prefix in (("day", "daily"), ("month", "monthly"))
                },
                entries=[entry_out(e) for e in entries],
                next_cursor=str(entries[-1].id) if len(entries) == query.limit else None,
            )
        return jsonify(out.model_dump(mode="json"))

    bp.get("/credits", responses={200: CreditsOut, **ERRORS})(
        limited(app, settings, read_credits, weight=cost, endpoint_limit=None, budget="read")
    )
    return bp
