"""The benchmark's baseline: a bare Flask endpoint that only sends the dispatch task (same Celery config)."""

from __future__ import annotations

import uuid

from flask import Flask, jsonify

from gateway_core.settings import load_settings
from gateway_tasks.celery_app import create_celery
from gateway_tasks.publish import publish_dispatch


def create_baseline() -> Flask:
    settings = load_settings()
    celery = create_celery(settings)
    app = Flask("baseline")

    @app.post("/baseline")
    def baseline():  # type: ignore[no-untyped-def]
        job_id = str(uuid.uuid4())
        publish_dispatch(celery, job_id, "codegen")
        return jsonify({"id": job_id}), 202

    return app
