"""The embedded default's database (`jobgate up`) keeps the invariants production keeps: the same
PostgreSQL, the same schema, the same locking under concurrent admissions."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select

from gateway_core.admission import JobInput, admit
from gateway_core.db import Database
from gateway_core.errors import GatewayError
from gateway_core.models import Base, Job, Tenant
from gateway_core.settings import Settings
from tests.conftest import assert_ledger_invariants, make_tenant


def _tenant(db: Database, tenant_id: int) -> tuple[int, int, int]:
    """Balance, reserved credits and jobs of a tenant whose ledger holds its invariants."""
    assert_ledger_invariants(db, tenant_id)
    with db.transaction() as s:
        t = s.get(Tenant, tenant_id)
        assert t is not None
        jobs = s.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id))
    return t.credits_balance, t.credits_reserved, jobs or 0


def _admit(db: Database, settings: Settings, tenant_id: int) -> str:
    try:
        with db.transaction() as s:
            admit(
                s, settings, tenant_id=tenant_id, job_input=JobInput("codegen-tokens", {"prompt": "p", "max_tokens": 1})
            )
        return "admitted"
    except GatewayError as exc:
        return exc.code


def test_the_embedded_database_is_postgresql_migrated_to_the_models(embedded_db: Database) -> None:
    with embedded_db.engine.connect() as conn:
        assert conn.dialect.name == "postgresql"
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_eight_threads_admitting_lose_no_credit_update(any_db: Database, settings: Settings) -> None:
    tenant = make_tenant(any_db, tier="enterprise", credits=1000, concurrency_limit=10_000)

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(lambda _: _admit(any_db, settings, tenant.tenant_id), range(200)))

    assert outcomes.count("admitted") == 200
    balance, reserved, jobs = _tenant(any_db, tenant.tenant_id)
    # The session's sweeper may send (and its worker run) jobs admitted here and never sent: a run job's credit
    # moves from reserved to captured. Every one of the 200 reservations must be in one or the other.
    with any_db.transaction() as s:
        captured = s.scalar(select(func.sum(Job.credits_charged)).where(Job.tenant_id == tenant.tenant_id)) or 0
    assert (balance, reserved + captured, jobs) == (800, 200, 200)


def test_fifty_admissions_racing_for_credits_for_ten(any_db: Database, settings: Settings) -> None:
    tenant = make_tenant(any_db, tier="enterprise", credits=10)

    with ThreadPoolExecutor(max_workers=25) as pool:
        outcomes = list(pool.map(lambda _: _admit(any_db, settings, tenant.tenant_id), range(50)))

    assert outcomes.count("admitted") == 10 and outcomes.count("INSUFFICIENT_CREDITS") == 40
    assert _tenant(any_db, tenant.tenant_id) == (0, 10, 10)
