"""An embedded deployment in a temp dir (SQLite, filesystem broker, no worker) for limit tests."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.conftest import create_team, free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Embedded:
    settings: Settings
    env: dict[str, str]
    client: TestClient

    def new_team(self, name: str = "team") -> dict[str, str]:
        """A team made by the real CLI (same data dir, same pepper); its auth header."""
        return create_team(self.env, name)[1]


def embedded_env(data_dir: Path, **limits: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPAAS_")}
    env.update(
        COMPAAS_MODE="embedded",
        COMPAAS_DATA_DIR=str(data_dir),
        COMPAAS_RUN_RECONCILER="false",
        COMPAAS_API_KEY_PEPPER="limits-test-pepper",
    )
    env.update({f"COMPAAS_{k.upper()}": str(v) for k, v in limits.items()})
    return env


def settings_for(env: dict[str, str]) -> Settings:
    values = {k[len("COMPAAS_") :].lower(): v for k, v in env.items() if k.startswith("COMPAAS_")}
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@contextmanager
def embedded(data_dir: Path, **limits: Any) -> Iterator[Embedded]:
    env = embedded_env(data_dir, **limits)
    settings = settings_for(env)
    with TestClient(create_app(settings)) as client:
        stack = Embedded(settings, env, client)
        stack.new_team("bootstrap")  # migrates the database
        yield stack


def tiny_onnx() -> bytes:
    """A real 4→2 linear ONNX model (Gemm), built with onnx.helper."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 4), dtype=np.float32), "W")
    bias = numpy_helper.from_array(np.zeros(2, dtype=np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    buf = io.BytesIO()
    onnx.save(model, buf)
    return buf.getvalue()


@contextmanager
def served(settings: Settings) -> Iterator[str]:
    """The app on a real uvicorn server in this process; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def hold_upload(base_url: str, headers: dict[str, str], route: str = "models") -> socket.socket:
    """Start a multipart upload and send only part of its body; the socket stays open."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    boundary = "limitsboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.onnx"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    request = (
        f"POST /v1/{route} HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: {headers['Authorization']}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(head) + 1_000_000}\r\n\r\n"
    ).encode()
    sock.sendall(request + head + b"\0" * 1024)
    return sock
