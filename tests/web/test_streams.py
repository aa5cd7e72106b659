"""A job's events as Server-Sent Events: live, ended by the job's end, resumed without gap or duplicate."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from tests.conftest import TenantKey, make_tenant, wait_terminal


def _events(resp: Any) -> Iterator[dict[str, Any]]:
    """The stream's events as they arrive: ``id``, ``event`` and the decoded ``data`` of each."""
    buffer = ""
    for chunk in resp.response:
        buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
            if "data" in fields:
                yield {"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])}


def _stream(client: Any, tenant: TenantKey, job_id: str, last: int | None = None) -> Any:
    headers = {**tenant.headers, **({"Last-Event-ID": str(last)} if last is not None else {})}
    resp = client.get(f"/v1/jobs/{job_id}/events", headers=headers, buffered=False)
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    return resp


def test_a_stream_shows_each_state_as_it_happens_then_the_result_and_ends(client: Any, worker: Any, db: Any) -> None:
    tenant = make_tenant(db)
    job_id = client.post("/v1/jobs/codegen-slow", headers=tenant.headers, json={"prompt": "x"}).json["id"]
    resp = _stream(client, tenant, job_id)
    events = list(_events(resp))  # the stream ends by itself once the job has ended
    states = [e["data"]["to_state"] for e in events]
    assert states == ["RECEIVED", "QUEUED", "DISPATCHED", "PROCESSING", "SUCCEEDED"]
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(e["event"] == "state" and e["data"]["job_id"] == job_id for e in events)
    final = events[-1]["data"]["job"]
    assert final["status"] == "SUCCEEDED" and final["result"]["output"]["code"]
    assert "job" not in events[-2]["data"]
    job = wait_terminal(db, job_id)
    assert [ev.id for ev in job.events] == ids  # the events are the job's own, ids and all

    # Reconnecting after the end with the last id gets nothing and ends at once.
    assert list(_events(_stream(client, tenant, job_id, last=ids[-1]))) == []


def test_a_stream_resumed_from_last_event_id_misses_nothing_and_repeats_nothing(
    client: Any, worker: Any, db: Any
) -> None:
    tenant = make_tenant(db)
    job_id = client.post("/v1/jobs/codegen-slow", headers=tenant.headers, json={"prompt": "x"}).json["id"]
    first = _stream(client, tenant, job_id)
    seen = []
    for event in _events(first):
        seen.append(event)
        if event["data"]["to_state"] == "PROCESSING":
            break
    first.close()  # the client goes away while the replica works
    resumed = list(_events(_stream(client, tenant, job_id, last=seen[1]["id"])))
    assert [e["data"]["to_state"] for e in resumed] == ["DISPATCHED", "PROCESSING", "SUCCEEDED"]
    assert [e["id"] for e in resumed] == [e["id"] for e in seen[2:]] + [resumed[-1]["id"]]
    assert resumed[-1]["data"]["job"]["status"] == "SUCCEEDED"


def test_another_tenants_stream_is_not_found_and_a_bad_last_event_id_is_refused(
    client: Any, worker: Any, db: Any
) -> None:
    tenant = make_tenant(db)
    job_id = client.post("/v1/jobs/codegen", headers=tenant.headers, json={"prompt": "x"}).json["id"]
    stranger = make_tenant(db)
    assert client.get(f"/v1/jobs/{job_id}/events", headers=stranger.headers).status_code == 404
    for bad in ("abc", "-1", "1.5", "99999999999999999999", "١٢"):
        resp = client.get(f"/v1/jobs/{job_id}/events", headers={**tenant.headers, "Last-Event-ID": bad})
        assert resp.status_code == 400 and resp.json["error"]["code"] == "INVALID_LAST_EVENT_ID", bad
