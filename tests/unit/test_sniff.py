"""The API's cheap content checks on uploads (no unpickling, no model execution)."""

from __future__ import annotations

import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from app.api.problems import Problem
from app.services.sniff import sniff_dataset, sniff_model


def _write(tmp_path: Path, data: bytes, name: str = "f") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_formats_are_detected_from_content(tmp_path: Path, digits_files: dict[str, Path]) -> None:
    assert sniff_model(digits_files["onnx"]) == "onnx"
    assert sniff_model(digits_files["pt2"]) == "pt2"
    renamed = _write(tmp_path, digits_files["pt2"].read_bytes(), "model.onnx")
    assert sniff_model(renamed) == "pt2"


def test_torchscript_is_refused(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), path)
    with pytest.raises(Problem) as err:
        sniff_model(path)
    assert err.value.status == 422 and err.value.code == "torchscript_refused"


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_raw_pickles_are_refused(tmp_path: Path, protocol: int) -> None:
    with pytest.raises(Problem) as err:
        sniff_model(_write(tmp_path, pickle.dumps([1, 2], protocol=protocol)))
    assert err.value.code == "pickle_refused"


def test_truncated_onnx_is_reported_as_truncated(
    tmp_path: Path, digits_files: dict[str, Path]
) -> None:
    data = digits_files["onnx"].read_bytes()
    for cut in (len(data) // 3, len(data) - 10):
        with pytest.raises(Problem) as err:
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
