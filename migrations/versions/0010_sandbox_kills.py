"""sandbox kills: running totals of sandbox children stopped by a limit or a signal, by reason;
indexes on when jobs were claimed and jobs and steps finished (/metrics reads recent rows)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sandbox_kills",
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("reason", name=op.f("pk_sandbox_kills")),
    )
    op.create_index(op.f("ix_jobs_started_at"), "jobs", ["started_at"])
    op.create_index(op.f("ix_jobs_finished_at"), "jobs", ["finished_at"])
    op.create_index(op.f("ix_job_steps_finished_at"), "job_steps", ["finished_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_job_steps_finished_at"), table_name="job_steps")
    op.drop_index(op.f("ix_jobs_finished_at"), table_name="jobs")
    op.drop_index(op.f("ix_jobs_started_at"), table_name="jobs")
    op.drop_table("sandbox_kills")
