"""Jobs: submit one to a service, read it back."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag

from gateway_core.audio import fetch_audio, measure_seconds
from gateway_core.catalog import KINDS
from gateway_core.errors import ServiceDisabledError, UnknownServiceError
from gateway_core.jobs import create_job, get_job, mark_enqueued
from gateway_tasks.publish import publish_dispatch
from gateway_web.auth import SECURITY, current_tenant_id
from gateway_web.context import ctx
from gateway_web.errors import ErrorEnvelope
from gateway_web.openapi import JobgateOpenAPI, TranscribeUpload
from gateway_web.schemas import JobAccepted, JobOut, JobPath, JobQuery, ServicePath, job_link, job_out
from gateway_web.submission import JSON, MULTIPART, Submission, parse_submission

TAG = Tag(name="jobs", description="Submit inference jobs and read their state and result")
ERRORS: dict[str | int, Any] = {401: ErrorEnvelope, 404: ErrorEnvelope}
SUBMIT_ERRORS: dict[str | int, Any] = {
    **ERRORS,
    400: ErrorEnvelope,
    413: ErrorEnvelope,
    415: ErrorEnvelope,
    503: ErrorEnvelope,
}


def submit(service: str) -> tuple[Response, int, dict[str, str]]:
    """Validate, authenticate, record and enqueue a job; 202 with its id."""
    c = ctx()
    svc = c.settings.services[service]
    if not svc.enabled:
        raise ServiceDisabledError(f"service {service} is disabled", details={"service": service})
    gw = c.settings.gateway
    sub = parse_submission(KINDS[svc.kind], gw.max_body_bytes)
    if sub.audio_url:  # authenticate before fetching anything on a client's behalf
        current_tenant_id()
        _fetch(sub, gw.max_body_bytes, gw.audio_fetch_timeout_seconds, gw.allow_private_audio_urls)
    with c.db.transaction() as s:
        tenant_id = current_tenant_id(s)
        job = create_job(
            s,
            tenant_id=tenant_id,
            service=service,
            request=sub.request,
            input_data=sub.audio,
            input_content_type=sub.audio_content_type,
            audio_seconds=sub.audio_seconds,
        )
    # Sent only after the commit; if the broker is away the sweeper sends it later (enqueued_at stays NULL).
    if publish_dispatch(c.celery, job.id, service):
        with c.db.transaction() as s:
            mark_enqueued(s, job.id)
    body = JobAccepted(id=job.id, status=job.state, service=service, created_at=job.created_at, links=job_link(job.id))
    return jsonify(body.model_dump(mode="json")), 202, {"Location": body.links.self}


def _fetch(sub: Submission, max_bytes: int, timeout: float, allow_private: bool) -> None:
    assert sub.audio_url
    sub.audio, sub.audio_content_type = fetch_audio(
        sub.audio_url, max_bytes=max_bytes, timeout=timeout, allow_private=allow_private
    )
    sub.audio_seconds = measure_seconds(sub.audio)


def make_blueprint(app: JobgateOpenAPI) -> APIBlueprint:
    """Routes for the configured services, registered so each gets its own schema in the OpenAPI document."""
    settings = app.extensions["jobgate"].settings
    bp = APIBlueprint("jobs", __name__, url_prefix="/v1", abp_tags=[TAG], abp_security=SECURITY)

    for name, svc in settings.services.items():
        kind = KINDS[svc.kind]

        def view(_name: str = name) -> tuple[Response, int, dict[str, str]]:
            return submit(_name)

        view.__name__ = f"submit_{name.replace('-', '_')}"
        view.__doc__ = f"Submit a {kind.name} job to {name}."
        bp.post(f"/jobs/{name}", responses={202: JobAccepted, **SUBMIT_ERRORS}, operation_id=f"submit_{name}")(view)
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

    @bp.get("/jobs/<job_id>", responses={200: JobOut, **ERRORS})
    def read_job(path: JobPath, query: JobQuery) -> Response:
        """A job's state, attempts, timings, and its result or error; ?include=events adds the history."""
        tenant_id = current_tenant_id()
        with ctx().db.transaction() as s:
            job = get_job(s, path.job_id, tenant_id=tenant_id)
            if query.include == "events":
                s.refresh(job, ["events"])
            out = job_out(job, with_events=query.include == "events").model_dump(mode="json")
        if out["events"] is None:
            del out["events"]
        return jsonify(out)

    return bp
