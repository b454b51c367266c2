"""Datasets: .npz / .safetensors detected from content, checked, and matched to model inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.errors import EngineError
from engine.io.datasets import inspect_dataset, load_dataset, match_inputs, synthetic
from engine.io.formats import TensorSpec

IMAGE = TensorSpec("input", ("batch", 1, 8, 8), "float32")


def _npz(tmp_path: Path, name: str = "data.bin", **arrays: np.ndarray) -> Path:
    path = tmp_path / name
    with path.open("wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    return path


def test_npz_and_safetensors_are_read_from_content(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    x = np.random.default_rng(0).random((7, 1, 8, 8), dtype=np.float32)
    labels = np.arange(7, dtype=np.int64)
    npz = _npz(tmp_path, "a.safetensors", x=x, labels=labels)
    st = tmp_path / "b.npz"
    save_file({"x": x, "labels": labels}, str(st))
    for path in (npz, st):
        info = inspect_dataset(path)
        assert info == {
            "num_samples": 7,
            "arrays": {
                "x": {"shape": [7, 1, 8, 8], "dtype": "float32"},
                "labels": {"shape": [7], "dtype": "int64"},
            },
            "has_labels": True,
        }
        np.testing.assert_array_equal(load_dataset(path)["x"], x)


def test_arrays_must_share_the_sample_count(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=np.zeros((5, 3), np.float32), labels=np.zeros(4, np.int64))
    with pytest.raises(EngineError) as err:
        load_dataset(path)
    assert err.value.code == "dataset_invalid"
    assert "x: 5" in err.value.detail and "labels: 4" in err.value.detail


def test_object_arrays_are_refused_without_unpickling(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(EngineError) as err:
        load_dataset(path)
    assert err.value.code == "dataset_invalid"


def test_other_content_is_not_a_dataset(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a dataset")
    with pytest.raises(EngineError) as err:
        load_dataset(path)
    assert err.value.code == "dataset_invalid"


def test_single_input_accepts_x_or_inputs_and_casts_floats() -> None:
    x = np.zeros((3, 1, 8, 8), np.float64)
    for name in ("x", "inputs", "input"):
        samples = match_inputs({name: x, "labels": np.array([1, 2, 3])}, [IMAGE])
        assert samples.inputs["input"].dtype == np.float32
        assert samples.labels is not None and samples.labels.tolist() == [1, 2, 3]


def test_a_missing_input_array_is_named() -> None:
    with pytest.raises(EngineError) as err:
        match_inputs({"images": np.zeros((3, 1, 8, 8), np.float32)}, [IMAGE])
    assert err.value.code == "dataset_mismatch"
    assert "'input'" in err.value.detail and "images" in err.value.detail
    assert "[N, 1, 8, 8]" in err.value.detail


def test_a_wrong_shape_is_reported_with_the_expected_one() -> None:
    with pytest.raises(EngineError) as err:
        match_inputs({"x": np.zeros((3, 64), np.float32)}, [IMAGE])
    assert err.value.code == "dataset_mismatch"
    assert "[3, 64]" in err.value.detail and "[N, 1, 8, 8] float32" in err.value.detail


def test_multi_input_models_need_one_array_per_input() -> None:
    specs = [TensorSpec("a", ("batch", 4), "float32"), TensorSpec("b", ("batch", 2), "int64")]
    arrays = {"a": np.zeros((5, 4), np.float32), "b": np.zeros((5, 2), np.int32)}
    samples = match_inputs(arrays, specs)
    assert samples.inputs["b"].dtype == np.int64
    with pytest.raises(EngineError) as err:
        match_inputs({"a": arrays["a"], "x": arrays["b"]}, specs)
    assert "'b'" in err.value.detail
    with pytest.raises(EngineError) as err:
        match_inputs({"a": arrays["a"], "b": np.zeros((5, 2), np.float32)}, specs)
    assert "dtype float32" in err.value.detail


def test_labels_must_be_class_indices() -> None:
    x = np.zeros((3, 1, 8, 8), np.float32)
    with pytest.raises(EngineError) as err:
        match_inputs({"x": x, "labels": np.eye(3, dtype=np.float32)}, [IMAGE])
    assert err.value.code == "dataset_mismatch" and "argmax" in err.value.detail
    assert match_inputs({"x": x, "labels": np.eye(3)}, [IMAGE], use_labels=False).labels is None


def test_synthetic_inputs_follow_the_spec_and_the_seed() -> None:
    a, b = synthetic([IMAGE], seed=3), synthetic([IMAGE], seed=3)
    assert a.inputs["input"].shape == (32, 1, 8, 8) and a.source == "synthetic"
    np.testing.assert_array_equal(a.inputs["input"], b.inputs["input"])


def test_holdout_split_is_stratified_seeded_and_disjoint() -> None:
    from engine.io.datasets import Samples

    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    x = np.arange(100, dtype=np.float32)[:, None]
    train, held = Samples({"x": x}, labels, "dataset").split(0.3, seed=0)
    assert len(train) + len(held) == 100 and len(held) == 30
    assert held.labels is not None and train.labels is not None
    assert np.bincount(held.labels).tolist() == [3, 6, 9, 12]  # 30 % of every class
    assert not set(train.inputs["x"][:, 0]) & set(held.inputs["x"][:, 0])
    again = Samples({"x": x}, labels, "dataset").split(0.3, seed=0)[1]
    assert np.array_equal(again.inputs["x"], held.inputs["x"])
