"""The Flask app factory."""

from __future__ import annotations

import re
import uuid

import redis
from flask import Response, g, jsonify, redirect, request
from flask_openapi3 import Info

from gateway_core.db import Database
from gateway_core.settings import Settings, load_settings
from gateway_tasks.announce import announcer, end_listener, move_listener
from gateway_tasks.celery_app import create_celery
from gateway_tasks.pool import cooperate_with_gevent
from gateway_web import admin, credits, health, jobs
from gateway_web.auth import SECURITY_SCHEMES, init_auth
from gateway_web.context import WebContext
from gateway_web.errors import register_error_handlers, validation_error_response
from gateway_web.input_guard import init_input_guard
from gateway_web.limits import make_limiter
from gateway_web.openapi import JobgateOpenAPI

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def create_app(settings: Settings | None = None) -> JobgateOpenAPI:
    """Build the gateway app; settings default to gateway.yaml (JOBGATE_CONFIG) plus the environment."""
    settings = settings or load_settings()
    app = JobgateOpenAPI(
        __name__,
        info=Info(title="jobgate", version="0.1.0", description="HTTP gateway for AI inference jobs"),
        security_schemes=SECURITY_SCHEMES,
        doc_prefix="/docs",
        doc_url="/openapi.json",
        validation_error_status=422,
        validation_error_callback=validation_error_response,
    )
    app.config["MAX_CONTENT_LENGTH"] = settings.gateway.max_body_bytes
    # A path with doubled slashes (a job id of "/x") is not found, not redirected to another resource.
    app.url_map.merge_slashes = False
    cooperate_with_gevent()  # served by gunicorn's gevent workers: psycopg2 must yield while it waits
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    db = Database(settings.database_url)
    db.on_jobs_moved(announcer(client))
    app.extensions["jobgate"] = WebContext(
        settings=settings,
        db=db,
        celery=create_celery(settings),
        redis=client,
        # A subscription waits without a read timeout: its own client.
        job_ends=end_listener(redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2)),
        job_moves=move_listener(redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2)),
    )

    @app.before_request
    def _request_id() -> None:
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if REQUEST_ID.match(given) else f"req-{uuid.uuid4().hex}"

    @app.after_request
    def _echo_request_id(resp: Response) -> Response:
        resp.headers["X-Request-ID"] = g.get("request_id", "")
        return resp

    init_input_guard(app)  # after the request id, so its refusals carry one
    init_auth(app)  # before the limiter: limits are keyed by the authenticated tenant
    make_limiter(app, settings)
    app.register_api(health.bp)
    app.register_api(jobs.make_blueprint(app))
    app.register_api(credits.make_blueprint(app))
    app.register_api(admin.make_blueprint(app))

    @app.get("/openapi.json", doc_ui=False)
    def openapi_json() -> Response:
        return jsonify(app.api_doc)

    @app.get("/docs", doc_ui=False)
    def docs() -> Response:
        return redirect("/docs/swagger", code=302)  # type: ignore[return-value]

    register_error_handlers(app)
    return app
