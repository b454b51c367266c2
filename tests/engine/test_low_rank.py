"""`low_rank` on the torch model: truncated-SVD factorization of Linear and Conv2d layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from engine.config import LowRankConfig, parse_op, plan_pipeline
from engine.errors import EngineError
from engine.ops.low_rank import choose_rank
from engine.pipeline import compress


@pytest.mark.slow
def test_energy_on_the_mlp_shrinks_params_and_reports_each_layer(
    mlp_files: dict[str, Path], tmp_path: Path
) -> None:
    result = compress(
        mlp_files["pt2"],
        [{"op": "low_rank", "energy": 0.9}],
        dataset_path=mlp_files["npz"],
        workdir=tmp_path,
    )
    original, final = result["original"], result["final"]
    assert final["params"] <= 0.6 * original["params"]
    assert result["ratios"]["accuracy_drop"] is not None  # measured before any fine-tune
    assert result["ratios"]["accuracy_drop"] <= 0.05
    step = result["steps"][0]
    assert step["backend"] == "torch"
    layers = step["details"]["layers"]
    factorized = [e for e in layers.values() if "skipped" not in e]
    assert len(factorized) == 2
    for entry in factorized:
        assert entry["kept_energy"] >= 0.9
        assert entry["params_after"] < entry["params_before"]
    (last,) = [e for e in layers.values() if "skipped" in e]
    assert "output layer" in last["skipped"]
    model = onnx.load(step["artifact"]["path"])
    assert sum(n.op_type in ("Gemm", "MatMul") for n in model.graph.node) == 5


@pytest.mark.slow
def test_conv_layers_factorize_into_kxk_then_1x1(
    digits_files: dict[str, Path], tmp_path: Path
) -> None:
    result = compress(
        digits_files["pt2"],
        [{"op": "low_rank", "rank_ratio": 0.5, "include_last_layer": True}],
        dataset_path=digits_files["npz"],
        workdir=tmp_path,
    )
    step = result["steps"][0]
    layers = step["details"]["layers"]
    convs = [e for e in layers.values() if e["type"] == "Conv2d"]
    assert [e["rank"] for e in convs] == [4, 32, 64]  # half of min(out, in·3·3)
    assert all("skipped" not in e for e in layers.values())
    assert result["final"]["params"] < 0.7 * result["original"]["params"]
    model = onnx.load(step["artifact"]["path"])
    kernels = [
        next(a.ints for a in n.attribute if a.name == "kernel_shape")
        for n in model.graph.node
        if n.op_type == "Conv"
    ]
    assert [list(k) for k in kernels].count([1, 1]) == 3
    assert result["final"]["accuracy_top1"] > 0.3  # runs and still classifies before fine-tune


def test_rank_choice_and_config() -> None:
    s = np.array([3.0, 2.0, 1.0, 0.5])
    assert choose_rank(s, LowRankConfig(energy=0.9)) == 2  # (9+4)/14.25 = 0.91
    assert choose_rank(s, LowRankConfig(energy=1.0)) == 4
    assert choose_rank(s, LowRankConfig(rank_ratio=0.5)) == 2
    assert LowRankConfig().energy == 0.9
    with pytest.raises(ValueError, match="either rank_ratio or energy"):
        LowRankConfig(rank_ratio=0.5, energy=0.9)
    configs = [parse_op({"op": "low_rank"}), parse_op({"op": "weight_share"})]
    assert plan_pipeline(configs, "pt2") == ["torch", "onnx"]


def test_low_rank_needs_a_torch_upload(mlp_files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(EngineError) as err:
        compress(mlp_files["onnx"], [{"op": "low_rank"}], workdir=tmp_path)
    assert err.value.code == "unsupported_op"
