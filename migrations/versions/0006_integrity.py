"""Integrity: stored bytes found damaged on read are marked so that they are never served again; validation
counts its tries so that a job whose check keeps breaking fails instead of being re-sent forever.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("artifacts") as batch:
        batch.add_column(sa.Column("damaged_at", TS, nullable=True))
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("damaged_at", TS, nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("validation_tries", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("validation_tries")
    with op.batch_alter_table("files") as batch:
        batch.drop_column("damaged_at")
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_column("damaged_at")
