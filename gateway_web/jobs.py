"""Jobs: submit one to a service, read it back, cancel it."""

from __future__ import annotations

import functools
import logging
from typing import Any

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from gateway_core import lifecycle
from gateway_core.admission import JobInput
from gateway_core.admission import submit as submit_job
from gateway_core.audio import fetch_audio, measure_seconds
from gateway_core.catalog import KINDS
from gateway_core.errors import ServiceDisabledError, UnknownServiceError
from gateway_core.jobs import get_job
from gateway_core.settings import Settings
from gateway_core.states import TERMINAL
from gateway_tasks.publish import publish_dispatch
from gateway_web.auth import SECURITY, principal
from gateway_web.context import ctx
from gateway_web.errors import ErrorEnvelope
from gateway_web.idempotency import idempotency_key, in_flight_guard, request_hash
from gateway_web.limits import limited
from gateway_web.openapi import JobgateOpenAPI, TranscribeUpload
from gateway_web.schemas import JobAccepted, JobOut, JobPath, JobQuery, ServicePath, job_link, job_out
from gateway_web.submission import JSON, MULTIPART, Submission, parse_submission
from gateway_web.waits import applied, preferred_wait, wait_for_end

log = logging.getLogger(__name__)

TAG = Tag(name="jobs", description="Submit inference jobs, read their state and result, cancel them")
ERRORS: dict[str | int, Any] = {401: ErrorEnvelope, 404: ErrorEnvelope, 429: ErrorEnvelope}
SUBMIT_ERRORS: dict[str | int, Any] = {
    **ERRORS,
    400: ErrorEnvelope,
    402: ErrorEnvelope,
    409: ErrorEnvelope,
    413: ErrorEnvelope,
    415: ErrorEnvelope,
    503: ErrorEnvelope,
}


def submit(service: str) -> tuple[Response, int, dict[str, str]]:
    """Validate, admit (concurrency, quotas, credits), record and enqueue a job; 202 with its id. With
    ``Prefer: wait=N``, 200 with the ended job if it ends within N seconds."""
    c = ctx()
    svc = c.settings.services[service]
    if not svc.enabled:
        raise ServiceDisabledError(f"service {service} is disabled", details={"service": service})
    gw = c.settings.gateway
    key = idempotency_key()
    wait = preferred_wait()  # refused before anything is admitted
    sub = parse_submission(KINDS[svc.kind], gw.max_body_bytes)
    if sub.audio_url:
        _fetch(sub, gw.max_body_bytes, gw.audio_fetch_timeout_seconds, gw.allow_private_audio_urls)
    job_input = JobInput(service, sub.request, sub.audio, sub.audio_content_type, sub.audio_seconds)
    fingerprint = request_hash(job_input) if key else None
    tenant_id = principal().tenant_id
    with in_flight_guard(c.redis, tenant_id, key):
        admitted = submit_job(
            c.db,
            c.settings,
            functools.partial(publish_dispatch, c.celery),
            tenant_id=tenant_id,
            job_input=job_input,
            idempotency_key=key,
            request_hash=fingerprint,
        )
    job = admitted.job
    headers = {"Location": job_link(job.id).self}
    if admitted.replayed:
        headers["Idempotent-Replayed"] = "true"
    if wait is not None:
        headers.update(applied(wait))
        try:
            out, ended = wait_for_end(job.id, wait, functools.partial(_read, job.id, tenant_id, with_events=False))
        except (OperationalError, PoolTimeoutError) as exc:  # accepted all the same: answer the 202, not an error
            log.warning("wait on job %s cut short: %s", job.id, exc)
            ended = False
        if ended:  # within the wait: the job itself, result or error included
            return jsonify(out), 200, headers
    body = JobAccepted(id=job.id, status=job.state, service=service, created_at=job.created_at, links=job_link(job.id))
    return jsonify(body.model_dump(mode="json")), 202, headers


def _read(job_id: str, tenant_id: int, *, with_events: bool) -> tuple[dict[str, Any], bool]:
    """The job as a client sees it (only the tenant's own), and whether it has ended."""
    with ctx().db.transaction() as s:
        job = get_job(s, job_id, tenant_id=tenant_id)
        if with_events:
            s.refresh(job, ["events"])
        out = job_out(job, with_events=with_events).model_dump(mode="json")
        ended = job.state in TERMINAL
    if out["events"] is None:
        del out["events"]
    return out, ended


def _fetch(sub: Submission, max_bytes: int, timeout: float, allow_private: bool) -> None:
    assert sub.audio_url
    sub.audio, sub.audio_content_type = fetch_audio(
        sub.audio_url, max_bytes=max_bytes, timeout=timeout, allow_private=allow_private
    )
    sub.audio_seconds = measure_seconds(sub.audio)


def make_blueprint(app: JobgateOpenAPI) -> APIBlueprint:
    """Routes for the configured services, registered so each gets its own schema in the OpenAPI document."""
    settings: Settings = app.extensions["jobgate"].settings
    read_cost = settings.rate_limits.read_cost
    bp = APIBlueprint("jobs", __name__, url_prefix="/v1", abp_tags=[TAG], abp_security=SECURITY)

    for name, svc in settings.services.items():
        kind = KINDS[svc.kind]

        def view(_name: str = name) -> tuple[Response, int, dict[str, str]]:
            return submit(_name)

        view.__name__ = view.__qualname__ = f"submit_{name.replace('-', '_')}"
        view.__doc__ = f"Submit a {kind.name} job to {name}."
        responses = {200: JobOut, 202: JobAccepted, **SUBMIT_ERRORS}
        bp.post(f"/jobs/{name}", responses=responses, operation_id=f"submit_{name}")(
            limited(app, settings, view, weight=svc.cost_weight, endpoint_limit=svc.rate_limit)
        )
        bodies: dict[str, Any] = {JSON: kind.json_model}
        if kind.takes_audio:
            bodies[MULTIPART] = TranscribeUpload
        app.request_bodies[f"/v1/jobs/{name}"] = bodies

    @bp.post("/jobs/<service>", doc_ui=False)
    def submit_unknown(path: ServicePath) -> Response:
        raise UnknownServiceError(
            f"no service {path.service!r}",
            details={"service": path.service, "available": sorted(settings.services)},
        )

    def read_job(path: JobPath, query: JobQuery) -> Response | tuple[Response, int, dict[str, str]]:
        """A job's state, attempts, timings, and its result or error; ?include=events adds the history.
        With ``Prefer: wait=N`` the answer waits until the job ends or N seconds pass."""
        wait = preferred_wait()
        tenant_id = principal().tenant_id

        def read() -> tuple[dict[str, Any], bool]:
            return _read(path.job_id, tenant_id, with_events=query.include == "events")

        if wait is None:
            return jsonify(read()[0])
        return jsonify(wait_for_end(path.job_id, wait, read)[0]), 200, applied(wait)

    def cancel_job(path: JobPath) -> Response:
        """Cancel a job that has not ended; its reserved credits are released. 409 if it already ended."""
        with ctx().db.transaction() as s:
            job = lifecycle.cancel(s, path.job_id, principal().tenant_id)
            out = job_out(job, with_events=False).model_dump(mode="json")
        del out["events"]
        return jsonify(out)

    bp.get("/jobs/<job_id>", responses={200: JobOut, **ERRORS})(
        limited(app, settings, read_job, weight=read_cost, endpoint_limit=None)
    )
    bp.delete("/jobs/<job_id>", responses={200: JobOut, 409: ErrorEnvelope, **ERRORS})(
        limited(app, settings, cancel_job, weight=read_cost, endpoint_limit=None)
    )
    return bp
