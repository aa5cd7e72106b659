"""Admission over HTTP on real Redis and PostgreSQL: rate limits, concurrency caps, credits, quotas,
idempotency, cancel, admin grants."""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from gateway_core.credits import lock_tenant
from gateway_core.models import CreditEntry, Job, Tenant
from gateway_core.settings import Settings
from gateway_web import create_app
from tests.audio import wav_bytes
from tests.conftest import make_tenant, wait_message_handled, wait_terminal
from tests.procs import free_port


def _tenant_row(db: Any, tenant_id: int) -> Tenant:
    with db.transaction() as s:
        t = s.get(Tenant, tenant_id)
        assert t is not None
        return t


def _ledger(db: Any, tenant_id: int, job_id: str | None = None) -> list[tuple[str, int, int]]:
    with db.transaction() as s:
        stmt = select(CreditEntry).where(CreditEntry.tenant_id == tenant_id).order_by(CreditEntry.id)
        if job_id:
            stmt = stmt.where(CreditEntry.job_id == job_id)
        return [(e.kind, e.amount, e.reserved_change) for e in s.scalars(stmt)]


def _assert_ledger_consistent(db: Any, tenant_id: int) -> Tenant:
    # Under the tenant's row lock, which every ledger change takes: no worker settles a job in between.
    with db.transaction() as s:
        t = lock_tenant(s, tenant_id)
        entries = [
            (e.kind, e.amount, e.reserved_change)
            for e in s.scalars(select(CreditEntry).where(CreditEntry.tenant_id == tenant_id))
        ]
    assert t.credits_balance == sum(a for _, a, _ in entries) >= 0
    assert t.credits_reserved == sum(r for _, _, r in entries) >= 0
    return t


# -- rate limits ---------------------------------------------------------------------------------------------


def test_a_tier_budget_is_exact_at_the_boundary_and_shared_by_two_instances(settings: Settings, db: Any) -> None:
    free = make_tenant(db, tier="free")  # test config: free = 6 reads a minute
    instances = [create_app(settings).test_client(), create_app(settings).test_client()]
    remaining = []
    for i in range(6):
        resp = instances[i % 2].get("/v1/credits", headers=free.headers)
        assert resp.status_code == 200, resp.json
        assert resp.headers["RateLimit-Limit"] == "6"
        remaining.append(int(resp.headers["RateLimit-Remaining"]))
        assert 0 < int(resp.headers["RateLimit-Reset"]) <= 60
    assert remaining == [5, 4, 3, 2, 1, 0]
    blocked = instances[0].get("/v1/credits", headers=free.headers)
    assert blocked.status_code == 429
    err = blocked.json["error"]
    assert err["code"] == "RATE_LIMITED" and err["details"]["scope"] == "read"
    assert err["details"]["limit"] == "6 per 1 minute" and err["details"]["tier"] == "free"
    assert 1 <= int(blocked.headers["Retry-After"]) <= 60
    # Another tenant of the same tier is not affected.
    assert instances[1].get("/v1/credits", headers=make_tenant(db, tier="free").headers).status_code == 200


def test_cost_weights_endpoint_limits_and_reads_apart_from_submits(client: Any, worker: Any, db: Any) -> None:
    free = make_tenant(db, tier="free")  # test config: 6 submit units and 6 reads a minute
    heavy = client.post("/v1/jobs/codegen-heavy", headers=free.headers, json={"prompt": "x"})
    assert heavy.status_code == 202 and heavy.headers["RateLimit-Remaining"] == "3"  # 6 - weight 3
    # Polls draw on the read budget: five of them leave the submit budget as the submit left it.
    polls = [client.get(heavy.headers["Location"], headers=free.headers) for _ in range(5)]
    assert [p.headers["RateLimit-Remaining"] for p in polls] == ["5", "4", "3", "2", "1"]
    again = client.post("/v1/jobs/codegen-heavy", headers=free.headers, json={"prompt": "y"})
    assert again.status_code == 202 and again.headers["RateLimit-Remaining"] == "0"
    assert client.get("/v1/credits", headers=free.headers).headers["RateLimit-Remaining"] == "0"
    assert client.get("/v1/credits", headers=free.headers).status_code == 429

    pro = make_tenant(db)
    codes = [client.post("/v1/jobs/codegen-limited", headers=pro.headers, json={"prompt": "x"}) for _ in range(3)]
    assert [r.status_code for r in codes] == [202, 202, 429]
    assert codes[2].json["error"]["details"]["scope"] == "endpoint"
    assert client.post("/v1/jobs/codegen", headers=pro.headers, json={"prompt": "x"}).status_code == 202


def test_a_longer_window_refuses_while_the_shorter_has_room(settings: Settings, db: Any) -> None:
    """Every window of a request is checked in one Redis round trip; the first full one refuses, by name."""
    free_tier = settings.tiers["free"].model_copy(update={"read_rate_limit": "5/minute;3/hour"})
    tiers = {**settings.tiers, "free": free_tier}
    client = create_app(settings.model_copy(update={"tiers": tiers})).test_client()
    free = make_tenant(db, tier="free")
    ok = [client.get("/v1/credits", headers=free.headers) for _ in range(3)]
    assert [r.status_code for r in ok] == [200, 200, 200]
    # The headers describe the tier's own (read) budget: its shortest window, the minute.
    assert [r.headers["RateLimit-Remaining"] for r in ok] == ["4", "3", "2"]
    refused = client.get("/v1/credits", headers=free.headers)
    assert refused.status_code == 429
    assert refused.json["error"]["details"]["limit"] == "3 per 1 hour"
    assert refused.headers["RateLimit-Limit"] == "3" and refused.headers["RateLimit-Remaining"] == "0"
    assert 1 <= int(refused.headers["Retry-After"]) <= 3600


def test_global_limit_counts_all_tenants_together(settings: Settings, db: Any) -> None:
    limits = settings.rate_limits.model_copy(update={"global_limit": "3/minute"})
    client = create_app(settings.model_copy(update={"rate_limits": limits})).test_client()
    statuses = [client.get("/v1/credits", headers=make_tenant(db).headers) for _ in range(4)]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429]
    assert statuses[3].json["error"]["details"]["scope"] == "global"


def test_without_redis_limits_hold_per_process_and_credits_are_still_reserved(
    settings: Settings, worker: Any, db: Any
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = create_app(settings.model_copy(update={"redis_url": dead})).test_client()
    free = make_tenant(db, tier="free", credits=3, concurrency_limit=10)
    accepted = [client.post("/v1/jobs/codegen", headers=free.headers, json={"prompt": "x"}) for _ in range(4)]
    assert [r.status_code for r in accepted] == [202, 202, 202, 402]  # credits decide, in PostgreSQL
    for _ in range(2):
        assert client.post("/v1/jobs/codegen", headers=free.headers, json={"prompt": "x"}).status_code == 402
    limited = client.post("/v1/jobs/codegen", headers=free.headers, json={"prompt": "x"})  # 7th of 6/minute
    assert limited.status_code == 429 and limited.json["error"]["code"] == "RATE_LIMITED"
    t = _assert_ledger_consistent(db, free.tenant_id)
    assert t.credits_balance + t.credits_reserved <= 3
    assert [k for k, _, _ in _ledger(db, free.tenant_id)].count("reserve") == 3


# -- credits -------------------------------------------------------------------------------------------------


def test_fifty_parallel_submits_against_credits_for_ten(app: Any, worker: Any, db: Any) -> None:
    rich_in_limits = make_tenant(db, tier="enterprise", credits=10)

    def submit(_: int) -> int:
        resp = app.test_client().post("/v1/jobs/codegen", headers=rich_in_limits.headers, json={"prompt": "x"})
        return int(resp.status_code)

    with ThreadPoolExecutor(max_workers=25) as pool:
        statuses = list(pool.map(submit, range(50)))
    assert statuses.count(202) == 10 and statuses.count(402) == 40
    t = _assert_ledger_consistent(db, rich_in_limits.tenant_id)
    assert t.credits_balance == 0
    with db.transaction() as s:
        jobs = s.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == rich_in_limits.tenant_id))
    assert jobs == 10


def test_success_captures_the_actual_cost_and_releases_the_rest(client: Any, worker: Any, db: Any) -> None:
    t = make_tenant(db, credits=100)
    resp = client.post("/v1/jobs/codegen-tokens", headers=t.headers, json={"prompt": "sort a list", "max_tokens": 50})
    assert resp.status_code == 202
    job = wait_terminal(db, resp.json["id"])
    used = job.result["usage"]["completion_tokens"]
    assert job.state == "SUCCEEDED" and 0 < used < 50 and job.credits_charged == used
    assert _ledger(db, t.tenant_id, job.id) == [
        ("reserve", -50, 50),
        ("capture", 0, -used),
        ("release", 50 - used, -(50 - used)),
    ]
    assert _assert_ledger_consistent(db, t.tenant_id).credits_balance == 100 - used


def test_transcription_is_priced_by_the_measured_audio(client: Any, worker: Any, db: Any) -> None:
    t = make_tenant(db, credits=100)
    resp = client.post("/v1/jobs/transcribe", headers=t.headers, data={"file": (io.BytesIO(wav_bytes(1.5)), "a.wav")})
    job = wait_terminal(db, resp.json["id"])
    assert job.credits_reserved == job.credits_charged == max(1, int(1.5 * 5.555556 + 0.5)) == 8


def test_failure_releases_every_reserved_credit(client: Any, worker: Any, db: Any) -> None:
    t = make_tenant(db, credits=5)
    job = wait_terminal(db, client.post("/v1/jobs/codegen-down", headers=t.headers, json={"prompt": "x"}).json["id"])
    assert job.state == "FAILED" and job.credits_charged == 0
    assert _ledger(db, t.tenant_id, job.id) == [("reserve", -1, 1), ("release", 1, -1)]
    assert _assert_ledger_consistent(db, t.tenant_id).credits_balance == 5


def test_short_balance_is_402_with_balance_and_cost(client: Any, db: Any) -> None:
    t = make_tenant(db, credits=0)
    resp = client.post("/v1/jobs/codegen", headers=t.headers, json={"prompt": "x"})
    assert resp.status_code == 402
    assert resp.json["error"]["code"] == "INSUFFICIENT_CREDITS"
    assert resp.json["error"]["details"] == {"balance": 0, "cost": 1, "reserved": 0}


def test_cancel_releases_credits_and_the_late_result_is_ignored(
    client: Any, worker: Any, db: Any, replicas: dict[str, str], settings: Settings
) -> None:
    t = make_tenant(db, credits=10)
    job_id = client.post("/v1/jobs/codegen-slow", headers=t.headers, json={"prompt": "x"}).json["id"]
    resp = client.delete(f"/v1/jobs/{job_id}", headers=t.headers)
    assert resp.status_code == 200 and resp.json["status"] == "CANCELED"
    again = client.delete(f"/v1/jobs/{job_id}", headers=t.headers)
    assert again.status_code == 409 and again.json["error"]["code"] == "JOB_FINISHED"
    wait_message_handled(settings, "codegen-slow", job_id)  # the slow replica answered; the job stayed canceled
    job = wait_terminal(db, job_id)
    assert job.state == "CANCELED" and [e.to_state for e in job.events].count("SUCCEEDED") == 0
    assert _ledger(db, t.tenant_id, job_id) == [("reserve", -1, 1), ("release", 1, -1)]
    assert _assert_ledger_consistent(db, t.tenant_id).credits_balance == 10


def test_credits_endpoint_pages_the_ledger(client: Any, db: Any) -> None:
    t = make_tenant(db, credits=7)
    for i in range(4):
        with db.transaction() as s:
            from gateway_core.credits import grant

            grant(s, t.tenant_id, i + 1, note=f"g{i}")
    first = client.get("/v1/credits?limit=3", headers=t.headers).json
    assert first["balance"] == 17 and first["reserved"] == 0
    assert [e["note"] for e in first["entries"]] == ["g3", "g2", "g1"]
    rest = client.get(f"/v1/credits?limit=3&cursor={first['next_cursor']}", headers=t.headers).json
    assert [e["note"] for e in rest["entries"]] == ["g0", "test fixture"] and rest["next_cursor"] is None
    assert client.get("/v1/credits?limit=0", headers=t.headers).status_code == 422


def test_admin_grants_credits_with_the_admin_scope_only(client: Any, db: Any) -> None:
    from gateway_core.tenants import create_api_key

    ops = make_tenant(db, credits=0)
    with db.transaction() as s:
        admin_key = create_api_key(s, s.get(Tenant, ops.tenant_id), ("admin",))
    target = make_tenant(db, credits=0)
    url = f"/v1/admin/tenants/{target.tenant_id}/credits"
    ok = client.post(url, headers={"Authorization": f"Bearer {admin_key}"}, json={"amount": 500, "note": "welcome"})
    assert ok.status_code == 201 and ok.json["balance"] == 500 and ok.json["entry"]["kind"] == "grant"
    assert client.post(url, headers=target.headers, json={"amount": 5}).status_code == 403
    bad = client.post(
        url, headers={"Authorization": f"Bearer {admin_key}"}, json={"amount": -600, "kind": "adjustment"}
    )
    assert bad.status_code == 400 and _tenant_row(db, target.tenant_id).credits_balance == 500
    missing = client.post(
        "/v1/admin/tenants/999999/credits", headers={"Authorization": f"Bearer {admin_key}"}, json={"amount": 5}
    )
    assert missing.status_code == 404


# -- concurrency and quotas -------------------------------------------------------------------------------


def test_concurrency_cap_and_the_slot_freed_at_the_end(client: Any, worker: Any, db: Any) -> None:
    free = make_tenant(db, tier="free")  # cap 2
    first = [client.post("/v1/jobs/codegen-slow", headers=free.headers, json={"prompt": "x"}) for _ in range(2)]
    assert [r.status_code for r in first] == [202, 202]
    third = client.post("/v1/jobs/codegen-slow", headers=free.headers, json={"prompt": "x"})
    assert third.status_code == 429
    assert third.json["error"]["code"] == "CONCURRENCY_LIMIT"
    assert third.json["error"]["details"] == {"limit": 2, "active": 2}
    for r in first:
        wait_terminal(db, r.json["id"])
    assert client.post("/v1/jobs/codegen-slow", headers=free.headers, json={"prompt": "x"}).status_code == 202


def test_quotas_refuse_with_their_own_code_and_show_in_credits(client: Any, worker: Any, db: Any) -> None:
    t = make_tenant(db, daily_job_quota=2)
    codes = [client.post("/v1/jobs/codegen", headers=t.headers, json={"prompt": "x"}).status_code for _ in range(3)]
    assert codes == [202, 202, 429]
    err = client.post("/v1/jobs/codegen", headers=t.headers, json={"prompt": "x"}).json["error"]
    assert err["code"] == "QUOTA_EXCEEDED" and err["details"]["quota"] == "daily_jobs"
    usage = client.get("/v1/credits", headers=t.headers).json["usage"]
    assert usage["day"]["jobs"] == 2 and usage["day"]["job_quota"] == 2
    assert usage["month"]["jobs"] == 2 and usage["month"]["job_quota"] is None

    c = make_tenant(db, monthly_credit_quota=3)
    big = client.post("/v1/jobs/codegen-tokens", headers=c.headers, json={"prompt": "x", "max_tokens": 4})
    assert big.status_code == 429 and big.json["error"]["details"]["quota"] == "monthly_credits"


# -- idempotency ---------------------------------------------------------------------------------------------


def test_idempotency_key_replays_the_first_job_and_charges_once(client: Any, worker: Any, db: Any) -> None:
    t = make_tenant(db, credits=10)
    h = {**t.headers, "Idempotency-Key": "order-42"}
    first = client.post("/v1/jobs/codegen", headers=h, json={"prompt": "x"})
    second = client.post("/v1/jobs/codegen", headers=h, json={"prompt": "x"})
    assert first.status_code == second.status_code == 202
    assert first.json["id"] == second.json["id"] and second.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert [k for k, _, _ in _ledger(db, t.tenant_id)].count("reserve") == 1

    other = client.post("/v1/jobs/codegen", headers=h, json={"prompt": "something else"})
    assert other.status_code == 422 and other.json["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
    bad = client.post("/v1/jobs/codegen", headers={**t.headers, "Idempotency-Key": "x" * 300}, json={"prompt": "x"})
    assert bad.status_code == 400 and bad.json["error"]["code"] == "INVALID_IDEMPOTENCY_KEY"


def test_idempotency_key_in_progress_is_409(client: Any, db: Any, settings: Settings) -> None:
    t = make_tenant(db, credits=10)
    r = redis.Redis.from_url(settings.redis_url)
    held = r.lock(f"jobgate:idem:{t.tenant_id}:{hashlib.sha256(b'k-1').hexdigest()}", timeout=30)
    assert held.acquire(blocking=False)  # as if the first request with this key were still being admitted
    try:
        resp = client.post("/v1/jobs/codegen", headers={**t.headers, "Idempotency-Key": "k-1"}, json={"prompt": "x"})
        assert resp.status_code == 409 and resp.json["error"]["code"] == "IDEMPOTENCY_IN_PROGRESS"
    finally:
        held.release()
    assert (
        client.post(
            "/v1/jobs/codegen", headers={**t.headers, "Idempotency-Key": "k-1"}, json={"prompt": "x"}
        ).status_code
        == 202
    )


def test_parallel_retries_with_one_key_make_one_job(app: Any, worker: Any, db: Any) -> None:
    t = make_tenant(db, credits=10)

    def submit(_: int) -> tuple[int, str | None]:
        resp = app.test_client().post(
            "/v1/jobs/codegen", headers={**t.headers, "Idempotency-Key": "same"}, json={"prompt": "x"}
        )
        return resp.status_code, (resp.json or {}).get("id")

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(submit, range(8)))
    ids = {job_id for status, job_id in results if status == 202}
    assert len(ids) == 1
    assert {status for status, _ in results} <= {202, 409}
    assert [k for k, _, _ in _ledger(db, t.tenant_id)].count("reserve") == 1


pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
