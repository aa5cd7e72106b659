"""Authentication seam: the one place a request becomes a principal (API keys now; JWT and scopes later).

It runs as an app-level before_request, ahead of the rate limiter, so limits are keyed by tenant and tier.
"""

from __future__ import annotations

from typing import cast

from flask import Flask, g, request

from gateway_core.errors import ForbiddenError
from gateway_core.tenants import Principal, authenticate_key
from gateway_web.context import ctx

SECURITY: list[dict[str, list[str]]] = [{"bearer": []}]
SECURITY_SCHEMES = {"bearer": {"type": "http", "scheme": "bearer", "description": "an API key: jg_…"}}
# Blueprints whose every route needs a principal.
AUTHENTICATED = frozenset({"jobs", "credits", "admin"})


def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def principal() -> Principal:
    """The principal of this request (set by the before_request hook on authenticated routes)."""
    return cast(Principal, g.principal)


def require_scope(scope: str) -> Principal:
    p = principal()
    if scope not in p.scopes:
        raise ForbiddenError(f"this API key lacks the {scope!r} scope", details={"required_scope": scope})
    return p


def init_auth(app: Flask) -> None:
    """Register the authentication hook; call before the limiter's init_app so it runs first."""

    @app.before_request
    def _authenticate() -> None:
        if request.routing_exception is not None or request.blueprint not in AUTHENTICATED:
            return
        with ctx().db.transaction() as s:
            g.principal = authenticate_key(s, bearer_token())
