"""Security headers on every response; the docs pages get a CSP that allows only this origin's
assets (app.api.ops serves them) and the hash of Swagger UI's one inline script."""

from __future__ import annotations

import base64
import hashlib
import re

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Everything that is not a docs page: nothing may load, nothing may frame it.
STRICT_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.S)

BASE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def docs_csp(page: str, html: bytes) -> str:
    """Swagger UI: this origin's bundle plus the hash of its one inline script. ReDoc: this
    origin's bundle, blob: workers and inline styles (it injects styled-components CSS)."""
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(s).digest()).decode() + "'"
        for s in _INLINE_SCRIPT.findall(html)
    ]
    common = "default-src 'none'; img-src 'self' data:; connect-src 'self'"
    tail = "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    if page == "redoc":
        styles = "style-src 'self' 'unsafe-inline'"
        return f"{common}; script-src 'self'; worker-src blob:; {styles}; {tail}"
    return f"{common}; script-src 'self' {' '.join(hashes)}; style-src 'self'; {tail}"


class SecurityHeaders:
    """nosniff, frame deny, no referrer and a CSP on every response; no-store on JSON."""

    def __init__(self, app: ASGIApp, docs_pages: dict[str, str]) -> None:
        self.app = app
        self.docs_pages = docs_pages  # path -> "swagger" | "redoc"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        page = self.docs_pages.get(scope["path"])
        start: Message | None = None
        body: list[bytes] = []

        async def wrapped(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in BASE_HEADERS.items():
                    headers.setdefault(name, value)
                media = headers.get("content-type", "")
                if "json" in media:
                    headers.setdefault("Cache-Control", "no-store")
                if page is None or not media.startswith("text/html"):
                    headers.setdefault("Content-Security-Policy", STRICT_CSP)
                    await send(message)
                    return
                start = message  # a docs page: hold the start until its script is hashed
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            body.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            html = b"".join(body)
            headers = MutableHeaders(scope=start)
            headers["Content-Security-Policy"] = docs_csp(page or "", html)
            await send(start)
            await send({"type": "http.response.body", "body": html, "more_body": False})

        await self.app(scope, receive, wrapped)
