"""A real uvicorn API on a free port (embedded SQLite in a temp data dir), and hostile bodies."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import create_team, free_port

ROOT = Path(__file__).resolve().parents[2]
BOUNDARY = "compaas-test-boundary"


@dataclass
class Server:
    """One API process and what a test needs to talk to it and inspect it."""

    process: subprocess.Popen[bytes]
    base_url: str
    port: int
    data_dir: Path
    env: dict[str, str]
    log: Path

    @property
    def database_url(self) -> str:
        return self.env.get("COMPAAS_DATABASE_URL") or f"sqlite:///{self.data_dir / 'compaas.db'}"

    def new_team(self, name: str) -> tuple[str, dict[str, str]]:
        return create_team(self.env, name)

    def spool_files(self) -> list[Path]:
        return sorted((self.data_dir / "tmp").glob("upload-*.part"))

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS for the API process")


@contextmanager
def api_server(tmp: Path, **settings: str) -> Iterator[Server]:
    """Start `uvicorn app.main:create_app` in its own process group; stop it afterwards."""
    data_dir = tmp / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPAAS_")}
    env.update(
        {
            "COMPAAS_MODE": "embedded",
            "COMPAAS_DATA_DIR": str(data_dir),
            "COMPAAS_API_KEY_PEPPER": "security-test-pepper",
            "PYTHONPATH": str(ROOT),
            **{f"COMPAAS_{k.upper()}": v for k, v in settings.items()},
        }
    )
    subprocess.run(
        [sys.executable, "-m", "app.cli", "migrate"], env=env, cwd=ROOT, check=True, timeout=120
    )
    port = free_port()
    log = tmp / "api.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(process, f"http://127.0.0.1:{port}", port, data_dir, env, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{server.base_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def multipart_head(filename: str, name: str | None = None) -> bytes:
    """The multipart body up to the file's bytes (optional `name` field first)."""
    head = b""
    if name is not None:
        head += (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'
        ).encode()
    head += (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()
    return head


def multipart_tail() -> bytes:
    return f"\r\n--{BOUNDARY}--\r\n".encode()


def request_head(route: str, headers: dict[str, str], content_length: int) -> bytes:
    """An HTTP/1.1 POST request line and headers for a raw-socket multipart upload."""
    lines = [
        f"POST {route} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
        f"Content-Length: {content_length}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_status(sock: socket.socket, timeout: float) -> int | None:
    """The status code the server answered on a raw socket, or None if it closed silently."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    if not data.startswith(b"HTTP/1.1 "):
        return None
    return int(data.split(b" ", 2)[1])


def write_zip_bomb(path: Path, member: str, inflated: int, prefix: bytes = b"") -> None:
    """A zip whose `member` inflates to `inflated` bytes (zeros after `prefix`), streamed."""
    chunk = bytes(16 * 1024 * 1024)
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf,
        zf.open(member, "w", force_zip64=True) as fh,
    ):
        fh.write(prefix)
        left = inflated - len(prefix)
        while left > 0:
            fh.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)


def write_pt2_bomb(path: Path, inflated: int = 1 << 30) -> None:
    """A .pt2-shaped archive whose `archive_format` member inflates to `inflated` bytes."""
    write_zip_bomb(path, "model/archive_format", inflated, b"pt2")
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("model/version", "1")


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """A version 1.0 .npy header declaring `shape` and `descr` (which may lie)."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}"
    pad = 64 - (10 + len(text) + 1) % 64
    text += " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")
