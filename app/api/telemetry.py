"""Every request: a request id (X-Request-ID, accepted or made, returned, bound to the request's
log lines), one access log line, and its latency in a histogram by route template.

Pure ASGI, outermost but for the security headers, so a 500 and a 413 from inner middleware are
measured and logged too. The route label is the path template FastAPI matched
(`/v1/jobs/{job_id}`), never the raw path, and `unmatched` for a 404 outside every route, so
the label set stays small whatever clients send.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from prometheus_client import Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import bind

log = logging.getLogger("compaas.access")

REQUEST_ID_HEADER = "x-request-id"
# What a caller's X-Request-ID may be (an id from a proxy or a client); anything else is
# replaced with one of ours rather than copied into logs and headers.
_VALID_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
UNMATCHED = "unmatched"

REQUEST_SECONDS = Histogram(
    "compaas_http_request_duration_seconds",
    "HTTP requests: seconds from the request to the last byte of the response, by route "
    "template, method and status class (an event stream counts until it closes)",
    ["route", "method", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's X-Request-ID when it is a sensible id, else a new one."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            given = value.decode("latin-1").strip()
            if _VALID_ID.match(given):
                return given
            break
    return uuid.uuid4().hex


def route_of(scope: Scope) -> str:
    """The matched route's path template (mounts included), or `unmatched`."""
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not path:
        return UNMATCHED
    return str(path)


class RequestTelemetry:
    """ASGI middleware: request id, access log, latency histogram."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope.get("headers") or [])
        began = time.perf_counter()
        status = 500
        header = (REQUEST_ID_HEADER.encode(), request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        with bind(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                self._done(scope, status, time.perf_counter() - began)

    @staticmethod
    def _done(scope: Scope, status: int, seconds: float) -> None:
        route, method = route_of(scope), str(scope.get("method", ""))
        REQUEST_SECONDS.labels(route, method, f"{status // 100}xx").observe(seconds)
        fields: dict[str, Any] = {
            "method": method,
            "path": scope.get("path", ""),
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000, 2),
        }
        log.log(
            logging.WARNING if status >= 500 else logging.INFO,
            "%s %s %s",
            method,
            scope.get("path", ""),
            status,
            extra=fields,
        )
