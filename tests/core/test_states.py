"""The job state machine."""

from __future__ import annotations

from typing import Any

import pytest

from gateway_core.errors import IllegalTransitionError
from gateway_core.jobs import create_job, transition
from gateway_core.models import JobEvent
from gateway_core.states import TERMINAL, TRANSITIONS, JobState, check_transition
from tests.conftest import TenantKey

S = JobState


def test_terminal_states_lead_nowhere_but_a_retry_and_every_state_is_in_the_table() -> None:
    assert set(TRANSITIONS) == set(JobState)
    for state in TERMINAL:
        for target in JobState:
            if target == S.QUEUED and state in (S.FAILED, S.CANCELED):  # a retry, or a dead letter's replay
                check_transition(state, target)
                continue
            with pytest.raises(IllegalTransitionError):
                check_transition(state, target)


def test_illegal_transition_raises_and_changes_nothing(db: Any, tenant: TenantKey) -> None:
    with db.transaction() as s:
        job = create_job(s, tenant_id=tenant.tenant_id, service="codegen", request={"prompt": "x"})
        job_id = job.id
        with pytest.raises(IllegalTransitionError) as err:
            transition(s, job, S.SUCCEEDED)  # QUEUED may not jump to SUCCEEDED
        assert err.value.status == 409 and err.value.details == {"from": "QUEUED", "to": "SUCCEEDED"}
    with db.transaction() as s:
        events = s.query(JobEvent).filter_by(job_id=job_id).order_by(JobEvent.id).all()
        assert [(e.from_state, e.to_state) for e in events] == [(None, S.RECEIVED), (S.RECEIVED, S.QUEUED)]


def test_transition_from_a_stale_read_does_nothing(db: Any, tenant: TenantKey) -> None:
    with db.transaction() as s:
        job = create_job(s, tenant_id=tenant.tenant_id, service="codegen", request={"prompt": "x"})
        job_id = job.id
    with db.transaction() as first, db.transaction() as second:
        a, b = first.get(type(job), job_id), second.get(type(job), job_id)
        assert transition(first, a, S.CANCELED) is not None
        first.commit()
        # The second reader still sees QUEUED; its guarded update matches no row.
        assert transition(second, b, S.DISPATCHED, attempt=1) is None
    with db.transaction() as s:
        assert s.get(type(job), job_id).state == S.CANCELED
