"""Response models of the HTTP API; they are also the OpenAPI document's schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, Field

from gateway_core.models import Job
from gateway_core.states import JobState


class JobLinks(BaseModel):
    self: str


class JobAccepted(BaseModel):
    """The job was recorded and queued; poll links.self for its result."""

    id: str
    status: JobState
    service: str
    created_at: datetime
    links: JobLinks


class JobError(BaseModel):
    code: str
    message: str


class JobTimings(BaseModel):
    created_at: datetime
    dispatched_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_seconds: float | None = Field(default=None, description="from creation to the first dispatch")
    run_seconds: float | None = Field(default=None, description="from the first replica call to the end")


class JobCredits(BaseModel):
    reserved: int = Field(description="credits held for the job when it was admitted (or retried)")
    charged: int | None = Field(default=None, description="credits captured once it ended (0 unless it succeeded)")


class JobEventOut(BaseModel):
    at: datetime
    from_state: JobState | None
    to_state: JobState
    replica: str | None
    attempt: int
    detail: dict[str, Any] | None


class JobOut(BaseModel):
    id: str
    service: str
    status: JobState
    attempts: int
    replica: str | None
    audio_seconds: float | None = None
    timings: JobTimings
    credits: JobCredits
    result: dict[str, Any] | None = None
    error: JobError | None = None
    links: JobLinks
    events: list[JobEventOut] | None = None


class JobList(BaseModel):
    """A page of the tenant's jobs, newest first."""

    data: list[JobOut]
    next_cursor: str | None = Field(description="pass as ?cursor= (with the same filters) for the next page")


STATES_PATTERN = "^(" + "|".join(s.value for s in JobState) + ")(,(" + "|".join(s.value for s in JobState) + "))*$"


class JobListQuery(BaseModel):
    status: str | None = Field(
        default=None, pattern=STATES_PATTERN, description="only jobs in these states, comma-separated"
    )
    service: str | None = Field(default=None, max_length=64)
    created_after: AwareDatetime | None = Field(default=None, description="created at or after (RFC 3339)")
    created_before: AwareDatetime | None = Field(default=None, description="created before (RFC 3339)")
    limit: int = Field(default=20, ge=1, le=100)
    cursor: str | None = Field(default=None, max_length=200, description="next_cursor of the previous page")


class JobQuery(BaseModel):
    include: str | None = Field(default=None, pattern=r"^events$", description="'events' adds the history")


class ServicePath(BaseModel):
    service: str = Field(max_length=200)


class JobPath(BaseModel):
    job_id: str = Field(max_length=64)


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    return round((b - a).total_seconds(), 3) if a and b else None


def job_link(job_id: str) -> JobLinks:
    return JobLinks(self=f"/v1/jobs/{job_id}")


def job_out(job: Job, *, with_events: bool) -> JobOut:
    return JobOut(
        id=job.id,
        service=job.service,
        status=job.state,
        attempts=job.attempts,
        replica=job.replica,
        audio_seconds=job.audio_seconds,
        timings=JobTimings(
            created_at=job.created_at,
            dispatched_at=job.dispatched_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            queue_seconds=_seconds(job.created_at, job.dispatched_at),
            run_seconds=_seconds(job.started_at, job.finished_at),
        ),
        credits=JobCredits(
            reserved=job.credits_reserved,
            charged=job.credits_charged,
        ),
        result=job.result if job.state == JobState.SUCCEEDED else None,
        error=JobError(code=job.error_code, message=job.error_message or "")
        if job.state == JobState.FAILED and job.error_code
        else None,
        links=job_link(job.id),
        events=[
            JobEventOut(
                at=e.at,
                from_state=e.from_state,
                to_state=e.to_state,
                replica=e.replica,
                attempt=e.attempt,
                detail=e.detail,
            )
            for e in job.events
        ]
        if with_events
        else None,
    )
