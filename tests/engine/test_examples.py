"""The digits examples: accurate, deterministic, exported with a dynamic batch dim."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engine.inspect import inspect_model


def test_digits_cnn_files(digits_files: dict[str, Path]) -> None:
    data = np.load(digits_files["npz"], allow_pickle=False)
    assert data["x"].dtype == np.float32 and data["x"].shape[1:] == (1, 8, 8)
    assert data["labels"].dtype == np.int64 and len(data["labels"]) == len(data["x"])
    assert data["x"].min() >= 0.0 and data["x"].max() <= 1.0
    info = inspect_model(digits_files["onnx"])
    assert info["inputs"][0]["shape"][0] == "batch"


@pytest.mark.slow
def test_digits_mlp_is_accurate_and_deterministic(
    tmp_path: Path, mlp_files: dict[str, Path]
) -> None:
    from engine.examples import write_digits_mlp

    again = write_digits_mlp(tmp_path)
    assert again["accuracy"] >= 0.95
    first = onnx.load(str(mlp_files["onnx"])).graph.initializer
    second = onnx.load(str(again["onnx"])).graph.initializer
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    flat = np.load(again["npz"], allow_pickle=False)
    assert flat["x"].shape[1:] == (64,)
