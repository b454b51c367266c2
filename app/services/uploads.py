"""Stream a multipart upload to a local spool file while hashing, enforcing a size limit."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from app.api.problems import Problem

MAX_FIELD_BYTES = 4096


@dataclass
class Upload:
    """A received file: spooled on local disk, hashed while it streamed in."""

    path: Path
    filename: str | None
    size: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class _PartState:
    """The multipart part being parsed: its headers so far and which field it is."""

    headers: dict[bytes, bytes] = field(default_factory=dict)
    header_field: bytes = b""
    part: str | None = None


def _too_large(limit: int) -> Problem:
    return Problem(
        413,
        "upload_too_large",
        f"The upload exceeds the limit of {limit} bytes (COMPAAS_MAX_UPLOAD_BYTES). "
        "Compress the dataset, use fewer samples, or ask your operator to raise the limit.",
        field="file",
        limit_bytes=limit,
    )


async def receive_upload(request: Request, spool_dir: Path, max_bytes: int) -> Upload:
    """Parse multipart/form-data with one `file` part; never holds the file in memory."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise Problem(
            415,
            "unsupported_media_type",
            "Send multipart/form-data with the file in a part named 'file', e.g. "
            "`curl -F file=@model.onnx -F name=my-model ...`.",
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        raise _too_large(max_bytes)

    spool_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=spool_dir, prefix="upload-", suffix=".part")
    out = os.fdopen(fd, "wb")
    digest = hashlib.sha256()
    state = _PartState()
    fields: dict[str, str] = {}
    text_parts: dict[str, bytearray] = {}
    size = 0
    file_parts = 0
    filename: str | None = None
    problem: Problem | None = None

    def on_part_begin() -> None:
        state.headers = {}
        state.part = None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state.header_field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        key = state.header_field.lower()
        state.headers[key] = state.headers.get(key, b"") + data[start:end]

    def on_header_end() -> None:
        state.header_field = b""

    def on_headers_finished() -> None:
        nonlocal file_parts, filename
        _, disp = parse_options_header(state.headers.get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        if name == "file":
            file_parts += 1
            raw = disp.get(b"filename")
            filename = raw.decode("utf-8", "replace") if raw else None
            state.part = "file"
        else:
            state.part = name
            text_parts[name] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        nonlocal size, problem
        chunk = data[start:end]
        part = state.part
        if part == "file":
            if file_parts > 1:
                return
            size += len(chunk)
            if size > max_bytes:
                problem = problem or _too_large(max_bytes)
                return
            digest.update(chunk)
            out.write(chunk)
        elif isinstance(part, str):
            buf = text_parts[part]
            if len(buf) + len(chunk) > MAX_FIELD_BYTES:
                problem = problem or Problem(
                    422, "validation_error", f"Form field {part!r} is too long.", field=part
                )
                return
            buf.extend(chunk)

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
        },
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if problem is not None:
                break
        else:
            parser.finalize()
    except Exception as exc:
        out.close()
        os.unlink(tmp_name)
        if isinstance(exc, Problem):
            raise
        raise Problem(
            400, "malformed_multipart", f"The multipart body could not be parsed: {exc}"
        ) from exc
    out.close()
    for name, buf in text_parts.items():
        fields[name] = buf.decode("utf-8", "replace")
    if problem is None and file_parts != 1:
        problem = Problem(
            422,
            "validation_error",
            "Send exactly one file in a multipart part named 'file' "
            f"(got {file_parts}), e.g. `curl -F file=@model.onnx ...`.",
            field="file",
        )
    if problem is not None:
        os.unlink(tmp_name)
        raise problem
    return Upload(Path(tmp_name), filename, size, digest.hexdigest(), fields)
