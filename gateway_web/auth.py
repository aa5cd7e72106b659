"""Authentication seam: the one place a request becomes a principal (API keys now; JWT and scopes later).

It runs as an app-level before_request, ahead of the rate limiter, so limits are keyed by tenant and tier.
"""

from __future__ import annotations

import threading
import time
from typing import cast

from flask import Flask, g, request

from gateway_core.errors import ForbiddenError
from gateway_core.tenants import Principal, authenticate_key, hash_key
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


class PrincipalCache:
    """Recently authenticated keys, for ``ttl`` seconds: a key check is a database round trip per request
    otherwise. A revoked key keeps working for at most ``ttl`` seconds in a process that saw it."""

    def __init__(self, ttl: float = 5.0, size: int = 10_000):
        self.ttl, self.size = ttl, size
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> Principal | None:
        hit = self._entries.get(digest)
        return hit[1] if hit and hit[0] > time.monotonic() else None

    def put(self, digest: str, p: Principal) -> None:
        with self._lock:
            if len(self._entries) >= self.size:
                self._entries.clear()
            self._entries[digest] = (time.monotonic() + self.ttl, p)


def init_auth(app: Flask) -> None:
    """Register the authentication hook; call before the limiter's init_app so it runs first."""
    cache = PrincipalCache()

    @app.before_request
    def _authenticate() -> None:
        if request.routing_exception is not None or request.blueprint not in AUTHENTICATED:
            return
        token = bearer_token()
        digest = hash_key(token) if token else ""
        cached = cache.get(digest) if token else None
        if cached is None:
            with ctx().db.transaction() as s:
                cached = authenticate_key(s, token)
            cache.put(digest, cached)
        g.principal = cached
