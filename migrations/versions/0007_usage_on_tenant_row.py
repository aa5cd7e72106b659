"""usage counters on the tenant row

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24 09:10:00

Admission read the day's and month's usage from tenant_usage (four subqueries) and upserted two rows
there; the counters of the current day and month now live on the tenant row it locks and updates anyway.
Each tenant's newest day and month rows are carried over; older rows (never read: past periods' spend is
in credit_entries) go with the table.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PERIODS = ("day", "month")


def upgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        for period in PERIODS:
            batch_op.add_column(sa.Column(f"usage_{period}", sa.Date(), nullable=True))
            batch_op.add_column(sa.Column(f"usage_{period}_jobs", sa.Integer(), server_default="0", nullable=False))
            batch_op.add_column(
                sa.Column(f"usage_{period}_credits", sa.BigInteger(), server_default="0", nullable=False)
            )
    for period in PERIODS:
        newest = (
            f"(SELECT {{col}} FROM tenant_usage u WHERE u.tenant_id = tenants.id AND u.period = '{period}' "
            "ORDER BY u.starts_on DESC LIMIT 1)"
        )
        op.execute(
            f"UPDATE tenants SET usage_{period} = {newest.format(col='starts_on')}, "
            f"usage_{period}_jobs = COALESCE({newest.format(col='jobs')}, 0), "
            f"usage_{period}_credits = COALESCE({newest.format(col='credits')}, 0)"
        )
    op.drop_table("tenant_usage")


def downgrade() -> None:
    op.create_table(
        "tenant_usage",
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("starts_on", sa.Date(), nullable=False),
        sa.Column("jobs", sa.Integer(), nullable=False),
        sa.Column("credits", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("tenant_id", "period", "starts_on"),
    )
    for period in PERIODS:
        op.execute(
            f"INSERT INTO tenant_usage (tenant_id, period, starts_on, jobs, credits) "
            f"SELECT id, '{period}', usage_{period}, usage_{period}_jobs, usage_{period}_credits "
            f"FROM tenants WHERE usage_{period} IS NOT NULL"
        )
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        for period in reversed(PERIODS):
            batch_op.drop_column(f"usage_{period}_credits")
            batch_op.drop_column(f"usage_{period}_jobs")
            batch_op.drop_column(f"usage_{period}")
