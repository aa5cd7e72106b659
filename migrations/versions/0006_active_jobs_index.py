"""a partial index on each tenant's active jobs, for the concurrency count at admission

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 09:40:00

The count used (tenant_id, state) and scanned every job a tenant ever had when the planner chose the
(tenant_id, idempotency_key) index instead; the partial index holds only jobs in QUEUED, HELD,
DISPATCHED or PROCESSING.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = sa.text("state IN ('DISPATCHED', 'HELD', 'PROCESSING', 'QUEUED')")


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_tenant_active", ["tenant_id"], postgresql_where=ACTIVE, sqlite_where=ACTIVE)
        batch_op.drop_index("ix_jobs_tenant_state")


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_tenant_state", ["tenant_id", "state"], unique=False)
        batch_op.drop_index("ix_jobs_tenant_active")
