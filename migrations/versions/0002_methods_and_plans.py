"""Merge and export jobs have no dataset; jobs carry the plan made before queueing; dry-run plans.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("dataset_uri", existing_type=sa.String(2048), nullable=True)
        batch.add_column(sa.Column("plan", JSON, nullable=True))
    op.create_table(
        "plans",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("team_id", sa.String(40), sa.ForeignKey("teams.id"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("result", JSON, nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
    )
    op.create_index("ix_plans_team_created", "plans", ["team_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_plans_team_created", table_name="plans")
    op.drop_table("plans")
    # Jobs without a dataset (merge, export) cannot survive the older schema.
    op.execute("DELETE FROM jobs WHERE dataset_uri IS NULL")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("plan")
        batch.alter_column("dataset_uri", existing_type=sa.String(2048), nullable=False)
