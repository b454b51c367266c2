"""`low_rank` on the torch model: truncated-SVD factorization of Linear and Conv2d layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from engine.config import LowRankConfig, parse_op, plan_pipeline
from engine.errors import EngineError
from engine.ops.low_rank import choose_rank
from engine.ops.low_rank_search import paying_rank, rank_options
from engine.pipeline import compress


@pytest.fixture(scope="module")
def low_rank_mlp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A digits MLP 64-128-128-10 trained a few epochs, whose middle layer is then cut to rank
    8 (so it factorizes for free) while the first keeps its trained, full-rank weight."""
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    from engine.examples import export_model, train

    digits = load_digits()
    x, y = (digits.data / 16).astype(np.float32), digits.target.astype(np.int64)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    train(model, x[:1000], y[:1000], epochs=8)
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(model[2].weight, full_matrices=False)
        model[2].weight.copy_((u[:, :8] * s[:8]) @ vh[:8])
    out = tmp_path_factory.mktemp("low_rank_mlp")
    files = export_model(model, x[1000:], out / "mlp")
    np.savez(out / "digits.npz", x=x[1000:], labels=y[1000:])
    return {"pt2": files["pt2"], "npz": out / "digits.npz"}


def _low_rank(files: dict[str, Path], tmp_path: Path, **config: object) -> dict:
    result = compress(
        files["pt2"],
        [{"op": "low_rank", **config}],
        dataset_path=files["npz"],
        workdir=tmp_path,
    )
    return result


@pytest.mark.slow
def test_measured_mode_factorizes_only_where_it_pays(
    low_rank_mlp: dict[str, Path], tmp_path: Path
) -> None:
    result = _low_rank(low_rank_mlp, tmp_path)  # the default: measured, min_cosine 0.99
    step = result["steps"][0]
    details = step["details"]
    assert details["criterion"] == "measured"
    search = details["search"]
    assert search["target"] == "cosine >= 0.99" and search["target_met"] is True
    assert search["measured"]["cosine_similarity"] >= 0.99  # the combination, measured
    layers = details["layers"]
    first, middle, last = layers["0"], layers["2"], layers["4"]
    assert "output layer" in last["skipped"] and "options" not in last
    # every scored layer lists its rank options (largest paying first) with the fidelity
    # of the model with only that layer factorized
    assert [o["rank"] for o in middle["options"]] == [48, 24, 12, 6]
    assert [o["rank"] for o in first["options"]] == [32, 16, 8, 4]
    for entry in (first, middle):
        for option in entry["options"]:
            assert option["params_after"] <= 0.8 * entry["params_before"]
            assert option["macs_after"] == option["params_after"]  # one row: one position
    # the rank-8 layer is factorized at the smallest rank that keeps it exact
    assert middle["rank"] == 12 and middle["fidelity_alone"]["cosine_similarity"] >= 0.9999
    assert middle["params_after"] == 12 * (128 + 128) + 128
    assert middle["macs_after"] < middle["macs_before"]
    assert details["params_after"] < details["params_before"]
    assert result["final"]["params"] < 0.5 * result["original"]["params"]
    assert result["final"]["cosine_similarity"] >= 0.985  # on the other samples too


@pytest.mark.slow
def test_a_strict_target_keeps_the_costly_layer_whole(
    low_rank_mlp: dict[str, Path], tmp_path: Path
) -> None:
    result = _low_rank(low_rank_mlp, tmp_path, target={"min_cosine": 0.9999})
    details = result["steps"][0]["details"]
    first, middle = details["layers"]["0"], details["layers"]["2"]
    assert first["skipped"].startswith("costs too much: rank 32 alone gives cosine")
    assert first["params_after"] == first["params_before"] and "rank" not in first
    assert middle["rank"] == 12
    assert details["search"]["measured"]["cosine_similarity"] >= 0.9999
    assert details["factorized"] == 1


@pytest.mark.slow
def test_a_parameter_budget_stops_once_reached(
    low_rank_mlp: dict[str, Path], tmp_path: Path
) -> None:
    result = _low_rank(low_rank_mlp, tmp_path, max_params_ratio=0.6)
    details = result["steps"][0]["details"]
    assert details["search"]["target"] is None
    assert details["params_after"] <= 0.6 * details["params_before"]
    # the free layer alone reaches the budget: the costly one is not touched
    assert details["layers"]["2"]["rank"] == 12
    assert details["layers"]["0"]["skipped"].startswith("not needed")


@pytest.mark.slow
def test_no_rank_saving_enough_leaves_the_model_whole(
    low_rank_mlp: dict[str, Path], tmp_path: Path
) -> None:
    result = _low_rank(low_rank_mlp, tmp_path, min_saving=0.99)
    step = result["steps"][0]
    for name in ("0", "2"):
        assert step["details"]["layers"][name]["skipped"].startswith("no rank pays")
    assert step["details"]["factorized"] == 0
    assert any("factorized no layer" in w for w in step["warnings"])
    assert result["final"]["params"] == result["original"]["params"]


@pytest.mark.slow
def test_measured_mode_on_convs_backs_off_to_meet_an_sqnr_target(
    digits_files: dict[str, Path], tmp_path: Path
) -> None:
    result = _low_rank(
        digits_files, tmp_path, target={"min_sqnr_db": 18.0}, include_last_layer=True
    )
    details = result["steps"][0]["details"]
    search = details["search"]
    assert search["target_met"] is True
    assert search["measured"]["sqnr_db_min"] >= 18.0
    # the noise of the layers measured alone summed to within 18 dB, but together they missed
    # it: the last choice was undone (the conv back to a larger rank) and measured again
    assert search["backed_off"] == ["2: rank 10 → rank 16"]
    assert details["layers"]["2"]["rank"] == 16
    convs = {n: e for n, e in details["layers"].items() if e["type"] == "Conv2d"}
    assert all("options" in e for e in convs.values())
    chosen = [e for e in details["layers"].values() if "rank" in e]
    assert chosen and all(e["params_after"] <= 0.8 * e["params_before"] for e in chosen)
    assert all("sqnr_db_min" in e["fidelity_alone"] for e in chosen)
    assert result["final"]["params"] < 0.8 * result["original"]["params"]


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
    default = LowRankConfig()
    assert default.measured and default.energy is None
    assert default.goal() == LowRankConfig(target={"min_cosine": 0.99}).goal()
    assert LowRankConfig(max_params_ratio=0.5).goal() is None  # a budget alone
    with pytest.raises(ValueError, match="either rank_ratio or energy"):
        LowRankConfig(rank_ratio=0.5, energy=0.9)
    with pytest.raises(ValueError, match="leave out energy and rank_ratio"):
        LowRankConfig(energy=0.9, target={"min_cosine": 0.99})
    configs = [parse_op({"op": "low_rank"}), parse_op({"op": "weight_share"})]
    assert plan_pipeline(configs, "pt2") == ["torch", "onnx"]


def test_a_rank_pays_only_when_it_saves_enough() -> None:
    # 128×128 + bias: rank 51 keeps 51·256 + 128 = 13,184 of 16,512 (saves 20.2 %)
    assert paying_rank(128, 128, 128, 0.2) == 51
    assert paying_rank(128, 128, 128, 0.99) == 0
    assert paying_rank(32, 9, 32, 0.2) == 5  # a 3×3 conv with one input channel, 32 filters
    assert paying_rank(2, 2, 0, 0.2) == 0
    assert paying_rank(4, 4, 0, 0.0) == 1  # rank 2 would keep 16 of 16: no saving at all
    assert rank_options(51) == [48, 24, 12, 6]
    assert rank_options(4) == [4, 2, 1]


def test_low_rank_needs_a_torch_upload(mlp_files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(EngineError) as err:
        compress(mlp_files["onnx"], [{"op": "low_rank"}], workdir=tmp_path)
    assert err.value.code == "unsupported_op"


def test_an_accuracy_target_needs_labels(mlp_files: dict[str, Path], tmp_path: Path) -> None:
    unlabelled = tmp_path / "x.npz"
    np.savez(unlabelled, x=np.load(mlp_files["npz"])["x"])
    with pytest.raises(EngineError) as err:
        compress(
            mlp_files["pt2"],
            [{"op": "low_rank", "target": {"max_accuracy_drop": 0.01}}],
            dataset_path=unlabelled,
            workdir=tmp_path / "job",
        )
    assert err.value.code == "dataset_needs_labels" and err.value.field == "pipeline[0]"


@pytest.mark.slow
def test_energy_keeps_any_saving_unless_min_saving_is_given(
    digits_files: dict[str, Path], tmp_path: Path
) -> None:
    def ranks(**config: object) -> dict[str, object]:
        result = _low_rank(digits_files, tmp_path / str(len(config)), energy=0.9, **config)
        return result["steps"][0]["details"]["layers"]

    before = ranks()  # as energy always did: any saving at all
    assert all(before[n].get("rank") for n in ("0", "2", "5", "9"))
    strict = ranks(min_saving=0.2)
    # the 512→256 Linear's rank (about 146) keeps about 85 % of its parameters and the first
    # conv's rank 7 (9 inputs, 32 filters) 90 %: both stay whole; the others are as before.
    # (The exact ranks move by one with the digits CNN's training on another CPU.)
    for name in ("0", "2", "5", "9"):
        layer = before[name]
        saving = 1 - layer["params_after"] / layer["params_before"]
        if name in ("0", "9"):
            assert saving < 0.2
            assert strict[name]["skipped"].startswith("saves too little")
            assert strict[name]["params_after"] == strict[name]["params_before"]
        else:
            assert saving >= 0.2
            assert strict[name]["rank"] == layer["rank"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-layer `transformers` BertModel (hidden 64, random init, seeded) with mean pooling and
    L2 norm inside, exported as a .pt2 with a dynamic batch, and 96 token sequences."""
    transformers = pytest.importorskip("transformers")
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).float()
            return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=200,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=32,
    )
    encoder = Encoder(transformers.BertModel(config, add_pooling_layer=False)).eval()
    ids = np.random.default_rng(0).integers(1, 200, size=(96, 16)).astype(np.int64)
    mask = np.ones_like(ids)
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = (torch.from_numpy(ids[:4]), torch.from_numpy(mask[:4]))
    program = torch.export.export(encoder, example, dynamic_shapes=({0: batch}, {0: batch}))
    out = tmp_path_factory.mktemp("tiny_bert")
    torch.export.save(program, str(out / "bert.pt2"))
    np.savez(out / "tokens.npz", ids=ids, mask=mask)
    return {"pt2": out / "bert.pt2", "npz": out / "tokens.npz"}


@pytest.mark.slow
def test_measured_ranks_on_a_transformers_encoder(
    tiny_bert: dict[str, Path], tmp_path: Path
) -> None:
    # freshly initialised attention is close to uniform: Q and K can go to rank 3 for free,
    # while V and the FFN each cost more than this target allows even at their largest rank
    result = compress(
        tiny_bert["pt2"],
        [{"op": "low_rank", "target": {"min_cosine": 0.99998}}],
        dataset_path=tiny_bert["npz"],
        evaluation_task="embedding",
        workdir=tmp_path,
    )
    details = result["steps"][0]["details"]
    assert details["search"]["target_met"] is True
    assert details["search"]["measured"]["cosine_similarity"] >= 0.99998
    for block in (0, 1):
        prefix = f"bert.encoder.layer.{block}"
        for name in ("query", "key"):
            entry = details["layers"][f"{prefix}.attention.self.{name}"]
            assert entry["rank"] == 3 and entry["params_after"] == 3 * 128 + 64
        for name in ("attention.self.value", "intermediate.dense"):
            assert details["layers"][f"{prefix}.{name}"]["skipped"].startswith("costs too much")
        for name in ("attention.output.dense", "output.dense"):
            assert "output layer" in details["layers"][f"{prefix}.{name}"]["skipped"]
    assert details["factorized"] == 4
    assert result["final"]["params"] < result["original"]["params"]
    assert result["final"]["cosine_similarity"] >= 0.9999


@pytest.mark.slow
def test_options_are_scored_on_fewer_samples_when_time_is_short(
    low_rank_mlp: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.ops import low_rank_search

    monkeypatch.setattr(low_rank_search, "SEARCH_SECONDS", 0.0)
    details = _low_rank(low_rank_mlp, tmp_path)["steps"][0]["details"]
    search = details["search"]
    assert search["option_samples"] == low_rank_search.MIN_SCORE_SAMPLES
    assert search["samples"] == 64  # the combination is still measured on all of them
    assert search["target_met"] is True and search["measured"]["cosine_similarity"] >= 0.99
    assert details["layers"]["2"]["rank"] == 12
