"""Property: whatever sequence of grants, submits, successes, failures and cancels happens, a tenant's
balance equals the sum of its ledger and is never negative, and its reserved credits equal the sum of
its open reservations. Runs the core functions the web and the worker call, on the test PostgreSQL and on
the embedded default's."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import select

from gateway_core import lifecycle
from gateway_core.admission import JobInput, admit
from gateway_core.credits import grant
from gateway_core.errors import GatewayError
from gateway_core.jobs import transition
from gateway_core.models import Job
from gateway_core.settings import Settings
from gateway_core.states import ACTIVE, JobState
from tests.conftest import assert_ledger_invariants, make_tenant

S = JobState
OPS = st.one_of(
    st.tuples(st.just("grant"), st.integers(1, 60)),
    st.tuples(st.just("submit"), st.integers(1, 40)),
    st.tuples(st.just("succeed"), st.integers(0, 50), st.integers(0, 60)),
    st.tuples(st.just("fail"), st.integers(0, 50)),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
)


def _open_jobs(db: Any, tenant_id: int) -> list[str]:
    with db.transaction() as s:
        return list(s.scalars(select(Job.id).where(Job.tenant_id == tenant_id, Job.state.in_(ACTIVE)).order_by(Job.id)))


def _apply(db: Any, settings: Settings, tenant_id: int, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "grant":
        with db.transaction() as s:
            grant(s, tenant_id, op[1])
        return
    if kind == "submit":
        job_input = JobInput("codegen-tokens", {"prompt": "p", "max_tokens": op[1]})
        try:
            with db.transaction() as s:
                admit(s, settings, tenant_id=tenant_id, job_input=job_input)
        except GatewayError as exc:  # short of credits, or at the concurrency cap: refused, nothing recorded
            assert exc.code in ("INSUFFICIENT_CREDITS", "CONCURRENCY_LIMIT")
        return
    open_jobs = _open_jobs(db, tenant_id)
    if not open_jobs:
        return
    job_id = open_jobs[op[1] % len(open_jobs)]
    with db.transaction() as s:
        job = s.get(Job, job_id)
        assert job is not None
        if kind == "succeed":
            job = transition(s, job, S.DISPATCHED, replica="r", attempt=job.attempts + 1)
            job = transition(s, job, S.PROCESSING)
            assert job is not None
            lifecycle.succeed(s, job, settings.services["codegen-tokens"], {"code": ""}, {"completion_tokens": op[2]})
        elif kind == "fail":
            lifecycle.fail(s, job, "TEST_FAILURE", "failed on purpose")
        else:
            lifecycle.cancel(s, job_id, tenant_id)


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(OPS, min_size=1, max_size=14))
def test_balance_is_the_ledger_sum_and_reserved_the_open_reservations(
    any_db: Any, settings: Settings, ops: list[Any]
) -> None:
    tenant = make_tenant(any_db, credits=0)
    for op in ops:
        _apply(any_db, settings, tenant.tenant_id, op)
        assert_ledger_invariants(any_db, tenant.tenant_id)
