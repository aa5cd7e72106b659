"""Reading jobs back: the tenant's list (filters, cursor pages), conditional reads, cancel and retry."""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import quote

import httpx

from tests.conftest import TenantKey, make_tenant, until, wait_state, wait_terminal


def _submit(client: Any, tenant: TenantKey, service: str = "codegen", prompt: str = "x") -> str:
    resp = client.post(f"/v1/jobs/{service}", headers=tenant.headers, json={"prompt": prompt})
    assert resp.status_code == 202, resp.json
    return str(resp.json["id"])


def _all_pages(client: Any, tenant: TenantKey, query: str, limit: int) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        url = f"/v1/jobs?limit={limit}{query}" + (f"&cursor={cursor}" if cursor else "")
        resp = client.get(url, headers=tenant.headers)
        assert resp.status_code == 200, resp.json
        pages.append([job["id"] for job in resp.json["data"]])
        cursor = resp.json["next_cursor"]
        if cursor is None:
            return pages


def test_pages_neither_repeat_nor_skip_a_job_while_more_are_submitted(app: Any, worker: Any, db: Any) -> None:
    tenant = make_tenant(db, credits=10_000, concurrency_limit=500)
    client = app.test_client()
    before = [_submit(client, tenant, prompt=f"before {i}") for i in range(23)]
    stop = threading.Event()
    during: list[str] = []

    def submit_meanwhile() -> None:
        other = app.test_client()
        while not stop.is_set() and len(during) < 40:
            during.append(_submit(other, tenant, prompt="during"))

    thread = threading.Thread(target=submit_meanwhile)
    thread.start()
    try:
        # The first page is read once submits are under way; later pages must not show what they add.
        while len(during) < 3:
            stop.wait(0.01)
        pages = _all_pages(client, tenant, "", limit=5)
    finally:
        stop.set()
        thread.join()
    seen = [job_id for page in pages for job_id in page]
    assert len(seen) == len(set(seen)), "a job was listed twice"
    # Every job submitted before the first page is listed, newest first, after those the first page caught.
    assert [j for j in seen if j in before] == list(reversed(before))
    assert all(len(page) == 5 for page in pages[:-1])
    # A tenant sees only its own jobs.
    stranger = make_tenant(db)
    assert client.get("/v1/jobs", headers=stranger.headers).json == {"data": [], "next_cursor": None}


def test_filters_by_state_service_and_created_range(client: Any, worker: Any, db: Any) -> None:
    tenant = make_tenant(db)
    done = _submit(client, tenant)
    wait_terminal(db, done)
    first = client.get(f"/v1/jobs/{done}", headers=tenant.headers).json
    slow = _submit(client, tenant, "codegen-slow")
    canceled = client.post(f"/v1/jobs/{slow}/cancel", headers=tenant.headers)
    assert canceled.status_code == 200 and canceled.json["status"] == "CANCELED"

    def ids(query: str) -> list[str]:
        resp = client.get(f"/v1/jobs?{query}", headers=tenant.headers)
        assert resp.status_code == 200, resp.json
        return [job["id"] for job in resp.json["data"]]

    assert ids("") == [slow, done]
    assert ids("status=SUCCEEDED") == [done]
    assert ids("status=CANCELED,SUCCEEDED") == [slow, done]
    assert ids("service=codegen-slow") == [slow]
    created = first["timings"]["created_at"]
    assert ids(f"created_before={quote(created)}") == []
    assert ids(f"created_after={quote(created)}") == [slow, done]
    listed = client.get("/v1/jobs?status=SUCCEEDED", headers=tenant.headers).json["data"][0]
    assert listed["result"] == first["result"] and listed["credits"] == {"reserved": 1, "charged": 1}
    # Bad filters are refused in the envelope, never a 500.
    for query, code in (
        ("status=DONE", "VALIDATION_FAILED"),
        ("limit=0", "VALIDATION_FAILED"),
        ("created_after=yesterday", "VALIDATION_FAILED"),
        ("created_after=2026-01-01T00:00:00", "VALIDATION_FAILED"),  # no offset: which zone is meant?
        ("cursor=bm90LWEtY3Vyc29y", "INVALID_CURSOR"),
    ):
        resp = client.get(f"/v1/jobs?{query}", headers=tenant.headers)
        assert 400 <= resp.status_code < 500 and resp.json["error"]["code"] == code, (query, resp.json)


def test_a_poll_of_an_unchanged_job_is_a_304_and_a_running_job_says_when_to_poll(
    client: Any, worker: Any, db: Any
) -> None:
    tenant = make_tenant(db)
    running = _submit(client, tenant, "codegen-slow")
    wait_state(db, running, "PROCESSING")
    resp = client.get(f"/v1/jobs/{running}", headers=tenant.headers)
    assert resp.json["status"] == "PROCESSING" and resp.headers["Retry-After"] == "1"
    etag = resp.headers["ETag"]
    unchanged = client.get(f"/v1/jobs/{running}", headers={**tenant.headers, "If-None-Match": etag})
    assert unchanged.status_code == 304 and unchanged.data == b"" and unchanged.headers["ETag"] == etag

    wait_terminal(db, running)
    ended = client.get(f"/v1/jobs/{running}", headers={**tenant.headers, "If-None-Match": etag})
    assert ended.status_code == 200 and ended.json["status"] == "SUCCEEDED"
    assert ended.headers["ETag"] != etag and "Retry-After" not in ended.headers
    assert ended.json["credits"] == {"reserved": 1, "charged": 1}
    again = client.get(f"/v1/jobs/{running}", headers={**tenant.headers, "If-None-Match": ended.headers["ETag"]})
    assert again.status_code == 304


def test_a_canceled_job_is_retried_under_its_id_and_only_ended_jobs_can_be(client: Any, worker: Any, db: Any) -> None:
    tenant = make_tenant(db, credits=10)
    job_id = _submit(client, tenant, "codegen-slow")
    wait_state(db, job_id, "PROCESSING")
    not_ended = client.post(f"/v1/jobs/{job_id}/retry", headers=tenant.headers)
    assert not_ended.status_code == 409 and not_ended.json["error"]["code"] == "NOT_RETRIABLE"
    assert client.delete(f"/v1/jobs/{job_id}", headers=tenant.headers).json["status"] == "CANCELED"
    again = client.post(f"/v1/jobs/{job_id}/cancel", headers=tenant.headers)
    assert again.status_code == 409 and again.json["error"]["code"] == "JOB_FINISHED"
    # Another tenant cannot see, retry or cancel it.
    stranger = make_tenant(db)
    assert client.post(f"/v1/jobs/{job_id}/retry", headers=stranger.headers).status_code == 404
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=stranger.headers).status_code == 404

    retried = client.post(f"/v1/jobs/{job_id}/retry", headers=tenant.headers)
    assert retried.status_code == 202, retried.json
    assert retried.json["id"] == job_id and retried.json["status"] == "QUEUED"
    assert retried.headers["Location"] == f"/v1/jobs/{job_id}"
    job = wait_terminal(db, job_id)
    assert job.state == "SUCCEEDED"
    states = [e.to_state.value for e in job.events]
    assert states[states.index("CANCELED") :][:2] == ["CANCELED", "QUEUED"]
    credits = client.get("/v1/credits", headers=tenant.headers).json
    assert credits["balance"] == 9 and credits["reserved"] == 0  # charged once: the canceled run gave its back
    done = client.post(f"/v1/jobs/{job_id}/retry", headers=tenant.headers)
    assert done.status_code == 409 and done.json["error"]["details"]["status"] == "SUCCEEDED"


def test_a_failed_job_retried_without_credits_is_refused_and_stays_failed(client: Any, worker: Any, db: Any) -> None:
    tenant = make_tenant(db, credits=1)
    job_id = _submit(client, tenant, "codegen-down")
    assert wait_terminal(db, job_id).state == "FAILED"
    # The failed run gave its credit back; taking it elsewhere leaves nothing for the retry.
    other = _submit(client, tenant, "codegen-slow")
    short = client.post(f"/v1/jobs/{job_id}/retry", headers=tenant.headers)
    assert short.status_code == 402 and short.json["error"]["code"] == "INSUFFICIENT_CREDITS"
    assert client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json["status"] == "FAILED"
    wait_terminal(db, other)


def test_canceling_a_running_job_stops_the_replica_frees_its_slot_and_charges_nothing(
    client: Any, worker: Any, db: Any, replicas: dict[str, str]
) -> None:
    tenant = make_tenant(db, credits=10)
    stats = f"{replicas['glacial']}/stats"
    first = _submit(client, tenant, "codegen-glacial")  # the replica's one slot, for a minute
    wait_state(db, first, "PROCESSING")
    assert client.post(f"/v1/jobs/{first}/cancel", headers=tenant.headers).json["status"] == "CANCELED"
    # The worker drops the call and tells the replica, which stops working on it.
    until(lambda: httpx.get(stats).json()["canceled"].get(first) == 1, 10, "the replica told to stop")
    # Its slot is free at once: the next job starts long before the first would have ended.
    second = _submit(client, tenant, "codegen-glacial")
    wait_state(db, second, "PROCESSING", timeout=15)
    client.post(f"/v1/jobs/{second}/cancel", headers=tenant.headers)
    until(lambda: httpx.get(stats).json()["canceled"].get(second) == 1, 10, "the second stopped too")
    assert not httpx.get(stats).json()["processed"]  # neither ran to its end
    credits = client.get("/v1/credits", headers=tenant.headers).json
    assert credits["balance"] == 10 and credits["reserved"] == 0
    assert client.get(f"/v1/jobs/{first}", headers=tenant.headers).json["credits"] == {"reserved": 1, "charged": 0}
