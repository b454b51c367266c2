"""quality verdict: a job's and each step's verdict against the floor, and each artifact's

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 02:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("quality", sa.JSON(), nullable=True))
    with op.batch_alter_table("job_steps") as batch:
        batch.add_column(sa.Column("quality", sa.JSON(), nullable=True))
    with op.batch_alter_table("artifacts") as batch:
        batch.add_column(sa.Column("verdict", sa.String(length=20), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_column("verdict")
    with op.batch_alter_table("job_steps") as batch:
        batch.drop_column("quality")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("quality")
