"""Prefer: wait on a real stack: a submit or a read held until the job ends (woken by the word that it ended,
not at the end of the wait), or answered with the job as it stands when the wait runs out."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from gateway_core.states import JobState
from tests.conftest import TenantKey, make_tenant

S = JobState
WAIT = 30  # far longer than any job below takes: a wait that runs out instead of being woken shows


def test_a_submit_that_waits_answers_with_the_result_as_soon_as_the_job_ends(
    client: Any, worker: Any, tenant: TenantKey
) -> None:
    started = time.monotonic()
    resp = client.post(
        "/v1/jobs/codegen", headers={**tenant.headers, "Prefer": f"wait={WAIT}"}, json={"prompt": "add two numbers"}
    )
    elapsed = time.monotonic() - started
    assert resp.status_code == 200, resp.json
    assert resp.headers["Preference-Applied"] == f"wait={WAIT}"
    assert resp.headers["Location"] == f"/v1/jobs/{resp.json['id']}"
    assert resp.json["status"] == "SUCCEEDED" and "code" in resp.json["result"]["output"]
    assert elapsed < WAIT / 2, f"answered after {elapsed:.1f} s: the wait ran out instead of being woken"


def test_a_read_that_waits_returns_when_the_job_ends(client: Any, worker: Any, tenant: TenantKey) -> None:
    job_id = client.post("/v1/jobs/codegen-narrow", headers=tenant.headers, json={"prompt": "x"}).json["id"]
    started = time.monotonic()
    resp = client.get(f"/v1/jobs/{job_id}", headers={**tenant.headers, "Prefer": f"wait={WAIT}"})
    elapsed = time.monotonic() - started
    assert resp.status_code == 200 and resp.headers["Preference-Applied"] == f"wait={WAIT}"
    assert resp.json["status"] == "SUCCEEDED"
    assert elapsed < WAIT / 2, f"answered after {elapsed:.1f} s: the wait ran out instead of being woken"


def test_a_wait_that_runs_out_answers_with_the_job_as_it_stands(client: Any, worker: Any, tenant: TenantKey) -> None:
    # No worker of this session reads codegen-isolated's queue: the job stays QUEUED.
    resp = client.post(
        "/v1/jobs/codegen-isolated", headers={**tenant.headers, "Prefer": "wait=1"}, json={"prompt": "x"}
    )
    assert resp.status_code == 202 and resp.json["status"] == "QUEUED"
    assert resp.headers["Preference-Applied"] == "wait=1"
    started = time.monotonic()
    read = client.get(resp.headers["Location"], headers={**tenant.headers, "Prefer": "respond-async, wait=1"})
    assert read.status_code == 200 and read.json["status"] == "QUEUED"
    assert time.monotonic() - started >= 1  # it did wait
    client.delete(resp.headers["Location"], headers=tenant.headers)  # frees the tenant's slot and credits


@pytest.mark.parametrize("value", ["0", "61", "abc", "1.5", "", "\u00b2", "007"])
def test_a_bad_wait_is_a_400_and_no_job_is_created(client: Any, worker: Any, db: Any, value: str) -> None:
    tenant = make_tenant(db)
    resp = client.post("/v1/jobs/codegen", headers={**tenant.headers, "Prefer": f"wait={value}"}, json={"prompt": "x"})
    assert resp.status_code == 400 and resp.json["error"]["code"] == "INVALID_PREFER_WAIT", resp.json
    listed = client.get("/v1/credits", headers=tenant.headers)
    assert listed.status_code == 200 and listed.json["reserved"] == 0, listed.json


def test_other_preferences_are_ignored_and_another_tenants_job_is_not_waited_on(
    client: Any, worker: Any, db: Any, tenant: TenantKey
) -> None:
    resp = client.post("/v1/jobs/codegen", headers={**tenant.headers, "Prefer": "respond-async"}, json={"prompt": "x"})
    assert resp.status_code == 202 and "Preference-Applied" not in resp.headers
    other = make_tenant(db)
    started = time.monotonic()
    peek = client.get(resp.headers["Location"], headers={**other.headers, "Prefer": f"wait={WAIT}"})
    assert peek.status_code == 404 and time.monotonic() - started < WAIT / 2


def test_an_app_replaced_by_a_reload_closes_its_subscription_and_connections(settings: Any) -> None:
    from gateway_tasks.announce import JOBS_ENDED_CHANNEL
    from gateway_web import create_app
    from tests.conftest import until

    observer = redis.Redis.from_url(settings.redis_url)

    def subscribers() -> int:
        return int(dict(observer.pubsub_numsub(JOBS_ENDED_CHANNEL))[JOBS_ENDED_CHANNEL.encode()])

    before = subscribers()
    app = create_app(settings)
    context = app.extensions["jobgate"]
    event = context.job_ends.expect("some-job")  # the first waiter subscribes
    until(lambda: subscribers() == before + 1, 10, "the app's subscription")
    context.close()
    until(lambda: subscribers() == before, 10, "the subscription closed")
    assert not event.is_set()
