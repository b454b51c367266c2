"""Dataset header lies over real HTTP: 422 naming the header field, nothing committed.

Issue #10: a safetensors header with shape [10, "a"] was committed, then the team's
`GET /v1/datasets` answered 500 forever; a header claiming 10^12 samples was accepted and
failed later with a misleading memory_limit_exceeded.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.security.uploads_support import Server, api_server, npy_header


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with api_server(tmp_path_factory.mktemp("header-lies")) as server:
        yield server


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    _, headers = server.new_team("liar")
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as client:
        yield client


def npz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def safetensors(header: Any, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


LABELS = npy_header((10,), "<i8") + bytes(80)
X_BYTES = bytes(10 * 4 * 4)

NPZ_LIES = {
    "shape_larger_than_data": (
        npz({"x.npy": npy_header((1000, 4)) + X_BYTES, "labels.npy": LABELS}),
        "x.shape",
    ),
    "10^12_samples": (
        npz({"x.npy": npy_header((10**12, 4)) + X_BYTES, "labels.npy": LABELS}),
        "x.shape",
    ),
    "negative_dim": (npz({"x.npy": npy_header((-10, -4)) + X_BYTES}), "x.shape"),
    "string_dim": (npz({"x.npy": npy_header((10, "a")) + X_BYTES}), "x"),  # type: ignore[arg-type]
    "dtype_lie": (npz({"x.npy": npy_header((10, 4), "<f8") + X_BYTES}), "x.shape"),
    "object_dtype": (npz({"x.npy": npy_header((10, 4), "|O") + X_BYTES}), "x.dtype"),
    "string_dtype": (npz({"x.npy": npy_header((10, 4), "<U4") + X_BYTES * 4}), "x.dtype"),
    "not_npy_member": (npz({"x.npy": npy_header((10, 4)) + X_BYTES, "run.py": b"1"}), "run.py"),
}

ST_LIES = {
    "poisoned_shape": (
        safetensors({"x": {"dtype": "F32", "shape": [10, "a"], "data_offsets": [0, 160]}}, X_BYTES),
        "x.shape",
    ),
    "10^12_samples": (
        safetensors(
            {"x": {"dtype": "F32", "shape": [10**12, 4], "data_offsets": [0, 160]}}, X_BYTES
        ),
        "x.shape",
    ),
    "dtype_lie": (
        safetensors({"x": {"dtype": "F64", "shape": [10, 4], "data_offsets": [0, 160]}}, X_BYTES),
        "x.shape",
    ),
    "unknown_dtype": (
        safetensors({"x": {"dtype": "F99", "shape": [10, 4], "data_offsets": [0, 160]}}, X_BYTES),
        "x.dtype",
    ),
    "offsets_past_data": (
        safetensors({"x": {"dtype": "F32", "shape": [10, 4], "data_offsets": [80, 240]}}, X_BYTES),
        "x.data_offsets",
    ),
    "overlapping_arrays": (
        safetensors(
            {
                "x": {"dtype": "F32", "shape": [10, 4], "data_offsets": [0, 160]},
                "y": {"dtype": "F32", "shape": [10, 2], "data_offsets": [80, 160]},
            },
            X_BYTES,
        ),
        "y.data_offsets",
    ),
    "gap_in_data": (
        safetensors({"x": {"dtype": "F32", "shape": [10, 2], "data_offsets": [0, 80]}}, X_BYTES),
        "data_offsets",
    ),
    "header_not_json": (struct.pack("<Q", 8) + b'{"x": [1', "header"),
    "entry_not_object": (safetensors({"x": 3}, b""), "x"),
    "bool_as_dim": (
        safetensors({"x": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, b"\0"),
        "x.shape",
    ),
    "header_length_lie": (struct.pack("<Q", 2**40) + b'{"x": {}}', "header"),
}


def _upload(client: httpx.Client, name: str, data: bytes) -> httpx.Response:
    return client.post("/v1/datasets", files={"file": (name, data)})


@pytest.mark.parametrize(
    ("data", "location"),
    [*NPZ_LIES.values(), *ST_LIES.values()],
    ids=[f"npz-{k}" for k in NPZ_LIES] + [f"safetensors-{k}" for k in ST_LIES],
)
def test_header_lie_is_refused_and_nothing_committed(
    server: Server, client: httpx.Client, data: bytes, location: str
) -> None:
    reply = _upload(client, "lie.bin", data)
    assert reply.status_code == 422, reply.text
    assert reply.headers["content-type"].startswith("application/problem+json")
    problem = reply.json()
    assert problem["code"] == "dataset_invalid"
    assert problem["field"] == "file"
    assert problem["location"] == location
    assert problem["detail"].startswith(f"{location}:")
    listing = client.get("/v1/datasets")
    assert listing.status_code == 200
    assert listing.json()["items"] == []
    assert server.spool_files() == []
    assert not [p for p in (server.data_dir / "blobs").rglob("*") if p.is_file()]


def test_honest_files_are_still_accepted(server: Server, client: httpx.Client) -> None:
    from safetensors.numpy import save

    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    labels = np.arange(10) % 3
    buf = io.BytesIO()
    np.savez(buf, x=x, labels=labels)
    for name, data in (
        ("ok.npz", buf.getvalue()),
        ("ok.safetensors", save({"x": x, "labels": labels})),
    ):
        reply = _upload(client, name, data)
        assert reply.status_code == 201, reply.text
        assert reply.json()["arrays"]["x"] == {"shape": [10, 4], "dtype": "float32"}
    listing = client.get("/v1/datasets")
    assert listing.status_code == 200
    assert len(listing.json()["items"]) == 2
    for item in listing.json()["items"]:
        assert client.delete(f"/v1/datasets/{item['id']}").status_code == 204
    assert server.spool_files() == []
