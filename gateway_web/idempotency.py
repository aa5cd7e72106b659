"""Idempotency-Key on submit (Stripe's semantics): the same key and request within 24 h returns the
original job; the same key with another request is a 422; a second request while the first is still
being admitted is a 409. The key's record is the job row itself (unique per tenant); a short Redis
lock spots the concurrent duplicate."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from flask import request

from gateway_core.admission import JobInput
from gateway_core.errors import IdempotencyInProgressError, InvalidRequestError

HEADER = "Idempotency-Key"
_VALID = re.compile(r"^[\x21-\x7e]{1,255}$")


def idempotency_key() -> str | None:
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not _VALID.match(key):
        raise InvalidRequestError(f"{HEADER} must be 1-255 visible ASCII characters", code="INVALID_IDEMPOTENCY_KEY")
    return key


def request_hash(job_input: JobInput) -> str:
    """A fingerprint of what was asked: service, validated fields, and the audio's bytes."""
    doc = {
        "service": job_input.service,
        "request": job_input.request,
        "audio": hashlib.sha256(job_input.audio).hexdigest() if job_input.audio is not None else None,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@contextmanager
def in_flight_guard(r: redis.Redis, tenant_id: int, key: str | None) -> Iterator[None]:
    """Hold a lock on (tenant, key) while the request is admitted; 409 if another request holds it.
    Without Redis the unique index on (tenant, key) still gives one job; only the 409 is lost."""
    if key is None:
        yield
        return
    digest = hashlib.sha256(key.encode()).hexdigest()
    lock = r.lock(f"jobgate:idem:{tenant_id}:{digest}", timeout=30, blocking=False)
    try:
        acquired = lock.acquire()
    except redis.RedisError:
        acquired = None
    if acquired is False:
        raise IdempotencyInProgressError(
            f"a request with this {HEADER} is still being processed; retry shortly", details={"key": key}
        )
    try:
        yield
    finally:
        if acquired:
            try:
                lock.release()
            except redis.RedisError:
                pass  # it expires by itself
