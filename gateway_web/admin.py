"""Admin routes (keys with the admin scope): credit grants, dead letters and their replay."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Annotated, Any, Literal

from flask import Response, current_app, jsonify
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, Field

from gateway_core import credits as ledger
from gateway_core import deadletters
from gateway_core.catalog import NO_NUL, Number
from gateway_core.credits import MAX_GRANT
from gateway_core.errors import ValidationFailedError
from gateway_core.live import request_reload
from gateway_core.settings import Settings, config_path
from gateway_tasks.publish import publish_dispatch
from gateway_web.auth import SECURITY, require_scope
from gateway_web.context import ctx
from gateway_web.credits import EntryOut, entry_out
from gateway_web.errors import ErrorEnvelope
from gateway_web.limits import limited
from gateway_web.openapi import JobgateOpenAPI
from gateway_web.schemas import JobOut, job_out

ERRORS: dict[str | int, Any] = {401: ErrorEnvelope, 403: ErrorEnvelope, 429: ErrorEnvelope}


class GrantPath(BaseModel):
    tenant_id: int


class GrantBody(BaseModel):
    amount: Annotated[int, Number] = Field(
        ge=-MAX_GRANT, le=MAX_GRANT, description="credits to add; an adjustment may be negative"
    )
    kind: Literal["grant", "refund", "adjustment"] = "grant"
    note: str | None = Field(default=None, max_length=255, pattern=NO_NUL)


class GrantOut(BaseModel):
    tenant_id: int
    balance: int
    reserved: int
    entry: EntryOut


class DeadLetterOut(BaseModel):
    id: int
    job_id: str
    tenant_id: int
    service: str
    error_code: str
    error_message: str
    payload: dict[str, Any]
    attempts: list[dict[str, Any]]
    created_at: datetime
    replayed_at: datetime | None


class DeadLettersOut(BaseModel):
    dead_letters: list[DeadLetterOut]
    next_cursor: str | None


class DeadLettersQuery(BaseModel):
    service: str | None = Field(default=None, max_length=64)
    cursor: int | None = Field(default=None, ge=1)
    limit: int = Field(default=50, ge=1, le=200)


class DeadLetterPath(BaseModel):
    letter_id: int


class ReloadOut(BaseModel):
    generation: int = Field(description="the config generation every process moves to within about a second")
    changes: list[str] = Field(description="what the new file changes, e.g. services.codegen.replicas")
    restart_required: list[str] = Field(description="changes a reload does not apply (connection URLs, queues)")


def make_blueprint(app: JobgateOpenAPI) -> APIBlueprint:
    settings: Settings = app.extensions["jobgate"].settings
    cost = settings.rate_limits.read_cost
    bp = APIBlueprint("admin", __name__, url_prefix="/v1/admin", abp_tags=[Tag(name="admin")], abp_security=SECURITY)

    def grant_credits(path: GrantPath, body: GrantBody) -> tuple[Response, int]:
        """Add (or correct) a tenant's credits; needs an API key with the admin scope."""
        require_scope("admin")
        with ctx().db.transaction() as s:
            tenant = ledger.grant(s, path.tenant_id, body.amount, kind=body.kind, note=body.note)
            entry = ledger.entries_page(s, tenant.id, before=None, limit=1)[0]
            out = GrantOut(
                tenant_id=tenant.id,
                balance=tenant.credits_balance,
                reserved=tenant.credits_reserved,
                entry=entry_out(entry),
            )
        return jsonify(out.model_dump(mode="json")), 201

    def list_dead_letters(query: DeadLettersQuery) -> Response:
        """Jobs that failed for good, newest first, with their payload and every attempt."""
        require_scope("admin")
        with ctx().db.transaction() as s:
            rows = deadletters.page(s, service=query.service, before=query.cursor, limit=query.limit)
            out = DeadLettersOut(
                dead_letters=[DeadLetterOut.model_validate(r, from_attributes=True) for r in rows],
                next_cursor=str(rows[-1].id) if len(rows) == query.limit else None,
            )
        return jsonify(out.model_dump(mode="json"))

    def replay(path: DeadLetterPath) -> tuple[Response, int]:
        """Replay a dead-lettered job: a new round of attempts on the same job id (credits reserved again)."""
        require_scope("admin")
        c = ctx()
        job = deadletters.replay_and_send(c.db, settings, functools.partial(publish_dispatch, c.celery), path.letter_id)
        out = job_out(job, with_events=False).model_dump(mode="json")
        del out["events"]
        return jsonify(out), 202

    def reload_config() -> Response:
        """Validate gateway.yaml and, when good, have every web and worker process apply it (about a second);
        a bad file is refused with the reasons and the running config keeps serving."""
        require_scope("admin")
        c = ctx()
        path = current_app.config.get("JOBGATE_CONFIG_PATH") or config_path()
        result = request_reload(c.settings, path, c.redis)
        if not result.ok:
            raise ValidationFailedError(
                "the config file was refused; the running config stays",
                code="CONFIG_INVALID",
                details={"errors": result.error},
            )
        out = ReloadOut(
            generation=result.generation or 0, changes=result.changes, restart_required=result.restart_required
        )
        return jsonify(out.model_dump(mode="json"))

    bp.post("/config/reload", responses={200: ReloadOut, 422: ErrorEnvelope, **ERRORS})(
        limited(app, settings, reload_config, weight=cost, endpoint_limit=None)
    )
    bp.post(
        "/tenants/<int:tenant_id>/credits",
        responses={201: GrantOut, 400: ErrorEnvelope, 404: ErrorEnvelope, **ERRORS},
    )(limited(app, settings, grant_credits, weight=cost, endpoint_limit=None))
    bp.get("/dead-letters", responses={200: DeadLettersOut, **ERRORS})(
        limited(app, settings, list_dead_letters, weight=cost, endpoint_limit=None)
    )
    bp.post(
        "/dead-letters/<int:letter_id>/replay",
        responses={202: JobOut, 400: ErrorEnvelope, 402: ErrorEnvelope, 404: ErrorEnvelope, **ERRORS},
    )(limited(app, settings, replay, weight=cost, endpoint_limit=None))
    return bp
