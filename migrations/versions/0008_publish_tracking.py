"""publish tracking: how many times each waiting row's message was published, and when the
model's inspection message last was (a job's is jobs.enqueued_at)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 03:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("publish_count", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("publish_count", sa.Integer(), nullable=False, server_default="0")
        )
    # Models waiting before the upgrade were published once at upload (or the broker was down):
    # the reconciler looks for their message in the queue before publishing them again.
    op.execute(
        "UPDATE models SET published_at = created_at, publish_count = 1 WHERE status = 'pending'"
    )


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("publish_count")
        batch.drop_column("published_at")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("publish_count")
