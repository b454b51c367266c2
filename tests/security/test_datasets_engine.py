"""The sandbox's dataset loader: zip bounds, header lies, NaN/Inf inputs, out-of-range labels.

Issue #10: NaN/Inf inputs and out-of-range labels gave accuracy 0 with no warning, and a header
claiming 10^12 samples surfaced as a misleading memory_limit_exceeded.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engine.errors import EngineError
from engine.io.datasets import load_dataset, match_inputs
from engine.io.formats import TensorSpec
from tests.security.uploads_support import npy_header

IMAGE = TensorSpec("input", ("batch", 4), "float32")
LOGITS = TensorSpec("logits", ("batch", 3), "float32")


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    path.write_bytes(buf.getvalue())
    return path


def test_npz_bomb_is_refused_before_unpacking(tmp_path: Path) -> None:
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", npy_header((64 << 20,), "|u1") + bytes(64 << 20))
    with pytest.raises(EngineError) as err:
        load_dataset(path)
    assert err.value.code == "archive_too_large"
    assert err.value.field == "dataset_id"


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("<Q", 2**40) + b"{}",
        (lambda h: struct.pack("<Q", len(h)) + h + bytes(16))(
            json.dumps({"x": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 16]}}).encode()
        ),
    ],
    ids=["header-length", "10^12-samples"],
)
def test_safetensors_lies_are_refused_by_the_loader(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "lie.safetensors"
    path.write_bytes(data)
    with pytest.raises(EngineError) as err:
        load_dataset(path)
    assert err.value.code == "dataset_invalid"
    assert err.value.field == "dataset_id"


def test_npz_shape_lie_is_refused_by_the_loader(tmp_path: Path) -> None:
    path = tmp_path / "lie.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", npy_header((10**12, 4)) + bytes(160))
    with pytest.raises(EngineError) as err:
        load_dataset(path)
    assert err.value.code == "dataset_invalid"
    assert "x.shape" in err.value.detail


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_refused_naming_the_array(tmp_path: Path, bad: float) -> None:
    x = np.ones((20, 4), np.float32)
    x[7, 2] = bad
    arrays = load_dataset(_npz(tmp_path / "d.npz", x=x, labels=np.arange(20) % 3))
    with pytest.raises(EngineError) as err:
        match_inputs(arrays, [IMAGE], outputs=[LOGITS])
    assert err.value.code == "dataset_invalid"
    assert "'input'" in err.value.detail
    assert "1 of 20 samples" in err.value.detail
    assert "sample 7" in err.value.detail


def test_float64_overflowing_float32_is_refused() -> None:
    x = np.ones((5, 4))
    x[1, 1] = 1e300
    with pytest.raises(EngineError, match="NaN or Inf"):
        match_inputs({"x": x}, [IMAGE])


@pytest.mark.parametrize(("low", "high"), [(-1, 2), (0, 3), (0, 1000)])
def test_out_of_range_labels_are_refused(low: int, high: int) -> None:
    labels = np.array([low, 1, high] * 4)
    arrays = {"x": np.zeros((12, 4), np.float32), "labels": labels}
    with pytest.raises(EngineError) as err:
        match_inputs(arrays, [IMAGE], outputs=[LOGITS])
    assert err.value.code == "dataset_invalid"
    assert "`labels`" in err.value.detail
    assert f"from {low} to {high}" in err.value.detail
    assert "0 … 2" in err.value.detail


def test_negative_labels_are_refused_without_a_class_count() -> None:
    with pytest.raises(EngineError, match="0 or more"):
        match_inputs({"x": np.zeros((3, 4), np.float32), "labels": np.array([0, -1, 1])}, [IMAGE])


def test_clean_dataset_passes(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32)
    arrays = load_dataset(_npz(tmp_path / "d.npz", x=x, labels=np.arange(12) % 3))
    samples = match_inputs(arrays, [IMAGE], outputs=[LOGITS])
    assert len(samples) == 12
    assert samples.labels is not None and samples.labels.max() == 2
