"""Jobs: submit one to a service, list them, read one back, cancel it, retry it."""

from __future__ import annotations

import base64
import functools
import logging
from datetime import datetime
from typing import Any

from flask import Response, jsonify, request
from flask_openapi3 import APIBlueprint, Tag
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from gateway_core import lifecycle
from gateway_core.admission import JobInput, retry
from gateway_core.admission import submit as submit_job
from gateway_core.audio import fetch_audio, measure_seconds
from gateway_core.catalog import KINDS
from gateway_core.errors import InvalidRequestError, ServiceDisabledError, UnknownServiceError
from gateway_core.jobs import JobFilter, get_job, jobs_page
from gateway_core.models import Job
from gateway_core.settings import Settings
from gateway_core.states import TERMINAL, JobState
from gateway_tasks.publish import publish_dispatch
from gateway_web.auth import SECURITY, principal
from gateway_web.context import ctx
from gateway_web.errors import ErrorEnvelope
from gateway_web.idempotency import idempotency_key, in_flight_guard, request_hash
from gateway_web.limits import limited
from gateway_web.openapi import JobgateOpenAPI, TranscribeUpload
from gateway_web.schemas import (
    JobAccepted,
    JobList,
    JobListQuery,
    JobOut,
    JobPath,
    JobQuery,
    ServicePath,
    job_link,
    job_out,
)
from gateway_web.streams import job_events
from gateway_web.submission import JSON, MULTIPART, Submission, parse_submission
from gateway_web.waits import applied, preferred_wait, wait_for_end

log = logging.getLogger(__name__)

TAG = Tag(name="jobs", description="Submit inference jobs, list them, read their state and result, cancel, retry")
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


def _conditional(out: dict[str, Any], ended: bool, headers: dict[str, str] | None = None) -> Response:
    """The job with an ETag (304 to an If-None-Match that still matches) and, while it runs, a Retry-After
    hint of when to poll again."""
    resp = jsonify(out)
    resp.headers.update(headers or {})
    if not ended:
        resp.headers["Retry-After"] = str(POLL_AFTER_SECONDS)
    resp.add_etag()
    resp.make_conditional(request)  # 304, body dropped, when If-None-Match names this ETag
    return resp


POLL_AFTER_SECONDS = 1  # while a job runs: a client polling sooner learns nothing it could not wait for


def _cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _position(cursor: str) -> tuple[datetime, str]:
    try:
        at, job_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split("|")
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError("naive")
        return when, job_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(
            "cursor is not one this API gave out", code="INVALID_CURSOR", details={"cursor": cursor}
        ) from exc


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

    def list_jobs(query: JobListQuery) -> Response:
        """The tenant's jobs, newest first, filtered by state, service and created range, a page at a time
        (follow next_cursor; a page never repeats or skips a job, however many are submitted meanwhile)."""
        states = tuple(JobState(v) for v in query.status.split(",")) if query.status else ()
        flt = JobFilter(states, query.service, query.created_after, query.created_before)
        after = _position(query.cursor) if query.cursor else None
        with ctx().db.transaction() as s:
            jobs = jobs_page(s, principal().tenant_id, flt, after=after, limit=query.limit + 1)
            page = [job_out(job, with_events=False).model_dump(mode="json", exclude={"events"}) for job in jobs]
        more = len(jobs) > query.limit
        body = {"data": page[: query.limit], "next_cursor": _cursor(jobs[query.limit - 1]) if more else None}
        return jsonify(body)

    def read_job(path: JobPath, query: JobQuery) -> Response:
        """A job's state, attempts, timings, credits, and its result or error; ?include=events adds the
        history. An ETag comes with it (If-None-Match: 304 while unchanged) and, while the job runs, a
        Retry-After poll hint. With ``Prefer: wait=N`` the answer waits until the job ends or N seconds pass."""
        wait = preferred_wait()
        tenant_id = principal().tenant_id

        def read() -> tuple[dict[str, Any], bool]:
            return _read(path.job_id, tenant_id, with_events=query.include == "events")

        if wait is None:
            return _conditional(*read())
        return _conditional(*wait_for_end(path.job_id, wait, read), headers=applied(wait))

    def stream_job(path: JobPath) -> Response:
        """The job's state changes as Server-Sent Events (``event: state``, ``id`` the event's own), the last
        carrying the ended job with its result or error; then the stream ends. Reconnect with
        ``Last-Event-ID`` to get exactly the events missed."""
        return job_events(path.job_id, principal().tenant_id)

    def cancel_job(path: JobPath) -> Response:
        """Cancel a job that has not ended; its reserved credits are released. 409 if it already ended."""
        with ctx().db.transaction() as s:
            job = lifecycle.cancel(s, path.job_id, principal().tenant_id)
            out = job_out(job, with_events=False).model_dump(mode="json", exclude={"events"})
        return jsonify(out)

    def cancel_job_post(path: JobPath) -> Response:
        """Cancel a job that has not ended (the same as DELETE /v1/jobs/{job_id})."""
        return cancel_job(path)

    def retry_job(path: JobPath) -> tuple[Response, int, dict[str, str]]:
        """Run a FAILED or CANCELED job again under the same id, admitted as a new submit would be (concurrency,
        quotas, credits reserved again); 409 for a job that has not ended or succeeded."""
        c = ctx()
        job = retry(
            c.db,
            c.settings,
            functools.partial(publish_dispatch, c.celery),
            tenant_id=principal().tenant_id,
            job_id=path.job_id,
        )
        body = JobAccepted(
            id=job.id, status=job.state, service=job.service, created_at=job.created_at, links=job_link(job.id)
        )
        return jsonify(body.model_dump(mode="json")), 202, {"Location": job_link(job.id).self}

    def reads(view: Any) -> Any:
        return limited(app, settings, view, weight=read_cost, endpoint_limit=None, budget="read")

    bp.get("/jobs", responses={200: JobList, **ERRORS})(reads(list_jobs))
    bp.get("/jobs/<job_id>", responses={200: JobOut, 304: None, **ERRORS})(reads(read_job))
    bp.get("/jobs/<job_id>/events", responses={200: None, 400: ErrorEnvelope, **ERRORS})(reads(stream_job))
    cancel_responses: dict[str | int, Any] = {200: JobOut, 409: ErrorEnvelope, **ERRORS}
    bp.delete("/jobs/<job_id>", responses=cancel_responses)(reads(cancel_job))
    bp.post("/jobs/<job_id>/cancel", responses=cancel_responses)(reads(cancel_job_post))
    retry_responses: dict[str | int, Any] = {202: JobAccepted, 402: ErrorEnvelope, 409: ErrorEnvelope, **ERRORS}
    bp.post("/jobs/<job_id>/retry", responses=retry_responses)(
        limited(app, settings, retry_job, weight=read_cost, endpoint_limit=None)
    )
    return bp
