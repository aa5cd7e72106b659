"""Authentication seam: the one place a request becomes a tenant (API keys now; JWT and scopes later)."""

from __future__ import annotations

from flask import g, request
from sqlalchemy.orm import Session

from gateway_core.tenants import authenticate_key
from gateway_web.context import ctx

SECURITY: list[dict[str, list[str]]] = [{"bearer": []}]
SECURITY_SCHEMES = {"bearer": {"type": "http", "scheme": "bearer", "description": "an API key: jg_…"}}


def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def current_tenant_id(session: Session | None = None) -> int:
    """The tenant behind the request's API key, checked once per request, in ``session`` when given
    (so a submit authenticates and records its job in one transaction); AuthenticationError (401) otherwise."""
    if "tenant_id" not in g:
        if session is not None:
            g.tenant_id = authenticate_key(session, bearer_token())
        else:
            with ctx().db.transaction() as s:
                g.tenant_id = authenticate_key(s, bearer_token())
    return int(g.tenant_id)
