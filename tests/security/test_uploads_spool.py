"""Every way an upload can fail leaves no `upload-*.part` spool file behind (real API process)."""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.security.uploads_support import (
    Server,
    api_server,
    multipart_head,
    multipart_tail,
    read_status,
    request_head,
)

MAX_BYTES = 1_000_000
IDLE_S = 1
DEADLINE_S = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with api_server(
        tmp_path_factory.mktemp("spool"),
        max_upload_bytes=str(MAX_BYTES),
        upload_idle_timeout_s=str(IDLE_S),
        upload_deadline_s=str(DEADLINE_S),
    ) as server:
        yield server


@pytest.fixture(scope="module")
def headers(server: Server) -> dict[str, str]:
    return server.new_team("spooler")[1]


def _no_spool_left(server: Server, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while server.spool_files() and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.spool_files() == []


def _open_upload(server: Server, headers: dict[str, str], length: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(request_head("/v1/models", headers, length) + multipart_head("m.onnx") + b"\x08")
    deadline = time.monotonic() + 5
    while not server.spool_files():
        assert time.monotonic() < deadline, "the upload never reached the spool"
        time.sleep(0.02)
    return sock


def test_body_too_large_while_streaming_is_413(server: Server, headers: dict[str, str]) -> None:
    body = multipart_head("big.onnx") + bytes(MAX_BYTES + 1000) + multipart_tail()
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as client:
        reply = client.post(
            "/v1/models",
            content=body,
            headers={"Content-Type": "multipart/form-data; boundary=compaas-test-boundary"},
        )
    assert reply.status_code == 413
    assert reply.json()["code"] == "upload_too_large"
    assert _no_spool_left(server)


def test_wrong_media_type_is_415(server: Server, headers: dict[str, str]) -> None:
    reply = httpx.post(f"{server.base_url}/v1/models", content=b"x" * 100, headers=headers)
    assert reply.status_code == 415
    assert reply.json()["code"] == "unsupported_media_type"
    assert _no_spool_left(server)


def test_unreadable_model_is_422(server: Server, headers: dict[str, str]) -> None:
    reply = httpx.post(
        f"{server.base_url}/v1/models",
        files={"file": ("m.onnx", b"not a model at all" * 100)},
        headers=headers,
    )
    assert reply.status_code == 422
    assert reply.json()["code"] == "unrecognized_format"
    assert _no_spool_left(server)


def test_idle_body_is_408(server: Server, headers: dict[str, str]) -> None:
    sock = _open_upload(server, headers, 100_000)
    try:
        status = read_status(sock, IDLE_S + 10)
    finally:
        sock.close()
    assert status == 408
    assert _no_spool_left(server)


@pytest.mark.slow
def test_trickled_body_hits_the_deadline(server: Server, headers: dict[str, str]) -> None:
    sock = _open_upload(server, headers, 100_000)
    started = time.monotonic()
    try:
        sock.settimeout(0.3)
        status = None
        while status is None and time.monotonic() - started < DEADLINE_S + 10:
            try:
                sock.sendall(b"\x00")
            except (BrokenPipeError, ConnectionResetError):
                break
            status = read_status(sock, IDLE_S / 3)
        status = status or read_status(sock, 5)
    finally:
        sock.close()
    assert status == 408
    assert _no_spool_left(server)


def test_client_disconnect_mid_body(server: Server, headers: dict[str, str]) -> None:
    sock = _open_upload(server, headers, 100_000)
    sock.sendall(bytes(10_000))
    sock.close()
    assert _no_spool_left(server, within=IDLE_S + 5)


def test_failure_while_storing_removes_the_spool_file(server: Server) -> None:
    team_id, headers = server.new_team("broken-store")
    # A file where the team's blob directory should be: storing the upload raises OSError.
    (server.data_dir / "blobs" / "teams").mkdir(parents=True, exist_ok=True)
    (server.data_dir / "blobs" / "teams" / team_id).write_text("in the way")
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((4, 2), np.float32))
    reply = httpx.post(
        f"{server.base_url}/v1/datasets",
        files={"file": ("d.npz", buf.getvalue())},
        headers=headers,
    )
    assert reply.status_code == 500
    assert reply.headers["content-type"].startswith("application/problem+json")
    assert _no_spool_left(server)
    listing = httpx.get(f"{server.base_url}/v1/datasets", headers=headers)
    assert listing.status_code == 200
    assert listing.json()["items"] == []
