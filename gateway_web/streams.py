"""A job's events as Server-Sent Events: every state change as it commits, the last one carrying the ended
job (result or error), then the stream ends. Each event's id is the job event's own (they only grow), so a
client that reconnects with ``Last-Event-ID`` gets exactly what it missed. Woken by the word that the job
moved (gateway_tasks.announce), never by polling the database; a comment every few seconds keeps
proxies from closing a quiet stream and notices a client that left."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flask import Response, request, stream_with_context

from gateway_core.errors import InvalidRequestError
from gateway_core.jobs import events_after, get_job
from gateway_core.models import JobEvent
from gateway_core.states import TERMINAL
from gateway_web.context import ctx
from gateway_web.schemas import JobEventOut, job_out

KEEPALIVE_SECONDS = 15.0
RECONNECT_MS = 1000  # the reconnection delay a client's EventSource is told to use
MAX_EVENT_ID = 2**63 - 1


def last_event_id() -> int:
    """The id of the last event the client has (``Last-Event-ID``), 0 when it has none."""
    given = request.headers.get("Last-Event-ID", "").strip()
    if not given:
        return 0
    if not given.isascii() or not given.isdigit() or int(given) > MAX_EVENT_ID:
        raise InvalidRequestError(
            "Last-Event-ID must be the id of an event of this stream",
            code="INVALID_LAST_EVENT_ID",
            details={"header": "Last-Event-ID", "value": given[:100]},
        )
    return int(given)


def _frame(event: JobEvent, job: dict[str, Any] | None) -> str:
    data = JobEventOut.model_validate(event, from_attributes=True).model_dump(mode="json")
    data = {"id": event.id, "job_id": event.job_id, **data, **({"job": job} if job is not None else {})}
    return f"id: {event.id}\nevent: state\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def job_events(job_id: str, tenant_id: int) -> Response:
    """The stream of one of the tenant's jobs (404 for another's, before anything is streamed)."""
    after = last_event_id()
    c = ctx()
    with c.db.transaction() as s:
        get_job(s, job_id, tenant_id=tenant_id)

    def frames() -> Iterator[str]:
        last = after
        yield f"retry: {RECONNECT_MS}\n\n"
        with c.job_moves.expecting(job_id) as moved:
            while True:
                moved.clear()  # before the read: a move committed after it wakes the wait below at once
                with c.db.transaction() as s:
                    job = get_job(s, job_id, tenant_id=tenant_id)
                    events = events_after(s, job_id, last)
                    ended = job.state in TERMINAL  # read with the events: the ending event is among them
                    final = job_out(job, with_events=False).model_dump(mode="json", exclude={"events"})
                for i, event in enumerate(events):
                    closing = ended and i == len(events) - 1
                    yield _frame(event, final if closing else None)
                    last = event.id
                if ended:
                    return
                if not moved.wait(KEEPALIVE_SECONDS):
                    yield ": keep-alive\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(stream_with_context(frames()), mimetype="text/event-stream", headers=headers)
