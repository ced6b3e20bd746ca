"""The GPU pool: the nodes that run jobs and their GPUs, one row per attempt (where it ran, on which GPUs),
GPU-seconds per team by minute for fair share, and the job columns the claim ranks and filters on.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(sa.dialects.postgresql.JSONB(astext_type=sa.Text()), "postgresql")
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
QUEUED = sa.text("status = 'queued'")
HELD = sa.text("ended_at IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("teams") as batch:
        # Jobs of the team holding GPUs now: the claim checks and counts against max_running_jobs in one step.
        batch.add_column(sa.Column("running_jobs", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("running_gpus", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("gpus", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("nodes", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("priority_rank", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("reserved_for", sa.String(255), nullable=True))
        batch.add_column(sa.Column("reserved_at", TS, nullable=True))
        batch.add_column(sa.Column("preempt_requested_at", TS, nullable=True))
    bind = op.get_bind()
    gpus = (
        "COALESCE((spec->'resources'->>'gpus')::int, 1)"
        if bind.dialect.name == "postgresql"
        else "COALESCE(json_extract(spec, '$.resources.gpus'), 1)"
    )
    op.execute(
        f"UPDATE jobs SET gpus = {gpus}, priority_rank = "
        "CASE priority WHEN 'high' THEN 0 WHEN 'low' THEN 2 ELSE 1 END"
    )
    op.create_index(
        "ix_jobs_queued_team_rank",
        "jobs",
        ["team_id", "priority_rank", "created_at", "id"],
        postgresql_where=QUEUED,
        sqlite_where=QUEUED,
    )

    op.create_index(
        "ix_jobs_queued_rank",
        "jobs",
        ["priority_rank", "created_at"],
        postgresql_where=QUEUED,
        sqlite_where=QUEUED,
    )

    op.create_table(
        "nodes",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("total_gpus", sa.Integer(), nullable=False),
        sa.Column("busy_gpus", JSON, nullable=False),
        sa.Column("ray_driver", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
    )
    op.create_table(
        "attempts",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("team_id", sa.String(40), sa.ForeignKey("teams.id"), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(255), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("gpu_indices", JSON, nullable=False),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("launcher", sa.String(16), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS, nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("charged_gpu_seconds", sa.Float(), nullable=False, server_default="0"),
        sa.UniqueConstraint("job_id", "number", name="uq_attempts_job_number"),
    )
    op.create_index(
        "ix_attempts_held_team", "attempts", ["team_id"], postgresql_where=HELD, sqlite_where=HELD
    )
    op.create_index(
        "ix_attempts_held_worker", "attempts", ["worker_id"], postgresql_where=HELD, sqlite_where=HELD
    )
    op.create_table(
        "gpu_usage",
        sa.Column("team_id", sa.String(40), sa.ForeignKey("teams.id"), primary_key=True),
        sa.Column("minute", TS, primary_key=True),
        sa.Column("gpu_seconds", sa.Float(), nullable=False, server_default="0"),
    )
    op.create_index("ix_gpu_usage_minute", "gpu_usage", ["minute"])


def downgrade() -> None:
    op.drop_index("ix_gpu_usage_minute", table_name="gpu_usage")
    op.drop_table("gpu_usage")
    op.drop_index("ix_attempts_held_worker", table_name="attempts")
    op.drop_index("ix_attempts_held_team", table_name="attempts")
    op.drop_table("attempts")
    op.drop_table("nodes")
    op.drop_index("ix_jobs_queued_rank", table_name="jobs")
    op.drop_index("ix_jobs_queued_team_rank", table_name="jobs")
    with op.batch_alter_table("teams") as batch:
        batch.drop_column("running_gpus")
        batch.drop_column("running_jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("preempt_requested_at")
        batch.drop_column("reserved_at")
        batch.drop_column("reserved_for")
        batch.drop_column("priority_rank")
        batch.drop_column("nodes")
        batch.drop_column("gpus")
