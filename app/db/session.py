"""Engine and session factory; SQLite gets WAL and a busy timeout so API and worker can share it.

Each process has one engine per database URL, with a connection pool of `configure_pool`'s size
(SQLAlchemy's QueuePool: `pool_size` kept open, `max_overflow` more opened on demand, a request
waits up to POOL_TIMEOUT_S for one beyond that). The API sizes it to its processes
(Settings.db_pool, set by create_app).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

DEFAULT_POOL = (5, 5)
POOL_TIMEOUT_S = 30.0
_pool = DEFAULT_POOL
_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _forget_inherited_connections() -> None:
    """In a forked child (a Celery pool process): drop the parent's pooled connections without
    closing them, so parent and child never share one socket (the worker's heartbeat thread
    keeps using the parent's pool)."""
    for engine in list(_engines):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_inherited_connections)


def configure_pool(pool_size: int, max_overflow: int) -> None:
    """This process's pool size for engines made from now on (existing ones are replaced)."""
    global _pool
    if (pool_size, max_overflow) != _pool:
        _pool = (pool_size, max_overflow)
        get_sessionmaker.cache_clear()


def pool_limits() -> tuple[int, int]:
    """(pool_size, max_overflow) of this process's engines."""
    return _pool


def make_engine(url: str, pool: tuple[int, int] | None = None) -> Engine:
    pool_size, max_overflow = pool or _pool
    kwargs: dict[str, Any] = {
        "pool_pre_ping": True,
        "pool_size": pool_size,
        "max_overflow": max_overflow,
        "pool_timeout": POOL_TIMEOUT_S,
    }
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs["connect_args"] = {"connect_timeout": 5}
    engine = create_engine(url, **kwargs)
    _engines.add(engine)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

    return engine


@lru_cache(maxsize=8)
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(make_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
