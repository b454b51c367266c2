"""The migrations build the schema the ORM models describe, on Postgres and on SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command

from app.db.migrate import alembic_config, upgrade

pytestmark = pytest.mark.integration


def _check(url: str) -> None:
    upgrade(url)
    command.check(alembic_config(url))  # raises if the models and the migrated schema differ
    command.downgrade(alembic_config(url), "base")
    upgrade(url)


def test_migrations_match_models_on_postgres(postgres_db: str) -> None:
    _check(postgres_db)


def test_migrations_match_models_on_sqlite(tmp_path: Path) -> None:
    _check(f"sqlite:///{tmp_path / 'm.db'}")
