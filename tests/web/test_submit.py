"""Submitting jobs over HTTP: the happy path through a real worker and replicas, and every refusal."""

from __future__ import annotations

import io
from typing import Any

import pytest
from sqlalchemy import func, select

from gateway_core.models import Job
from tests.audio import wav_bytes
from tests.conftest import TenantKey, wait_terminal


def _job_count(db: Any, tenant_id: int) -> int:
    with db.transaction() as s:
        return int(s.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id)))


def _states(job: Job) -> list[str]:
    return [e.to_state.value for e in job.events]


def test_transcribe_upload_runs_to_succeeded(client: Any, worker: Any, tenant: TenantKey, db: Any) -> None:
    resp = client.post(
        "/v1/jobs/transcribe",
        headers=tenant.headers,
        data={"file": (io.BytesIO(wav_bytes(1.5)), "hello.wav"), "language": "en"},
    )
    assert resp.status_code == 202, resp.json
    body = resp.json
    assert body["status"] == "QUEUED" and body["service"] == "transcribe"
    assert resp.headers["Location"] == f"/v1/jobs/{body['id']}" == body["links"]["self"]

    job = wait_terminal(db, body["id"])
    assert _states(job) == ["RECEIVED", "QUEUED", "DISPATCHED", "PROCESSING", "SUCCEEDED"]

    got = client.get(f"/v1/jobs/{body['id']}", headers=tenant.headers).json
    assert got["status"] == "SUCCEEDED"
    assert got["audio_seconds"] == pytest.approx(1.5)
    assert got["result"]["output"]["text"] == "[simulated transcript of 1.50 s of audio]"
    assert got["replica"] in ("transcribe-a", "transcribe-b") and got["attempts"] == 1
    assert got["timings"]["finished_at"] >= got["timings"]["started_at"] >= got["timings"]["created_at"]
    assert "events" not in got


def test_transcribe_audio_url_is_fetched_and_measured(
    client: Any, worker: Any, tenant: TenantKey, db: Any, audio_server: str
) -> None:
    resp = client.post("/v1/jobs/transcribe", headers=tenant.headers, json={"audio_url": f"{audio_server}/clip.wav"})
    assert resp.status_code == 202, resp.json
    job = wait_terminal(db, resp.json["id"])
    assert job.state == "SUCCEEDED"
    assert job.audio_seconds == pytest.approx(2.5)
    assert job.result["usage"]["audio_seconds"] == pytest.approx(2.5)

    missing = client.post("/v1/jobs/transcribe", headers=tenant.headers, json={"audio_url": f"{audio_server}/none"})
    assert missing.status_code == 422
    assert missing.json["error"]["details"]["fields"][0]["field"] == "audio_url"


def test_codegen_runs_to_succeeded(client: Any, worker: Any, tenant: TenantKey, db: Any) -> None:
    resp = client.post(
        "/v1/jobs/codegen",
        headers=tenant.headers,
        json={"prompt": "reverse a list", "language": "python", "max_tokens": 64, "temperature": 0},
    )
    assert resp.status_code == 202
    job = wait_terminal(db, resp.json["id"])
    assert job.state == "SUCCEEDED"
    assert "reverse a list" in job.result["output"]["code"]


BAD_INPUTS = [
    # (path, request kwargs, status, code)
    ("/v1/jobs/nope", {"json": {"prompt": "x"}}, 404, "UNKNOWN_SERVICE"),
    ("/v1/jobs/codegen-off", {"json": {"prompt": "x"}}, 503, "SERVICE_DISABLED"),
    ("/v1/jobs/codegen", {"json": {"prompt": ""}}, 422, "VALIDATION_FAILED"),
    (
        "/v1/jobs/codegen",
        {"json": {"prompt": "x", "max_tokens": 0, "temperature": 9}},
        422,
        "VALIDATION_FAILED",
    ),
    ("/v1/jobs/codegen", {"json": {"prompt": "x", "surprise": 1}}, 422, "VALIDATION_FAILED"),
    ("/v1/jobs/codegen", {"json": ["prompt"]}, 422, "VALIDATION_FAILED"),
    ("/v1/jobs/codegen", {"data": "{not json", "content_type": "application/json"}, 400, "INVALID_JSON"),
    ("/v1/jobs/codegen", {"data": "prompt=x", "content_type": "text/plain"}, 415, "UNSUPPORTED_MEDIA_TYPE"),
    (
        "/v1/jobs/codegen",
        {"data": {"prompt": "x"}, "content_type": "multipart/form-data"},
        415,
        "UNSUPPORTED_MEDIA_TYPE",
    ),
    ("/v1/jobs/codegen", {"json": {"prompt": "x" * 300_000}}, 413, "PAYLOAD_TOO_LARGE"),
    (
        "/v1/jobs/transcribe",
        {"data": {"language": "en"}, "content_type": "multipart/form-data"},
        422,
        "VALIDATION_FAILED",
    ),  # no file part
    (
        "/v1/jobs/transcribe",
        {"data": {"file": (io.BytesIO(b"not audio at all" * 10), "x.wav")}},
        422,
        "VALIDATION_FAILED",
    ),
    (
        "/v1/jobs/transcribe",
        {"data": {"file": (io.BytesIO(b"\0" * 300_000), "big.wav")}},
        413,
        "PAYLOAD_TOO_LARGE",
    ),
    ("/v1/jobs/transcribe", {"json": {"audio_url": "ftp://example.com/a.wav"}}, 422, "VALIDATION_FAILED"),
    ("/v1/jobs/transcribe", {"json": {"language": "en"}}, 422, "VALIDATION_FAILED"),
]


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "code"),
    BAD_INPUTS,
    ids=[f"{c}-{i}" for i, (_, _, _, c) in enumerate(BAD_INPUTS)],
)
def test_bad_input_gets_its_status_in_the_envelope_and_creates_no_job(
    client: Any, tenant: TenantKey, db: Any, path: str, kwargs: dict[str, Any], status: int, code: str
) -> None:
    resp = client.post(path, headers={**tenant.headers, "X-Request-ID": "trace-me-1"}, **kwargs)
    assert resp.status_code == status, resp.json
    err = resp.json["error"]
    assert err["code"] == code
    assert err["message"] and err["timestamp"].endswith("Z")
    assert err["request_id"] == "trace-me-1" == resp.headers["X-Request-ID"]
    if status == 422:
        assert err["details"]["fields"], "422 must list the bad fields"
    if code == "UNKNOWN_SERVICE":
        assert "transcribe" in err["details"]["available"]
    assert _job_count(db, tenant.tenant_id) == 0


def test_authentication_and_tenant_isolation(client: Any, worker: Any, tenant: TenantKey, db: Any) -> None:
    body = {"prompt": "hello"}
    assert client.post("/v1/jobs/codegen", json=body).status_code == 401
    wrong = client.post("/v1/jobs/codegen", json=body, headers={"Authorization": "Bearer jg_wrong"})
    assert wrong.status_code == 401 and wrong.json["error"]["code"] == "UNAUTHENTICATED"
    assert _job_count(db, tenant.tenant_id) == 0

    mine = client.post("/v1/jobs/codegen", json=body, headers=tenant.headers).json["id"]
    with db.transaction() as s:
        from gateway_core.tenants import create_api_key, create_tenant

        other = create_tenant(s, f"other-{mine[:8]}")
        other_key = create_api_key(s, other)
    theirs = client.get(f"/v1/jobs/{mine}", headers={"Authorization": f"Bearer {other_key}"})
    assert theirs.status_code == 404 and theirs.json["error"]["code"] == "NOT_FOUND"
    assert client.get(f"/v1/jobs/{mine}").status_code == 401
    assert client.get(f"/v1/jobs/{mine}", headers=tenant.headers).status_code == 200


def test_every_response_carries_a_request_id(client: Any) -> None:
    first, second = client.get("/health"), client.get("/health")
    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]
    assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    bogus = client.get("/health", headers={"X-Request-ID": "bad id with spaces"}).headers["X-Request-ID"]
    assert bogus.startswith("req-")
