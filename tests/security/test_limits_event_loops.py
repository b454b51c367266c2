"""The shared rate counters use an async Redis client, whose connections belong to one event
loop: a limiter used from a new loop (a test client started again) gets a client of its own
and keeps counting, never failing open."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from limits import RateLimitItemPerMinute

from app.api.ratelimit import Limiter
from app.config import Settings


def test_the_shared_counters_survive_a_new_event_loop(redis_url: str, tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path, rate_limit_storage_url=redis_url)  # type: ignore[call-arg]
    limiter = Limiter(settings)
    assert limiter.shared
    item, team = RateLimitItemPerMinute(3), f"loops-{uuid.uuid4().hex[:8]}"

    async def hits(n: int) -> list[bool]:
        return [await limiter.hit(item, "team", team) for _ in range(n)]

    assert asyncio.run(hits(2)) == [True, True]
    # another loop: the same counter (in Redis), one request left, then refused
    assert asyncio.run(hits(2)) == [True, False]
    assert limiter.storage_down_until == 0.0, "the limiter never failed open"
    assert asyncio.run(limiter.allowed(item, "team", team)) is False
