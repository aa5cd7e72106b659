"""How a job ends: each terminal transition and its effect on the ledger, in one transaction.

The transition is guarded (see jobs.transition), so a duplicate or stale message that loses the race
changes neither the job nor the credits: effects happen exactly once.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from gateway_core.credits import release, settle
from gateway_core.errors import JobFinishedError
from gateway_core.jobs import get_job, transition
from gateway_core.models import Job
from gateway_core.pricing import charge
from gateway_core.settings import ServiceConfig
from gateway_core.states import TERMINAL, JobState

S = JobState


def succeed(
    session: Session, job: Job, svc: ServiceConfig | None, output: dict[str, Any], usage: dict[str, Any]
) -> Job | None:
    """SUCCEEDED with its result; capture what it cost, release the rest of the reservation."""
    done = transition(
        session,
        job,
        S.SUCCEEDED,
        detail={"outcome": "succeeded"},
        values={"result": {"output": output, "usage": usage}},
    )
    if done is not None:
        settle(session, done, charge(svc, done.credits_reserved, done.audio_seconds, usage))
    return done


def fail(session: Session, job: Job, code: str, message: str, *, detail: dict[str, Any] | None = None) -> Job | None:
    """FAILED for good, with a stable code; the whole reservation goes back."""
    done = transition(
        session,
        job,
        S.FAILED,
        detail=detail,
        values={"error_code": code, "error_message": message, "lease_expires_at": None},
    )
    if done is not None:
        release(session, done)
    return done


def cancel(session: Session, job_id: str, tenant_id: int) -> Job:
    """CANCELED at the client's request; the reservation goes back. A worker still calling a replica
    for it finds the job moved on and records nothing."""
    for _ in range(3):  # a worker may move the job between our read and our guarded update
        job = get_job(session, job_id, tenant_id=tenant_id)
        if job.state in TERMINAL:
            raise JobFinishedError(f"job {job_id} already ended {job.state}", details={"status": job.state.value})
        done = transition(session, job, S.CANCELED, detail={"outcome": "canceled"})
        if done is not None:
            release(session, done)
            return done
        session.expire(job)
    raise JobFinishedError(f"job {job_id} kept changing; try again", details={"id": job_id})
