"""Bad input gets a 4xx in the envelope, never a 5xx, and creates no job: schemathesis over the served
OpenAPI document with valid keys, and property-based cases for the classes of input that once reached a
500 (deep JSON, control characters, values past a column's length or range, loose types)."""

from __future__ import annotations

import io
import ipaddress
from typing import Any
from urllib.parse import quote

import pytest
import schemathesis
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance
from sqlalchemy import func, select

from gateway_core.audio import is_public_address
from gateway_core.models import Job, Tenant
from gateway_core.tenants import create_api_key
from tests.audio import wav_bytes
from tests.conftest import TenantKey, make_tenant

DOCUMENTED_5XX = {"SERVICE_DISABLED", "NOT_READY", "DATABASE_UNAVAILABLE"}
FUZZ = hsettings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def admin(db: Any) -> TenantKey:
    """An enterprise tenant whose key has the admin scope: every operation of the document is reachable."""
    tenant = make_tenant(db, tier="enterprise", credits=10**9)
    with db.transaction() as s:
        key = create_api_key(s, s.get(Tenant, tenant.tenant_id), ("admin",))
    return TenantKey(tenant.tenant_id, key)


def test_every_operation_answers_within_its_documented_responses(app: Any, admin: TenantKey, audio_server: str) -> None:
    # schemathesis's own pytest plugin reads a name pytest 9 no longer has, so each operation's strategy is
    # driven here with hypothesis directly; the checks are schemathesis's defaults (no 5xx, status and body
    # as documented).
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    # Not codegen-glacial: its one slot takes a minute a job, and forty fuzzed jobs waiting for it would hold
    # the session worker's greenlets for the rest of the run.
    operations = [op for op in (r.ok() for r in schema.get_all_operations()) if "glacial" not in op.path]
    assert len(operations) >= 10
    for operation in operations:

        @FUZZ
        @given(case=operation.as_strategy().map(lambda case: _local_audio(case, f"{audio_server}/clip.wav")))
        def run(case: Any) -> None:
            # A schema-valid upload may still not be audio, and a valid body may exceed the credits: acceptance of
            # valid data is not checked, every other default check is.
            resp = case.call_and_validate(
                headers={"Authorization": f"Bearer {admin.key}"},
                excluded_checks=[not_a_server_error, positive_data_acceptance],
            )
            # The one 5xx a request may get is a documented state of the gateway, never a crash.
            assert resp.status_code < 500 or resp.json()["error"]["code"] in DOCUMENTED_5XX, resp.text[:300]

        run()


def _local_audio(case: Any, url: str) -> Any:
    """The gateway fetches audio_url: the fuzz points it at this machine's audio server, never elsewhere."""
    if isinstance(case.body, dict) and "audio_url" in case.body:
        case.body["audio_url"] = url
    return case


def _jobs(db: Any, tenant_id: int) -> int:
    with db.transaction() as s:
        return int(s.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id)) or 0)


def _assert_refused(resp: Any) -> None:
    assert 400 <= resp.status_code < 500, resp.get_data(as_text=True)[:300]
    assert resp.json["error"]["code"] and resp.json["error"]["request_id"]


JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
JSON = st.recursive(
    JSON_LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3)
)


@FUZZ
@given(body=st.dictionaries(st.sampled_from(["prompt", "language", "max_tokens", "temperature", "x"]), JSON))
def test_arbitrary_json_bodies_are_accepted_or_refused_never_a_5xx(client: Any, db: Any, body: dict[str, Any]) -> None:
    tenant = make_tenant(db, tier="enterprise")
    resp = client.post("/v1/jobs/codegen", headers=tenant.headers, json=body)
    if resp.status_code != 202:
        _assert_refused(resp)
        assert _jobs(db, tenant.tenant_id) == 0


@pytest.mark.parametrize("depth", [33, 1_000, 100_000])
def test_json_nested_past_the_bound_is_400(client: Any, db: Any, tenant: TenantKey, depth: int) -> None:
    body = '{"prompt": "x", "extra": ' + "[" * depth + "]" * depth + "}"
    resp = client.post("/v1/jobs/codegen", headers={**tenant.headers, "Content-Type": "application/json"}, data=body)
    _assert_refused(resp)
    assert resp.json["error"]["code"] == "INVALID_JSON" and "nested deeper" in resp.json["error"]["details"]["reason"]


@FUZZ
@given(text=st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40))
@example(text="/0")  # /v1/jobs//0 was a 308 to /v1/jobs/0: another job than the one named
def test_any_path_segment_or_query_value_is_never_a_5xx(client: Any, tenant: TenantKey, text: str) -> None:
    _assert_refused(client.get(f"/v1/jobs/{quote(text, safe='')}", headers=tenant.headers))
    resp = client.get(f"/v1/jobs/some-id?include={quote(text, safe='')}", headers=tenant.headers)
    _assert_refused(resp)


@FUZZ
@given(
    filename=st.text(max_size=300),
    content_type=st.text(alphabet=st.characters(codec="latin-1", exclude_characters="\r\n"), min_size=1, max_size=300),
    prompt=st.text(max_size=50),
)
def test_any_upload_part_is_accepted_or_refused_never_a_5xx(
    client: Any, db: Any, filename: str, content_type: str, prompt: str
) -> None:
    tenant = make_tenant(db, tier="enterprise")
    upload = {"file": (io.BytesIO(wav_bytes(0.5)), filename, content_type), "prompt": prompt}
    resp = client.post("/v1/jobs/transcribe", headers=tenant.headers, data=upload)
    if resp.status_code == 202:
        assert "\x00" not in filename + prompt
    else:
        _assert_refused(resp)
        assert _jobs(db, tenant.tenant_id) == 0


@pytest.mark.parametrize(
    ("field", "value"), [("temperature", False), ("temperature", "0.5"), ("max_tokens", "12"), ("max_tokens", True)]
)
def test_numbers_must_be_json_numbers(client: Any, db: Any, tenant: TenantKey, field: str, value: Any) -> None:
    resp = client.post("/v1/jobs/codegen", headers=tenant.headers, json={"prompt": "x", field: value})
    assert resp.status_code == 422 and resp.json["error"]["details"]["fields"][0]["field"] == field


@FUZZ
@given(amount=st.integers())
def test_any_grant_amount_is_a_grant_or_a_4xx(client: Any, admin: TenantKey, amount: int) -> None:
    target = admin.tenant_id
    resp = client.post(f"/v1/admin/tenants/{target}/credits", headers=admin.headers, json={"amount": amount})
    if resp.status_code != 201:
        _assert_refused(resp)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("100.64.0.1", False),  # shared address space (carrier-grade NAT)
        ("169.254.169.254", False),  # link-local: cloud metadata
        ("224.0.0.1", False),  # multicast
        ("::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("2002:7f00:1::", False),  # 6to4 embedding 127.0.0.1
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("64:ff9b:1::7f00:1", False),  # local-use NAT64 of 127.0.0.1
        ("::7f00:1", False),  # IPv4-compatible 127.0.0.1
        ("64:ff9b::5db8:d822", True),  # NAT64 of a public address
        ("fe80::1", False),
    ],
)
def test_audio_urls_reach_only_globally_routable_addresses(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_an_audio_url_naming_loopback_is_refused(client: Any, tenant: TenantKey, app: Any) -> None:
    from gateway_core.audio import fetch_audio
    from gateway_core.errors import ValidationFailedError

    with pytest.raises(ValidationFailedError, match="not on the public internet"):
        fetch_audio("http://localhost:9/clip.wav", max_bytes=1000, timeout=1, allow_private=False)


@pytest.mark.parametrize(("size", "status"), [(1_000, 202), (10 * 1024 * 1024, 413)])
def test_a_chunked_body_is_measured_as_it_is_read(client: Any, tenant: TenantKey, size: int, status: int) -> None:
    body = b'{"prompt": "' + b"x" * size + b'", "max_tokens": 1}'
    resp = client.post(
        "/v1/jobs/codegen",
        headers={**tenant.headers, "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        input_stream=io.BytesIO(body),
        environ_overrides={"wsgi.input_terminated": True},  # what gunicorn says of a chunked body
    )
    assert resp.status_code == status, resp.get_data(as_text=True)[:300]
