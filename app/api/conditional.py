"""ETags and conditional GETs (RFC 9110 §8.8.3, §13.1.2): a 304 instead of a body unchanged."""

from __future__ import annotations

from typing import Annotated

from fastapi import Header, Response

IfNoneMatchHeader = Annotated[
    str | None,
    Header(
        alias="If-None-Match",
        description="The ETag of the copy you have: 304 Not Modified (no body) while it is "
        "still current.",
    ),
]
# Authenticated and changing: any cache must ask again each time (a 304 costs little).
CACHE_CONTROL = "private, no-cache"


def etag(version: str) -> str:
    """A strong entity tag for a representation's version."""
    return f'"{version}"'


def matches(if_none_match: str | None, tag: str) -> bool:
    """Whether If-None-Match names this tag (weak comparison, as the RFC asks) or is `*`."""
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == tag:
            return True
    return False


def set_validators(response: Response, tag: str) -> None:
    response.headers["ETag"] = tag
    response.headers["Cache-Control"] = CACHE_CONTROL


def not_modified(tag: str) -> Response:
    """304: the client's copy is current; the same validators, no body."""
    response = Response(status_code=304)
    set_validators(response, tag)
    return response
