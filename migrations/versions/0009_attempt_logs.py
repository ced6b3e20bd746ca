"""Job logs: the output of each attempt's training processes, shipped to the database in chunks while the
attempt runs (so the API can tail and follow it from any host) and stored in object storage when it ends.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "attempt_log_chunks",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("job_id", "attempt", "offset", name="uq_attempt_log_chunks_offset"),
    )
    with op.batch_alter_table("attempts") as batch:
        # Bytes of output shipped so far (live chunks, then the stored object), and where the whole log went.
        batch.add_column(sa.Column("log_bytes", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("log_key", sa.String(1024), nullable=True))
        batch.add_column(sa.Column("log_sha256", sa.String(64), nullable=True))
        batch.add_column(sa.Column("log_truncated", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("log_truncated")
        batch.drop_column("log_sha256")
        batch.drop_column("log_key")
        batch.drop_column("log_bytes")
    op.drop_table("attempt_log_chunks")
