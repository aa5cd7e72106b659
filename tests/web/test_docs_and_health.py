"""OpenAPI document, interactive docs, liveness and readiness."""

from __future__ import annotations

from typing import Any

from gateway_core.settings import Settings
from gateway_web import create_app
from tests.procs import free_port


def test_openapi_lists_every_endpoint_with_its_schemas(client: Any, settings: Settings) -> None:
    spec = client.get("/openapi.json").json
    assert spec["openapi"].startswith("3.")
    paths = spec["paths"]
    for service in settings.services:
        op = paths[f"/v1/jobs/{service}"]["post"]
        assert op["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith("/JobAccepted")
        assert op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorEnvelope")
        assert op["security"] == [{"bearer": []}]
    transcribe = paths["/v1/jobs/transcribe"]["post"]["requestBody"]["content"]
    assert set(transcribe) == {"application/json", "multipart/form-data"}
    schemas = spec["components"]["schemas"]
    assert schemas["TranscribeUpload"]["properties"]["file"]["format"] == "binary"
    assert schemas["CodegenRequest"]["properties"]["max_tokens"]["maximum"] == 8192
    read = paths["/v1/jobs/{job_id}"]["get"]
    assert read["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/JobOut")
    assert {p["name"] for p in read["parameters"]} == {"job_id", "include"}
    assert {"/health", "/ready"} <= set(paths)
    credits = paths["/v1/credits"]["get"]
    assert credits["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/CreditsOut")
    assert {p["name"] for p in credits["parameters"]} == {"cursor", "limit"}
    cancel = paths["/v1/jobs/{job_id}"]["delete"]
    assert {"200", "409", "404"} <= set(cancel["responses"])
    grant = paths["/v1/admin/tenants/{tenant_id}/credits"]["post"]
    assert grant["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/GrantBody")
    assert {"201", "403"} <= set(grant["responses"])
    assert "/v1/admin/dead-letters" in paths and "/v1/admin/dead-letters/{letter_id}/replay" in paths
    for service in settings.services:
        assert {"402", "409", "429"} <= set(paths[f"/v1/jobs/{service}"]["post"]["responses"])
    assert client.get("/docs").status_code == 302
    assert b"swagger" in client.get("/docs/swagger").data.lower()


def test_health_and_ready(client: Any) -> None:
    assert client.get("/health").json == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200, ready.json
    assert ready.json["checks"] == {"database": "ok", "redis": "ok", "broker": "ok"}


def test_ready_names_what_is_down(settings: Settings) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(settings.model_copy(update={"redis_url": dead, "broker_url": dead}))
    resp = app.test_client().get("/ready")
    assert resp.status_code == 503
    err = resp.json["error"]
    assert err["code"] == "NOT_READY"
    checks = err["details"]["checks"]
    assert checks["database"] == "ok"
    assert checks["redis"].startswith("down") and checks["broker"].startswith("down")


def test_a_method_not_allowed_is_405_with_allow_in_the_envelope(client: Any) -> None:
    resp = client.put("/health")
    assert resp.status_code == 405
    assert resp.json["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert set(resp.headers["Allow"].split(", ")) == set(resp.json["error"]["details"]["allowed_methods"]) >= {"GET"}
