"""job seed, materials (model/dataset sha256), the versions its worker ran with and those of
the recipe it was made from

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 02:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("seed", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("versions", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("recipe_versions", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("materials", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("materials")
        batch.drop_column("recipe_versions")
        batch.drop_column("versions")
        batch.drop_column("seed")
