"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, Field

from gateway_web.context import ctx
from gateway_web.errors import ErrorEnvelope, error_response

bp = APIBlueprint("health", __name__, abp_tags=[Tag(name="health")])


class HealthOut(BaseModel):
    status: str = Field(examples=["ok"])


class ReadyOut(BaseModel):
    status: str = Field(examples=["ready"])
    checks: dict[str, str] = Field(description="database, redis, broker: 'ok' or 'down: <reason>'")


@bp.get("/health", responses={200: HealthOut})
def health() -> Response:
    """The process is alive."""
    return jsonify({"status": "ok"})


def _check(fn: Any) -> str | None:
    try:
        fn()
    except Exception as exc:  # any failure means not ready; say which
        return f"{exc.__class__.__name__}: {str(exc)[:200]}"
    return None


def _broker() -> None:
    with ctx().celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=2)


@bp.get("/ready", responses={200: ReadyOut, 503: ErrorEnvelope})
def ready() -> Response:
    """Database, Redis and the broker are reachable; 503 naming what is down otherwise."""
    c = ctx()
    checks = {"database": _check(c.db.ping), "redis": _check(c.redis.ping), "broker": _check(_broker)}
    down = {name: err for name, err in checks.items() if err}
    body = {
        "status": "ready" if not down else "unavailable",
        "checks": {name: ("down: " + err if err else "ok") for name, err in checks.items()},
    }
    if down:
        return error_response(503, "NOT_READY", f"not ready: {', '.join(down)} down", body)
    return jsonify(body)
