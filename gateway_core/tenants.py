"""Tenants and their API keys (kept as SHA-256 hashes only); the one place a key is checked."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway_core.errors import AuthenticationError, InvalidRequestError, NotFoundError
from gateway_core.models import ApiKey, Tenant

Tier = Literal["free", "pro", "enterprise"]
TIERS: tuple[str, ...] = ("free", "pro", "enterprise")
# Under contention enterprise jobs start before pro before free: 0 is served first (Redis' order; the
# publisher turns it around for RabbitMQ, where higher wins).
TIER_PRIORITY = {"enterprise": 0, "pro": 3, "free": 6}
KEY_PREFIX = "jg_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_tenant(session: Session, name: str, tier: str = "free") -> Tenant:
    if tier not in TIERS:
        raise InvalidRequestError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
    if session.scalar(select(Tenant).where(Tenant.name == name)) is not None:
        raise InvalidRequestError(f"tenant {name!r} already exists", code="TENANT_EXISTS")
    tenant = Tenant(name=name, tier=tier)
    session.add(tenant)
    session.flush()
    return tenant


def tenant_by_name(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise NotFoundError(f"no tenant {name!r}")
    return tenant


SCOPES = ("admin",)


def create_api_key(session: Session, tenant: Tenant, scopes: tuple[str, ...] = ()) -> str:
    """Create a key for tenant and return it; only its hash is stored, so this is the one time it is seen.
    Scope ``admin`` lets the key manage every tenant's credits (the identity issue widens scopes)."""
    unknown = set(scopes) - set(SCOPES)
    if unknown:
        raise InvalidRequestError(f"unknown scope(s) {sorted(unknown)}; known: {', '.join(SCOPES)}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, prefix=key[:10], key_hash=hash_key(key), scopes=list(scopes)))
    session.flush()
    return key


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: the tenant behind the key, its tier, and the key's scopes."""

    tenant_id: int
    tier: str
    scopes: tuple[str, ...]


def authenticate_key(session: Session, key: str | None) -> Principal:
    """The principal of a live API key; AuthenticationError when it is missing, unknown or revoked."""
    if not key:
        raise AuthenticationError("missing API key: send Authorization: Bearer <key>")
    row = session.execute(
        select(ApiKey.tenant_id, ApiKey.revoked_at, ApiKey.scopes, Tenant.tier)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.key_hash == hash_key(key))
    ).first()
    if row is None or row.revoked_at is not None:
        raise AuthenticationError("invalid API key")
    return Principal(int(row.tenant_id), str(row.tier), tuple(row.scopes or ()))
