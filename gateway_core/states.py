"""The job states of seed 000 and the one table of allowed transitions."""

from __future__ import annotations

import enum

from gateway_core.errors import IllegalTransitionError


class JobState(enum.StrEnum):
    RECEIVED = "RECEIVED"
    QUEUED = "QUEUED"
    DISPATCHED = "DISPATCHED"  # a replica is assigned: the load-balancing state
    HELD = "HELD"  # no replica can take it now
    PROCESSING = "PROCESSING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


S = JobState
TERMINAL: frozenset[JobState] = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELED})
# Jobs a worker may be driving right now; a lease says until when.
IN_FLIGHT: frozenset[JobState] = frozenset({S.DISPATCHED, S.PROCESSING})
# Jobs that hold a tenant's concurrency slot.
ACTIVE: frozenset[JobState] = frozenset({S.QUEUED, S.HELD, S.DISPATCHED, S.PROCESSING})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.RECEIVED: frozenset({S.QUEUED, S.FAILED, S.CANCELED}),
    S.QUEUED: frozenset({S.DISPATCHED, S.HELD, S.FAILED, S.CANCELED}),
    S.HELD: frozenset({S.DISPATCHED, S.FAILED, S.CANCELED}),
    # A replica error sends the job back to QUEUED to wait out its backoff before balancing again;
    # DISPATCHED -> DISPATCHED is a worker reclaiming a job whose lease expired (its worker died).
    S.DISPATCHED: frozenset({S.PROCESSING, S.DISPATCHED, S.QUEUED, S.HELD, S.FAILED, S.CANCELED}),
    S.PROCESSING: frozenset({S.SUCCEEDED, S.FAILED, S.QUEUED, S.DISPATCHED, S.CANCELED}),
    S.SUCCEEDED: frozenset(),
    # A client's retry (or an admin's replay of a dead letter) re-opens a failed or canceled job for a new
    # round of attempts under the same job id.
    S.FAILED: frozenset({S.QUEUED}),
    S.CANCELED: frozenset({S.QUEUED}),
}


def check_transition(current: JobState, target: JobState) -> None:
    """Raise IllegalTransitionError unless the table allows current -> target."""
    if target not in TRANSITIONS[current]:
        raise IllegalTransitionError(
            f"a job in {current} cannot move to {target}",
            details={"from": current.value, "to": target.value},
        )
