"""The API's cheap content checks on uploads (no unpickling, no model execution)."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from app.api.problems import problem_for
from app.errors import Invalid
from app.services.sniff import sniff_dataset, sniff_model


@pytest.fixture(scope="module")
def small_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small real .pt2 (torch.export) and ONNX (a 64x64 Gemm): sniffing needs bytes, not
    a trained model, so these tests never wait for the digits example to be trained."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tests.security.model_code_files import small_pt2

    out = tmp_path_factory.mktemp("sniff")
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
        [weight],
    )
    onnx.save(helper.make_model(graph), out / "m.onnx")
    return {"onnx": out / "m.onnx", "pt2": small_pt2(out / "m.pt2")}


def _write(tmp_path: Path, data: bytes, name: str = "f") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_formats_are_detected_from_content(tmp_path: Path, small_files: dict[str, Path]) -> None:
    assert sniff_model(small_files["onnx"]) == "onnx"
    assert sniff_model(small_files["pt2"]) == "pt2"
    renamed = _write(tmp_path, small_files["pt2"].read_bytes(), "model.onnx")
    assert sniff_model(renamed) == "pt2"


def test_torchscript_is_refused(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), path)
    with pytest.raises(Invalid) as err:
        sniff_model(path)
    assert problem_for(err.value).status == 422 and err.value.code == "torchscript_refused"


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_raw_pickles_are_refused(tmp_path: Path, protocol: int) -> None:
    with pytest.raises(Invalid) as err:
        sniff_model(_write(tmp_path, pickle.dumps([1, 2], protocol=protocol)))
    assert err.value.code == "pickle_refused"


def test_truncated_onnx_is_reported_as_truncated(
    tmp_path: Path, small_files: dict[str, Path]
) -> None:
    data = small_files["onnx"].read_bytes()
    for cut in (len(data) // 3, len(data) - 10):
        with pytest.raises(Invalid) as err:
            sniff_model(_write(tmp_path, data[:cut]))
        assert err.value.code == "invalid_model"
        assert "truncated" in err.value.detail


def test_dataset_headers_are_read_without_loading(tmp_path: Path) -> None:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((7, 1, 8, 8), np.float32), labels=np.arange(7))
    info = sniff_dataset(_write(tmp_path, buf.getvalue()))
    assert info == {
        "format": "npz",
        "arrays": {
            "x": {"shape": [7, 1, 8, 8], "dtype": "float32"},
            "labels": {"shape": [7], "dtype": "int64"},
        },
        "num_samples": 7,
        "has_labels": True,
    }


def test_safetensors_header(tmp_path: Path) -> None:
    header = json.dumps(
        {"input": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}}
    ).encode()
    data = struct.pack("<Q", len(header)) + header + bytes(48)
    info = sniff_dataset(_write(tmp_path, data))
    assert info["format"] == "safetensors"
    assert info["num_samples"] == 3
    assert info["has_labels"] is False


def _zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_pt2_archive_format_is_read_through_a_tiny_cap(tmp_path: Path) -> None:
    # Stored (no compression ratio to catch): the member's declared size alone is refused.
    path = _zip(tmp_path / "m.pt2", {"m/archive_format": b"pt2" + bytes(1 << 20)})
    with pytest.raises(Invalid) as err:
        sniff_model(path)
    assert err.value.code == "archive_too_large"
    assert err.value.field == "file"


def test_deflate_bomb_in_a_model_zip_is_refused_before_reading(tmp_path: Path) -> None:
    path = _zip(
        tmp_path / "m.pt2",
        {"m/archive_format": b"pt2", "m/data/0": bytes(64 << 20)},
        zipfile.ZIP_DEFLATED,
    )
    with pytest.raises(Invalid) as err:
        sniff_model(path)
    assert err.value.code == "archive_too_large"
    assert "m/data/0" in err.value.detail


def test_npz_bomb_is_refused_before_reading(tmp_path: Path) -> None:
    header = _npy((16 << 20,), "<f4")
    path = _zip(tmp_path / "d.npz", {"x.npy": header + bytes(64 << 20)}, zipfile.ZIP_DEFLATED)
    with pytest.raises(Invalid) as err:
        sniff_dataset(path)
    assert err.value.code == "archive_too_large"


def _npy(shape: tuple[int, ...], descr: str) -> bytes:
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}"
    text += " " * (64 - (10 + len(text) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


@pytest.mark.parametrize(
    ("shape", "descr", "data_bytes", "location"),
    [
        ((10**12, 4), "<f4", 160, "x.shape"),
        ((10, 4), "<f8", 160, "x.shape"),
        ((-10, -4), "<f4", 160, "x.shape"),
        ((10, 4), "|O", 80, "x.dtype"),
    ],
)
def test_npz_header_lies(
    tmp_path: Path, shape: tuple[int, ...], descr: str, data_bytes: int, location: str
) -> None:
    path = _zip(tmp_path / "d.npz", {"x.npy": _npy(shape, descr) + bytes(data_bytes)})
    with pytest.raises(Invalid) as err:
        sniff_dataset(path)
    assert err.value.code == "dataset_invalid"
    assert err.value.extra["location"] == location


def _st(header: object, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("header", "data", "location"),
    [
        ({"x": {"dtype": "F32", "shape": [10, "a"], "data_offsets": [0, 160]}}, 160, "x.shape"),
        ({"x": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 160]}}, 160, "x.shape"),
        ({"x": {"dtype": "F32", "shape": [40], "data_offsets": [0, 160]}}, 200, "data_offsets"),
        ({"x": {"dtype": "C64", "shape": [40], "data_offsets": [0, 160]}}, 160, "x.dtype"),
        ({"x": {"dtype": "F32", "shape": [40], "data_offsets": [0]}}, 160, "x.data_offsets"),
        ({"x": {"dtype": "F32", "shape": [40]}}, 160, "x.data_offsets"),
        (
            {"x": {"dtype": "F32", "shape": [40], "data_offsets": [0, 160]}, "__metadata__": 1},
            160,
            "__metadata__",
        ),
        (
            {
                "x": {"dtype": "F32", "shape": [20], "data_offsets": [0, 80]},
                "labels": {"dtype": "I64", "shape": [20], "data_offsets": [40, 200]},
            },
            200,
            "labels.data_offsets",
        ),
    ],
)
def test_safetensors_header_lies(tmp_path: Path, header: object, data: int, location: str) -> None:
    with pytest.raises(Invalid) as err:
        sniff_dataset(_write(tmp_path, _st(header, bytes(data))))
    assert err.value.code == "dataset_invalid"
    assert err.value.extra["location"] == location
    assert location in err.value.detail
