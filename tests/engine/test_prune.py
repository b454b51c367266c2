"""`prune` on ONNX weights: unstructured (layer or global) and 2:4, measured honestly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engine.errors import EngineError
from engine.pipeline import compress


def _weights(path: str | Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if len(i.dims) >= 2}


def test_global_magnitude_unstructured_reaches_the_sparsity(
    digits_files: dict[str, Path], tmp_path: Path
) -> None:
    result = compress(
        digits_files["onnx"],
        [{"op": "prune", "sparsity": 0.9, "scope": "global"}],
        dataset_path=digits_files["npz"],
        workdir=tmp_path,
    )
    weights = _weights(result["artifacts"][0]["path"])
    original = _weights(digits_files["onnx"])
    names = list(weights)
    last = names[-1]
    assert np.array_equal(weights[last], original[last])  # the classifier keeps its weights
    pruned = [weights[n] for n in names[:-1]]
    zeros = sum(int((w == 0).sum()) for w in pruned)
    assert zeros / sum(w.size for w in pruned) == pytest.approx(0.9, abs=0.002)
    final = result["final"]
    assert final["sparsity"] > 0.8
    assert final["size_zstd_bytes"] < 0.5 * result["original"]["size_zstd_bytes"]
    assert final["size_bytes"] == pytest.approx(result["original"]["size_bytes"], rel=0.02)
    assert any("size_zstd_bytes" in w for w in result["steps"][0]["warnings"])


def test_global_threshold_is_shared_across_layers(
    digits_files: dict[str, Path], tmp_path: Path
) -> None:
    result = compress(
        digits_files["onnx"],
        [{"op": "prune", "sparsity": 0.7, "scope": "global"}],
        workdir=tmp_path,
    )
    weights = _weights(result["artifacts"][0]["path"])
    original = _weights(digits_files["onnx"])
    names = list(weights)[:-1]
    largest_dropped = max(np.abs(original[n][weights[n] == 0]).max() for n in names)
    smallest_kept = min(np.abs(original[n][weights[n] != 0]).min() for n in names)
    assert largest_dropped <= smallest_kept
    per_layer = [float((weights[n] == 0).mean()) for n in names]
    assert max(per_layer) - min(per_layer) > 0.2  # global: layers end up with different sparsity


def test_two_four_leaves_two_zeros_in_every_block(
    digits_files: dict[str, Path], tmp_path: Path
) -> None:
    result = compress(
        digits_files["onnx"],
        [{"op": "prune", "granularity": "n:m"}],
        dataset_path=digits_files["npz"],
        workdir=tmp_path,
    )
    model = onnx.load(result["artifacts"][0]["path"])
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    checked = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            w = inits[node.input[1]].reshape(inits[node.input[1]].shape[0], -1)
        elif node.op_type == "Gemm":
            w = inits[node.input[1]]
        else:
            continue
        if np.count_nonzero(w) == w.size:
            continue  # the classifier is left dense
        full = w[:, : w.shape[1] // 4 * 4].reshape(w.shape[0], -1, 4)
        assert ((full == 0).sum(-1) >= 2).all(), node.name
        checked += 1
    assert checked == 4
    assert result["ratios"]["accuracy_drop"] is not None


@pytest.mark.slow
def test_random_is_reproducible_and_ignore_is_respected(
    digits_files: dict[str, Path], tmp_path: Path
) -> None:
    step = {"op": "prune", "criterion": "random", "sparsity": 0.5, "ignore": ["0.weight"]}
    a = compress(digits_files["onnx"], [step], workdir=tmp_path / "a")
    b = compress(digits_files["onnx"], [step], workdir=tmp_path / "b")
    assert a["artifacts"][0]["sha256"] == b["artifacts"][0]["sha256"]
    weights = _weights(a["artifacts"][0]["path"])
    assert np.count_nonzero(weights["0.weight"]) == weights["0.weight"].size


def test_everything_ignored_is_a_clear_error(digits_files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(EngineError) as err:
        compress(digits_files["onnx"], [{"op": "prune", "ignore": ["*"]}], workdir=tmp_path)
    assert err.value.code == "nothing_to_prune"


def test_masks_prune_exactly_the_requested_share_even_with_tied_scores() -> None:
    from engine.config import PruneConfig
    from engine.ops.prune.onnx_weights import make_masks

    scores = {"a": np.zeros((10, 10)), "b": np.r_[np.zeros(50), np.arange(1, 51)].reshape(10, 10)}
    for scope in ("layer", "global"):
        masks = make_masks(scores, {"a": 1, "b": 1}, PruneConfig(scope=scope), 0.3)
        zeros = sum(int((~m).sum()) for m in masks.values())
        assert zeros == 60  # 30 % of 200, although 150 scores tie at 0
        if scope == "layer":
            assert int((~masks["b"]).sum()) == 30 and masks["b"].ravel()[50:].all()


@pytest.mark.slow
def test_channel_rounding_is_dropped_when_it_would_empty_a_layer(
    digits_files: dict[str, Path], tmp_path: Path
) -> None:
    result = compress(
        digits_files["pt2"],
        [{"op": "prune", "granularity": "channels", "sparsity": 0.9}],
        dataset_path=digits_files["npz"],
        workdir=tmp_path,
    )
    step = result["steps"][0]
    assert any("round_to 8 was not applied" in w for w in step["warnings"])
    channels = [e["out_channels"] for e in step["details"]["layers"]][:-1]
    assert channels == [3, 6, 12, 25]  # 10 % of 32/64/128/256 (floored), none left whole
