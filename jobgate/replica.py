"""The reference replica: a real HTTP server speaking the replica protocol with plainly simulated output.

It lets the whole system run with no models (docs/replica-protocol.md). A real inference server takes
its place by answering the same two routes.
"""

from __future__ import annotations

import base64
import binascii
import logging
import random
import sys
import threading
from collections import Counter
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.serving import WSGIRequestHandler, make_server

from gateway_core.audio import measure_seconds
from gateway_core.errors import ValidationFailedError


def create_replica_app(
    service: str, name: str, latency_ms: int = 0, fail_rate: float = 0.0, seed: int | None = None
) -> Flask:
    app = Flask(f"replica-{name}")
    lock = threading.Lock()
    processed: Counter[str] = Counter()
    canceled: Counter[str] = Counter()
    running: dict[str, threading.Event] = {}  # job id -> set to stop its simulated work
    stats = {"requests": 0, "failures": 0, "in_flight": 0, "max_in_flight": 0}
    rng = random.Random(seed)

    def error(status: int, code: str, message: str) -> tuple[Response, int]:
        return jsonify({"error": {"code": code, "message": message}}), status

    @app.get("/health")
    def health() -> Response:
        return jsonify({"status": "ok", "service": service, "name": name, "in_flight": stats["in_flight"]})

    @app.post("/admin/fail-rate")
    def set_fail_rate() -> Any:
        """Simulator control: change the share of jobs answered 503 (for outage drills and tests)."""
        nonlocal fail_rate
        value = (request.get_json(silent=True) or {}).get("fail_rate")
        if not isinstance(value, int | float) or not 0 <= value <= 1:
            return error(400, "BAD_REQUEST", "fail_rate must be a number from 0 to 1")
        fail_rate = float(value)
        return jsonify({"fail_rate": fail_rate})

    @app.get("/stats")
    def stats_view() -> Response:
        with lock:
            return jsonify({**stats, "processed": dict(processed), "canceled": dict(canceled)})

    @app.post("/v1/cancel")
    def cancel() -> Any:
        """Stop the work on a job: its call answers 409 CANCELED at once (nobody waits for it any more)."""
        body = request.get_json(silent=True)
        job_id = str(body.get("job_id")) if isinstance(body, dict) and "job_id" in body else None
        if job_id is None:
            return error(400, "BAD_REQUEST", "expected a JSON object with job_id")
        with lock:
            stop = running.get(job_id)
        if stop is None:
            return error(404, "NOT_RUNNING", f"job {job_id} is not running here")
        stop.set()
        return jsonify({"job_id": job_id, "canceled": True})

    @app.post("/v1/process")
    def process() -> Any:
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("input"), dict) or "job_id" not in body:
            return error(400, "BAD_REQUEST", "expected a JSON object with job_id and input")
        job_id = str(body["job_id"])
        stop = threading.Event()
        with lock:
            stats["requests"] += 1
            stats["in_flight"] += 1
            stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
            fail = rng.random() < fail_rate
            running[job_id] = stop
        try:
            if latency_ms and stop.wait(latency_ms / 1000) or stop.is_set():
                with lock:
                    canceled[job_id] += 1
                return error(409, "CANCELED", f"job {job_id} was canceled")
            if fail:
                with lock:
                    stats["failures"] += 1
                return error(503, "SIMULATED_FAILURE", f"replica {name} failed on purpose (fail-rate {fail_rate})")
            out = _simulate(body)
            if isinstance(out, tuple):
                return error(*out)
            with lock:
                processed[job_id] += 1
            return jsonify(out)
        finally:
            with lock:
                stats["in_flight"] -= 1
                if running.get(job_id) is stop:
                    del running[job_id]

    return app


def _simulate(body: dict[str, Any]) -> dict[str, Any] | tuple[int, str, str]:
    params = body["input"]
    if body.get("kind") == "transcribe":
        audio = body.get("audio") or {}
        try:
            seconds = measure_seconds(base64.b64decode(audio.get("data_base64", ""), validate=True))
        except (binascii.Error, ValueError):
            return 400, "BAD_AUDIO", "audio.data_base64 is not base64"
        except ValidationFailedError as exc:
            return 422, "BAD_AUDIO", exc.message
        text = f"[simulated transcript of {seconds:.2f} s of audio]"
        return {
            "output": {"text": text, "language": params.get("language", "en"), "duration_seconds": seconds},
            "usage": {"audio_seconds": seconds},
        }
    if body.get("kind") == "codegen":
        prompt = str(params.get("prompt", ""))
        language = params.get("language", "python")
        code = f"# simulated {language} code for the prompt:\n# {prompt[:200]}\n"
        return {
            "output": {"language": language, "code": code},
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(code.split())},
        }
    return 400, "UNKNOWN_KIND", f"this replica cannot do kind {body.get('kind')!r}"


class _KeepAliveHandler(WSGIRequestHandler):
    """HTTP/1.1, so a worker's connection carries one call after another, as inference servers allow
    (werkzeug's development server speaks HTTP/1.0 and closes every connection)."""

    protocol_version = "HTTP/1.1"


def serve_replica(
    service: str, name: str, host: str, port: int, latency_ms: int, fail_rate: float, log_level: str = "warning"
) -> None:
    """Serve until interrupted; prints the bound URL first (port 0 picks a free one). One line per request
    (werkzeug's, at INFO) only when ``log_level`` lets INFO through."""
    logging.getLogger("werkzeug").setLevel(log_level.upper())
    app = create_replica_app(service, name, latency_ms, fail_rate)
    server = make_server(host, port, app, threaded=True, request_handler=_KeepAliveHandler)
    if logging.getLevelName(log_level.upper()) <= logging.INFO:
        print(f"replica {name} ({service}) listening on http://{host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        sys.stdout.flush()
