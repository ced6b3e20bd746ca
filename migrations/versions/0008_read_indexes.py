"""Indexes for the reads clients poll at scale: a team's jobs of one status, newest first (GET /v1/jobs with
a status filter, and the count of a team's waiting jobs each submission makes).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_jobs_team_status_created", "jobs", ["team_id", "status", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_team_status_created", table_name="jobs")
