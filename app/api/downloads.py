"""Stream a blob with ETag, sha256 digest headers and single-range support."""

from __future__ import annotations

import base64
import re
import unicodedata
from typing import Protocol
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from app.api.problems import Problem
from app.storage import BlobStore

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class StoredBlob(Protocol):
    """A row that points at a blob: a model, a dataset, an artifact."""

    @property
    def blob_key(self) -> str: ...

    @property
    def size_bytes(self) -> int: ...

    @property
    def sha256(self) -> str: ...


def content_disposition(filename: str) -> str:
    """RFC 6266 `attachment` with an ASCII fallback and the exact name per RFC 5987 (UTF-8)."""
    letters = "".join(
        c for c in unicodedata.normalize("NFKD", filename) if not unicodedata.combining(c)
    )  # "Modèle" -> "Modele"
    fallback = (
        "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in letters).strip()
        or "download"
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    match = _RANGE.match(header.strip())
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":
        length = int(last)
        if length == 0:
            raise ValueError("empty suffix range")
        return max(size - length, 0), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        raise ValueError("unsatisfiable")
    return start, end


def blob_response(
    request: Request,
    storage: BlobStore,
    blob: StoredBlob,
    filename: str,
    media_type: str = "application/octet-stream",
) -> Response:
    """The row's blob as a download named `filename` (304, 206 and 416 as HTTP says)."""
    key, size, sha256 = blob.blob_key, blob.size_bytes, blob.sha256
    etag = f'"{sha256}"'
    b64 = base64.b64encode(bytes.fromhex(sha256)).decode()
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Digest": f"sha-256={b64}",
        "Repr-Digest": f"sha-256=:{b64}:",
        "X-Checksum-SHA256": sha256,
        "Content-Disposition": content_disposition(filename),
        "Cache-Control": "private, max-age=0, must-revalidate",
    }
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    start, end, status = 0, size - 1, 200
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if range_header and (if_range is None or if_range.strip() == etag):
        try:
            parsed = _parse_range(range_header, size)
        except ValueError as exc:
            raise Problem(
                416,
                "range_not_satisfiable",
                f"The requested range {range_header!r} is outside the file of {size} bytes.",
                headers={"Content-Range": f"bytes */{size}"},
            ) from exc
        if parsed is not None:
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1 if size else 0)
    body = storage.iter_range(key, start, end) if size else iter(())
    return StreamingResponse(body, status_code=status, headers=headers, media_type=media_type)
