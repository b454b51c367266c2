"""Parse a multipart/form-data request body into a spool file, enforcing size and time limits."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.api.problems import Problem
from app.services.spool import Spool, Upload

MAX_FIELD_BYTES = 4096


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


def _timed_out(idle_timeout_s: float, deadline_s: float, idle: bool) -> Problem:
    what = (
        f"no data arrived for {idle_timeout_s:g} s (COMPAAS_UPLOAD_IDLE_TIMEOUT_S)"
        if idle
        else f"the upload took longer than {deadline_s:g} s (COMPAAS_UPLOAD_DEADLINE_S)"
    )
    return Problem(
        408,
        "upload_timeout",
        f"The request body was not received in time: {what}. Retry over a faster or steadier "
        "connection, or upload a smaller file.",
        field="file",
    )


async def receive_upload(
    request: Request,
    spool_dir: Path,
    max_bytes: int,
    *,
    idle_timeout_s: float,
    deadline_s: float,
) -> Upload:
    """Parse multipart/form-data with one `file` part; never holds the file in memory.

    The body must keep arriving (at most idle_timeout_s between chunks) and be complete within
    deadline_s, else 408. The spool file is removed on every failure, disconnects included.
    """
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

    spool = Spool(spool_dir)
    state = _PartState()
    fields: dict[str, str] = {}
    text_parts: dict[str, bytearray] = {}
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
        nonlocal problem
        chunk = data[start:end]
        part = state.part
        if part == "file":
            if file_parts > 1:
                return
            if spool.size + len(chunk) > max_bytes:
                problem = problem or _too_large(max_bytes)
                return
            spool.write(chunk)
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
        await _feed(parser, request, idle_timeout_s, deadline_s, lambda: problem is not None)
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
            raise problem
    except BaseException:
        spool.discard()
        raise
    return spool.finish(filename, fields)


async def _feed(
    parser: MultipartParser,
    request: Request,
    idle_timeout_s: float,
    deadline_s: float,
    stop: Callable[[], bool],
) -> None:
    """Write body chunks into the parser until the end, a refusal, or a timeout."""
    deadline = time.monotonic() + deadline_s
    chunks = request.stream().__aiter__()
    while True:
        remaining = deadline - time.monotonic()
        idle = idle_timeout_s <= remaining
        try:
            with anyio.fail_after(max(min(idle_timeout_s, remaining), 0)):
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            break
        except TimeoutError as exc:
            raise _timed_out(idle_timeout_s, deadline_s, idle) from exc
        except ClientDisconnect as exc:
            raise Problem(
                400, "client_disconnected", "The client closed the connection mid-upload."
            ) from exc
        try:
            parser.write(chunk)
        except Exception as exc:
            raise Problem(
                400, "malformed_multipart", f"The multipart body could not be parsed: {exc}"
            ) from exc
        if stop():
            return
    try:
        parser.finalize()
    except Exception as exc:
        raise Problem(
            400, "malformed_multipart", f"The multipart body could not be parsed: {exc}"
        ) from exc
