"""The one error envelope, and the one place exceptions become it."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, g, jsonify, request
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException

from gateway_core.errors import GatewayError

log = logging.getLogger(__name__)

# Stable codes for the HTTP errors Flask/werkzeug raise themselves.
HTTP_CODES = {
    400: "INVALID_REQUEST",
    401: "UNAUTHENTICATED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    429: "RATE_LIMITED",
}


class ErrorBody(BaseModel):
    code: str = Field(examples=["VALIDATION_FAILED"])
    message: str
    details: dict[str, Any] = Field(default_factory=dict)
    request_id: str | None = None
    timestamp: str


class ErrorEnvelope(BaseModel):
    """Every error jobgate returns has this shape (seed 001)."""

    error: ErrorBody


def error_response(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> Response:
    body = {
        "error": {
            "code": code,
            "message": message,
            "details": details or {},
            "request_id": g.get("request_id"),
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
    }
    resp = jsonify(body)
    resp.status_code = status
    return resp


def field_errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"field": ".".join(str(p) for p in e["loc"]) or "(body)", "message": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]


def validation_error_response(exc: ValidationError) -> Response:
    """422 with one entry per bad field; also flask-openapi3's validation_error_callback."""
    return error_response(422, "VALIDATION_FAILED", "the request is not valid", {"fields": field_errors(exc)})


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(GatewayError)
    def _gateway(exc: GatewayError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.details)

    @app.errorhandler(ValidationError)
    def _validation(exc: ValidationError) -> Response:
        return validation_error_response(exc)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Any:
        if exc.response is not None and exc.response.is_json:  # already an envelope (abort(resp))
            return exc.response
        status = exc.code or 500
        details: dict[str, Any] = {}
        allowed = sorted(getattr(exc, "valid_methods", None) or [])
        if status == 405 and allowed:
            details["allowed_methods"] = allowed
        resp = error_response(status, HTTP_CODES.get(status, "HTTP_ERROR"), exc.description or exc.name, details)
        if status == 405 and allowed:
            resp.headers["Allow"] = ", ".join(allowed)
        return resp

    @app.after_request
    def _drain_an_unread_body(resp: Response) -> Response:
        # An error answered before the body was read (a 429 on an upload, say) leaves the body in the socket,
        # where the server would take it for the next request of the kept-alive connection. Read it to its
        # end (the request stream stops at the body limit) so the connection stays usable.
        # Only for an authenticated tenant: a stranger's body (a 401) is not worth a thread's time.
        if resp.status_code >= 400 and resp.status_code != 413 and request.content_length and g.get("principal"):
            try:
                while request.stream.read(64 * 1024):
                    pass
            except (HTTPException, OSError):  # past the body limit, or the client went away: nothing to keep
                pass
        return resp

    @app.errorhandler(PoolTimeoutError)
    @app.errorhandler(OperationalError)
    def _database_down(exc: OperationalError | PoolTimeoutError) -> Response:
        log.warning("database unavailable: %s", getattr(exc, "orig", exc))
        resp = error_response(503, "DATABASE_UNAVAILABLE", "the database is unavailable; retry shortly")
        resp.headers["Retry-After"] = "1"
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "INTERNAL_ERROR", "internal error; quote the request_id when reporting it")
