"""Calling a replica over the replica protocol (docs/replica-protocol.md) and classifying its failures."""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from typing import Any

import gevent
import httpx
from celery.exceptions import SoftTimeLimitExceeded

from gateway_core.dispatch import Answer, AttemptFailed, Claimed
from gateway_core.settings import ReplicaConfig
from gateway_tasks.pool import gevent_active

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaError(AttemptFailed, Exception):
    """A failed call, raised where it happens and recorded as the attempt's failure."""


def build_payload(claimed: Claimed) -> dict[str, Any]:
    """The body of ``POST /v1/process`` for a claimed job."""
    payload: dict[str, Any] = {
        "job_id": claimed.job_id,
        "service": claimed.service,
        "kind": claimed.svc.kind,
        "input": claimed.request,
    }
    if claimed.audio is not None:
        media, data = claimed.audio
        payload["audio"] = {"content_type": media, "data_base64": base64.b64encode(data).decode()}
    return payload


def cancel_at_replica(http: httpx.Client, replica: ReplicaConfig, job_id: str) -> bool:
    """Ask the replica to stop working on the job (``POST /v1/cancel``); whether it said it did. A replica
    without the route, or one that cannot be reached, just runs the job to its end unheard."""
    try:
        resp = http.post(f"{replica.base_url}/v1/cancel", json={"job_id": job_id}, timeout=CANCEL_TIMEOUT_SECONDS)
    except httpx.HTTPError as exc:
        log.warning("could not cancel job %s at replica %s: %s", job_id, replica.name, exc)
        return False
    return resp.status_code == 200


CANCEL_TIMEOUT_SECONDS = 5.0


def _reason(resp: httpx.Response) -> str:
    try:
        err = resp.json().get("error", {})
        return str(err.get("message") or err)[:500]
    except (ValueError, AttributeError):
        return resp.text[:500]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def call_replica(
    http: httpx.Client, replica: ReplicaConfig, payload: dict[str, Any], *, timeout: float | None = None
) -> Answer:
    """POST the job to the replica, allowing ``timeout`` seconds (the replica's own by default);
    its answer ({output, usage}) or a ReplicaError."""
    seconds = replica.timeout if timeout is None else timeout
    late = ReplicaError("REPLICA_TIMEOUT", f"no answer within {seconds:g} s", retriable=True)
    # httpx's timeout bounds each read, not the whole answer (a replica trickling bytes would outlast it);
    # in a gevent worker a timer bounds the whole call. A soft time limit, where a pool enforces one, ends
    # the call the same way: a timed-out attempt.
    deadline = gevent.Timeout(seconds) if gevent_active() else None
    try:
        if deadline is not None:
            deadline.start()
        resp = http.post(
            f"{replica.base_url}/v1/process", json=payload, timeout=httpx.Timeout(seconds, connect=min(5.0, seconds))
        )
    except (httpx.TimeoutException, SoftTimeLimitExceeded):
        raise late from None
    except gevent.Timeout as exc:
        if exc is not deadline:
            raise
        raise late from None
    except httpx.TransportError as exc:
        raise ReplicaError("REPLICA_UNREACHABLE", f"{exc.__class__.__name__}: {exc}", retriable=True) from None
    finally:
        if deadline is not None:
            deadline.close()
    if resp.status_code >= 500 or resp.status_code == 429:
        raise ReplicaError("REPLICA_ERROR", _reason(resp), retriable=True, status=resp.status_code)
    if resp.status_code >= 400:
        raise ReplicaError("REPLICA_REJECTED", _reason(resp), retriable=False, status=resp.status_code)
    try:
        # Infinity and NaN are not JSON: a replica sending them sends a bad answer (the database's json type
        # would refuse to store them with the result).
        body = json.loads(resp.content, parse_constant=_no_constant)
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("output"), dict):
        raise ReplicaError(
            "REPLICA_BAD_RESPONSE",
            "answer has no JSON 'output' object",
            retriable=True,
            status=resp.status_code,
        )
    return Answer(body["output"], body.get("usage") or {})
