"""What the browser tests share: Debian's chromium and the listeners that record a page's
requests and every console error or warning, page error and failed request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")


def watch(page: Any, requests: list[str], problems: list[str]) -> None:
    """Append every URL the page requests to `requests`, and every console error or warning,
    page error and failed request to `problems`."""
    page.on(
        "console",
        lambda m: (
            problems.append(f"console {m.type}: {m.text}")
            if m.type in ("error", "warning")
            else None
        ),
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.on("request", lambda r: requests.append(r.url))
