"""Per-team request rates and in-flight caps, per-address auth failures: 429 with Retry-After."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import Storage as AsyncStorage
from limits.aio.strategies import MovingWindowRateLimiter as AsyncMovingWindowRateLimiter
from limits.storage import Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import CurrentTeam
from app.api.problems import Problem, problem_response
from app.config import Settings

log = logging.getLogger(__name__)
STORAGE_RETRY_S = 5.0


def storage_url(settings: Settings) -> str:
    """The counters' home: shared Redis when the broker is Redis (several API processes), else
    this process's memory (embedded mode runs one API process)."""
    if settings.rate_limit_storage_url:
        return settings.rate_limit_storage_url
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return settings.broker_url
    return "memory://"


class Limiter:
    """Moving-window counters (the `limits` library) and this process's in-flight counts.

    With several API processes (COMPAAS_API_WORKERS) the request and auth-failure windows are
    shared through Redis, while the in-flight caps hold per process: a team may have
    team_max_inflight_requests requests running in each process, which is what the cap protects
    (a process's threads and database connections).
    """

    def __init__(self, settings: Settings) -> None:
        url = storage_url(settings).removeprefix("async+")
        # Shared by every API process (Redis), or this process's own (memory).
        self.shared = not url.startswith("memory://")
        self.url = url
        self._memory: MovingWindowRateLimiter | None = None
        self._shared: AsyncMovingWindowRateLimiter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        if self.shared:
            self._async_window()  # a bad URL fails at start
        else:
            memory = storage_from_string(url)
            assert isinstance(memory, Storage)
            self._memory = MovingWindowRateLimiter(memory)  # plain dict operations
        self.team_rate: RateLimitItem = RateLimitItemPerSecond(
            settings.team_requests_per_window, settings.team_window_s
        )
        self.auth_rate: RateLimitItem = RateLimitItemPerSecond(
            settings.auth_failures_per_window, settings.auth_failure_window_s
        )
        self.settings = settings
        self.inflight: Counter[str] = Counter()
        self.uploads: Counter[str] = Counter()
        self.storage_down_until = 0.0

    def _async_window(self) -> AsyncMovingWindowRateLimiter:
        """The shared counters through an async client: a round trip awaits on the event loop
        instead of holding a thread (two per request: the auth-failure check and the team's
        count). The client's connections belong to one event loop: a new loop (a test client
        started again) gets a new client."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if self._shared is None or (loop is not None and loop is not self._loop):
            options = {"implementation": "redispy"} if self.url.startswith("redis") else {}
            storage = storage_from_string(f"async+{self.url}", **options)
            if not isinstance(storage, AsyncStorage):
                raise ValueError(f"COMPAAS_RATE_LIMIT_STORAGE_URL {self.url!r}: no async client")
            self._shared, self._loop = AsyncMovingWindowRateLimiter(storage), loop
        return self._shared

    @property
    def window(self) -> MovingWindowRateLimiter | AsyncMovingWindowRateLimiter:
        return self._memory if self._memory is not None else self._async_window()

    async def _run(self, fn: Callable[..., Any], *args: Any, unavailable: Any) -> Any:
        """fn's answer; `unavailable` (fail open) while the counters' storage is down.

        Rate limits protect the service; they must not take it down with them: when Redis is
        away, jobs are still accepted (the reconciler publishes them later), so requests go
        through uncounted, and the storage is tried again after STORAGE_RETRY_S.
        """
        if time.monotonic() < self.storage_down_until:
            return unavailable
        try:
            result = fn(*args)
            return await result if inspect.isawaitable(result) else result
        except Exception as exc:
            self.storage_down_until = time.monotonic() + STORAGE_RETRY_S
            log.warning("rate-limit storage unavailable (%s); requests are not counted", exc)
            return unavailable

    async def retry_after(self, item: RateLimitItem, *ids: str) -> int:
        stats = await self._run(self.window.get_window_stats, item, *ids, unavailable=None)
        return 1 if stats is None else max(1, math.ceil(stats.reset_time - time.time()))

    async def hit(self, item: RateLimitItem, *ids: str) -> bool:
        return bool(await self._run(self.window.hit, item, *ids, unavailable=True))

    async def allowed(self, item: RateLimitItem, *ids: str) -> bool:
        return bool(await self._run(self.window.test, item, *ids, unavailable=True))


def too_many(code: str, detail: str, retry_after: int) -> Problem:
    return Problem(429, code, detail, headers={"Retry-After": str(retry_after)})


async def team_limits(request: Request, team: CurrentTeam) -> AsyncIterator[None]:
    """Count the request against its team's rate and hold an in-flight slot while it runs."""
    limiter: Limiter = request.app.state.limiter
    settings = limiter.settings
    if not await limiter.hit(limiter.team_rate, "team", team.id):
        retry = await limiter.retry_after(limiter.team_rate, "team", team.id)
        raise too_many(
            "rate_limited",
            f"Your team sent more than {settings.team_requests_per_window} requests in "
            f"{settings.team_window_s} s. Retry after {retry} s, and poll less often "
            "(GET /v1/jobs/{id}/events streams progress without polling).",
            retry,
        )
    upload = request.headers.get("content-type", "").startswith("multipart/form-data")
    if upload and limiter.uploads[team.id] >= settings.team_max_inflight_uploads:
        raise too_many(
            "too_many_inflight_uploads",
            f"Your team already has {settings.team_max_inflight_uploads} uploads in progress. "
            "Upload fewer files at once; retry when one has finished.",
            5,
        )
    if limiter.inflight[team.id] >= settings.team_max_inflight_requests:
        raise too_many(
            "too_many_inflight_requests",
            f"Your team already has {settings.team_max_inflight_requests} requests in progress. "
            "Wait for some to finish, then retry.",
            1,
        )
    limiter.inflight[team.id] += 1
    if upload:
        limiter.uploads[team.id] += 1
    try:
        yield
    finally:
        limiter.inflight[team.id] -= 1
        if upload:
            limiter.uploads[team.id] -= 1


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class AuthFailureLimit:
    """After too many 401s from one address, refuse its authenticated requests for a while."""

    def __init__(self, app: ASGIApp, limiter: Limiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or []) if scope["type"] == "http" else {}
        if b"authorization" not in headers:
            await self.app(scope, receive, send)
            return
        limiter, address = self.limiter, _client(scope)
        if not await limiter.allowed(limiter.auth_rate, "auth", address):
            retry = await limiter.retry_after(limiter.auth_rate, "auth", address)
            settings = limiter.settings
            problem = too_many(
                "too_many_auth_failures",
                f"More than {settings.auth_failures_per_window} requests from your address "
                f"had an invalid API key in {settings.auth_failure_window_s} s. Check the key "
                f"you send (`Authorization: Bearer <key>`) and retry after {retry} s.",
                retry,
            )
            await problem_response(problem)(scope, receive, send)
            return
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if status == 401:
            await limiter.hit(limiter.auth_rate, "auth", address)


class JsonBodyLimit:
    """Refuse a non-upload body over the cap with 413 before anything parses it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _problem(self) -> Problem:
        return Problem(
            413,
            "body_too_large",
            f"The request body is over {self.max_bytes} bytes, the limit for JSON requests. "
            "Send a shorter body (a preset instead of a long pipeline); files go to the "
            "multipart upload endpoints.",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if headers.get(b"content-type", b"").startswith(b"multipart/form-data"):
            await self.app(scope, receive, send)  # uploads have their own limit
            return
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await problem_response(self._problem())(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await problem_response(self._problem())(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
