"""Integration tests: real Postgres, a private Redis, real worker processes.

The fixtures (`stack`, `pg_stack`, `sqlite_stack`, `postgres_db`, `redis_url`) live in
tests/conftest.py so that other test folders can use them; the helpers are importable from here
as before.
"""

from __future__ import annotations

from tests.conftest import (
    PG_ADMIN_URL,
    ROOT,
    PostgresCluster,
    RedisServer,
    Stack,
    chaos_env,
    free_port,
    settings_from,
    slow_mlp,
    start_stack,
    wait_for,
)

__all__ = [
    "PG_ADMIN_URL",
    "ROOT",
    "PostgresCluster",
    "RedisServer",
    "Stack",
    "chaos_env",
    "free_port",
    "settings_from",
    "slow_mlp",
    "start_stack",
    "wait_for",
]
