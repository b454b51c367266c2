"""Structured pruning of transformer encoders: attention heads and FFN channels removed from a
small BERT-like sentence encoder exported with torch.export, measured through the pipeline."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import EngineError
from engine.ops.prune.allocate import allocate, probe_counts, sensitivities
from engine.ops.prune.reconstruct import (
    _assign,
    correct_in_order,
    downstream_norm,
    fit_kept,
    sink_grams,
)
from engine.ops.prune.transformer import _contribution
from engine.pipeline import compress
from engine.torchgraph.blocks import find_blocks, remove_units, traced_shapes, unit_index
from engine.torchgraph.lift import preflight
from engine.torchgraph.train import TRANSFORMER_LR, Data, load_lifted

VOCAB, SEQ, HIDDEN, HEADS, FFN, LAYERS = 120, 16, 64, 8, 256, 2  # head_dim 8 == heads: on purpose


class SelfAttention(nn.Module):
    """Hugging Face BERT style: Linear q/k/v, view to heads, permute, softmax, view back."""

    def __init__(self, sdpa: bool, head_scale: bool) -> None:
        super().__init__()
        self.sdpa, self.head_dim = sdpa, HIDDEN // HEADS
        self.query, self.key, self.value = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.out = nn.Linear(HIDDEN, HIDDEN)
        # a learned per-head factor couples the heads to a weight outside the Linears
        self.head_scale = nn.Parameter(torch.ones(HEADS, 1, 1)) if head_scale else None

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        if self.sdpa:  # transformers' newer style: (*input_shape, -1, head_dim), transpose
            return x.view(b, n, -1, self.head_dim).transpose(1, 2)
        return x.view(b, n, HEADS, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        b, n = x.shape[:2]
        if self.sdpa:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.out(ctx.transpose(1, 2).reshape(b, n, -1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask
        if self.head_scale is not None:
            scores = scores * self.head_scale
        ctx = scores.softmax(-1) @ v
        return self.out(ctx.permute(0, 2, 1, 3).contiguous().view(b, n, HEADS * self.head_dim))


class Layer(nn.Module):
    def __init__(self, sdpa: bool, head_scale: bool) -> None:
        super().__init__()
        self.attention = SelfAttention(sdpa, head_scale)
        self.attention_norm = nn.LayerNorm(HIDDEN)
        self.intermediate = nn.Linear(HIDDEN, FFN)
        self.output = nn.Linear(FFN, HIDDEN)
        self.output_norm = nn.LayerNorm(HIDDEN)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.attention(x, mask))
        return self.output_norm(x + self.output(F.gelu(self.intermediate(x))))


class Encoder(nn.Module):
    """Token + position embeddings (a `position_ids` buffer read with a slice, as HF does),
    LAYERS encoder layers, mean pooling over the attention mask and L2 normalisation."""

    def __init__(self, sdpa: bool = False, head_scale: bool = False) -> None:
        super().__init__()
        self.word = nn.Embedding(VOCAB, HIDDEN)
        self.position = nn.Embedding(64, HIDDEN)
        self.register_buffer("position_ids", torch.arange(64).expand(1, -1), persistent=False)
        self.norm = nn.LayerNorm(HIDDEN)
        self.layers = nn.ModuleList(Layer(sdpa, head_scale) for _ in range(LAYERS))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        x = self.norm(self.word(input_ids) + self.position(self.position_ids[:, :n]))
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
        for layer in self.layers:
            x = layer(x, mask)
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


def _sentences(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(n, SEQ)).astype(np.int64)
    mask = np.ones((n, SEQ), np.int64)
    for i, length in enumerate(rng.integers(6, SEQ + 1, size=n)):
        ids[i, length:], mask[i, length:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def _export(tmp_path: Path, **kwargs: bool) -> tuple[Encoder, Path, Path]:
    torch.manual_seed(0)
    model = Encoder(**kwargs).eval()
    data = _sentences(96, 1)
    example = tuple(torch.from_numpy(data[k][:4]) for k in ("input_ids", "attention_mask"))
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model, example, dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, tmp_path / "encoder.pt2")
    np.savez(tmp_path / "sentences.npz", **data)
    return model, tmp_path / "encoder.pt2", tmp_path / "sentences.npz"


def _macs(heads: list[int], widths: list[int]) -> int:
    """Multiply-accumulates of one sentence: projections, attention matmuls, FFN."""
    d = HIDDEN // HEADS
    total = 0
    for h, w in zip(heads, widths, strict=True):
        total += SEQ * 4 * HIDDEN * h * d + 2 * SEQ * SEQ * h * d + SEQ * 2 * HIDDEN * w
    return total


def _run_onnx(path: str, data: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return np.asarray(session.run(None, {n: data[n] for n in names})[0])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).mean())


def test_removing_heads_and_channels_equals_zeroing_them(tmp_path: Path) -> None:
    model, pt2, _ = _export(tmp_path)
    gm, _ = load_lifted(pt2)
    data = _sentences(8, 2)
    example = tuple(torch.from_numpy(data[k]) for k in ("input_ids", "attention_mask"))
    blocks, skipped = find_blocks(gm, traced_shapes(gm, example))
    assert skipped == []
    assert [(b.kind, b.name, b.units) for b in blocks] == [
        ("attention", "layers.0.attention", HEADS),
        ("ffn", "layers.0", FFN),
        ("attention", "layers.1.attention", HEADS),
        ("ffn", "layers.1", FFN),
    ]
    assert blocks[0].sources == [f"layers.0.attention.{n}" for n in ("query", "key", "value")]
    # A removed head contributes nothing, exactly like a head whose values are zero; a removed
    # FFN channel like one whose pre-activation is zero (GELU(0) = 0).
    zeroed = copy.deepcopy(model)
    keep_heads, keep_ffn = [0, 2, 3, 6, 7], list(range(0, FFN, 3))
    with torch.no_grad():
        for layer in zeroed.layers:
            for h in sorted(set(range(HEADS)) - set(keep_heads)):
                d = HIDDEN // HEADS
                layer.attention.value.weight[h * d : (h + 1) * d] = 0
                layer.attention.value.bias[h * d : (h + 1) * d] = 0
            gone = sorted(set(range(FFN)) - set(keep_ffn))
            layer.intermediate.weight[gone] = 0
            layer.intermediate.bias[gone] = 0
    for block in blocks:
        remove_units(gm, block, keep_heads if block.kind == "attention" else keep_ffn)
    with torch.no_grad():
        pruned = gm(*example)[0]
        expected = zeroed(*example)
    assert pruned.shape == expected.shape == (8, HIDDEN)
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=1e-4)
    assert gm.get_submodule("layers.1.attention.query").weight.shape == (5 * 8, HIDDEN)
    assert gm.get_submodule("layers.1.output").weight.shape == (HIDDEN, len(keep_ffn))


def test_preflight_lets_index_buffers_and_transformers_through(tmp_path: Path) -> None:
    class Bag(nn.Module):  # no attention: channel removal goes through Torch-Pruning
        def __init__(self) -> None:
            super().__init__()
            self.word, self.position = nn.Embedding(VOCAB, 16), nn.Embedding(64, 16)
            self.register_buffer("position_ids", torch.arange(64).expand(1, -1))
            self.hidden, self.head = nn.Linear(16, 32), nn.Linear(32, 4)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            n = input_ids.shape[1]
            x = self.word(input_ids) + self.position(self.position_ids[:, :n])
            return self.head(torch.relu(self.hidden(x.mean(1))))

    ids = torch.from_numpy(_sentences(4, 0)["input_ids"])
    torch.export.save(torch.export.export(Bag().eval(), (ids,)), tmp_path / "bag.pt2")
    preflight(tmp_path / "bag.pt2", reshapes_channels=True)  # position_ids: int, no channels
    _, pt2, _ = _export(tmp_path, head_scale=True)
    preflight(pt2, reshapes_channels=True)  # head_scale is read by a mul inside attention


def _prune_30(pt2: Path, npz: Path, tmp_path: Path) -> dict[str, Any]:
    """prune channels 30 % of every layer through the pipeline, task embedding."""
    return compress(
        pt2,
        [{"op": "prune", "granularity": "channels", "sparsity": 0.3, "scope": "layer"}],
        dataset_path=npz,
        evaluation_task="embedding",
        workdir=tmp_path / "w",
    )


@pytest.mark.slow  # kept out of the fast set (< 2 min on 2 cores)
def test_thirty_percent_of_heads_and_ffn_channels_through_the_pipeline(tmp_path: Path) -> None:
    model, pt2, npz = _export(tmp_path)
    result = _prune_30(pt2, npz, tmp_path)
    step = result["steps"][0]
    details = step["details"]
    assert step["backend"] == "torch" and details["structure"] == "transformer"
    layers = {e["name"]: e for e in details["layers"]}
    assert sorted(layers) == ["layers.0", "layers.0.attention", "layers.1", "layers.1.attention"]
    for i in range(LAYERS):
        attention, ffn = layers[f"layers.{i}.attention"], layers[f"layers.{i}"]
        assert (attention["heads_before"], attention["heads_after"]) == (8, 6)  # round(5.6)
        assert len(attention["heads_removed"]) == 2
        assert sorted(attention["heads_kept"] + attention["heads_removed"]) == list(range(8))
        assert (ffn["width_before"], ffn["width_after"]) == (256, 176)  # 179 → multiple of 8
    # the job's own metrics (ONNX) see exactly what was removed
    before, after = result["original"], result["final"]
    heads, widths = [6] * LAYERS, [176] * LAYERS
    assert after["macs"] / before["macs"] == pytest.approx(
        _macs(heads, widths) / _macs([HEADS] * LAYERS, [FFN] * LAYERS), rel=1e-3
    )
    assert after["macs"] / before["macs"] <= 0.75
    removed = LAYERS * (2 * 8 * (3 * (HIDDEN + 1) + HIDDEN) + 80 * (2 * HIDDEN + 1))
    assert before["params"] - after["params"] == removed
    # the delivered ONNX runs in plain onnxruntime with the original output shape
    data = _sentences(32, 7)
    pruned = _run_onnx(result["artifacts"][0]["path"], data)
    with torch.no_grad():
        reference = model(*(torch.from_numpy(data[k]) for k in ("input_ids", "attention_mask")))
    assert pruned.shape == tuple(reference.shape) == (32, HIDDEN)
    cosine = _cosine(pruned, reference.numpy())
    assert after["cosine_similarity"] == pytest.approx(cosine, abs=0.05)
    assert 0.5 < cosine < 1.0
    assert any("4 of 16 attention heads" in w and "160 of 512 FFN" in w for w in step["warnings"])


@pytest.mark.slow  # kept out of the fast set (< 2 min on 2 cores)
def test_sdpa_heads_gradual_global_with_their_own_sparsity(tmp_path: Path) -> None:
    _, pt2, npz = _export(tmp_path, sdpa=True)
    result = compress(
        pt2,
        [
            {
                "op": "prune",
                "granularity": "channels",
                "criterion": "entropy",
                "sparsity": 0.25,
                "head_sparsity": 0.5,
                "scope": "global",
                "round_to": None,
                "samples": 64,
                "schedule": {"kind": "gradual", "steps": 2, "epochs_per_step": 1},
                "batch_size": 16,
            }
        ],
        dataset_path=npz,
        evaluation_task="embedding",
        workdir=tmp_path / "w",
    )
    details = result["steps"][0]["details"]
    rounds = details["rounds"]
    assert [r["target_head_sparsity"] for r in rounds] == [pytest.approx(0.4375), 0.5]
    assert rounds[0]["macs_ratio"] > rounds[1]["macs_ratio"]
    assert all(len(r["training"]) == 1 for r in rounds)
    layers = details["layers"]
    attention = [e for e in layers if e["kind"] == "attention"]
    ffn = [e for e in layers if e["kind"] == "ffn"]
    assert len(attention) == len(ffn) == LAYERS
    assert sum(e["heads_after"] for e in attention) == HEADS * LAYERS // 2
    assert all(e["heads_after"] >= 1 for e in attention)
    assert sum(e["width_after"] for e in ffn) == FFN * LAYERS * 3 // 4
    assert result["final"]["macs"] < result["original"]["macs"]
    assert "cosine_similarity" in result["final"]


@pytest.mark.slow  # kept out of the fast set (< 2 min on 2 cores)
def test_prune_then_distill_end_to_end_on_an_embedding_task(tmp_path: Path) -> None:
    _, pt2, npz = _export(tmp_path)
    result = compress(
        pt2,
        [
            {"op": "prune", "granularity": "channels", "sparsity": 0.3},
            {"op": "distill", "epochs": 2, "batch_size": 16},
        ],
        dataset_path=npz,
        evaluation_task="embedding",
        workdir=tmp_path / "w",
    )
    assert [s["op"] for s in result["steps"]] == ["prune", "distill"]
    assert result["evaluation"]["holdout"] == 0.3
    details = result["steps"][1]["details"]
    # a pretrained transformer's learning rate, and every LayerNorm output matched (the
    # embeddings' and each layer's two: the residual width is kept)
    assert details["lr"] == TRANSFORMER_LR
    assert details["hidden_states"] == {
        "pairs": 1 + 2 * LAYERS,
        "weight": 1.0,
        "at": "LayerNorm outputs",
        "tokens": "real (attention mask)",
    }
    assert result["final"]["macs"] / result["original"]["macs"] <= 0.75
    for step in result["steps"]:
        assert 0.0 < step["metrics"]["cosine_similarity"] <= 1.0
    _run_onnx(result["artifacts"][0]["path"], _sentences(4, 3))


@pytest.mark.slow  # kept out of the fast set (< 2 min on 2 cores)
def test_heads_that_cannot_be_followed_stay_whole_and_bad_requests_are_refused(
    tmp_path: Path, mlp_files: dict[str, Path]
) -> None:
    _, pt2, npz = _export(tmp_path, head_scale=True)
    result = _prune_30(pt2, npz, tmp_path)
    step = result["steps"][0]
    assert [e["kind"] for e in step["details"]["layers"]] == ["ffn", "ffn"]
    assert len(step["details"]["skipped"]) == LAYERS
    assert any("kept whole" in w and "head_scale" in w for w in step["warnings"])

    with pytest.raises(EngineError) as err:
        compress(
            pt2,
            [{"op": "prune", "granularity": "unstructured", "head_sparsity": 0.5}],
            dataset_path=npz,
            workdir=tmp_path / "w2",
        )
    assert err.value.code == "invalid_pipeline" and "granularity 'channels'" in str(err.value)
    with pytest.raises(EngineError) as err:
        compress(
            mlp_files["pt2"],
            [{"op": "prune", "granularity": "channels", "head_sparsity": 0.5}],
            dataset_path=mlp_files["npz"],
            workdir=tmp_path / "w3",
        )
    assert err.value.code == "invalid_pipeline" and "no attention block" in str(err.value)


def test_training_defaults_to_a_small_learning_rate_on_a_transformer(tmp_path: Path) -> None:
    from engine.torchgraph.train import DEFAULT_LR, default_lr

    for sdpa in (False, True):  # eager attention (matmul/softmax) and SDPA
        _, pt2, _ = _export(tmp_path, sdpa=sdpa)
        assert default_lr(load_lifted(pt2)[0]) == TRANSFORMER_LR < DEFAULT_LR

    class Cnn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).mean((2, 3)))

    program = torch.export.export(Cnn().eval(), (torch.rand(1, 3, 8, 8),))
    torch.export.save(program, tmp_path / "cnn.pt2")
    assert default_lr(load_lifted(tmp_path / "cnn.pt2")[0]) == DEFAULT_LR


def test_hidden_states_pair_layer_norms_and_vanish_for_identical_models(tmp_path: Path) -> None:
    from engine.torchgraph.hidden import HiddenStates

    _, pt2, _ = _export(tmp_path)
    student, teacher = load_lifted(pt2)[0], load_lifted(pt2)[0]
    data = _sentences(4, 1)
    xs = [torch.from_numpy(data[k]) for k in ("input_ids", "attention_mask")]
    hidden = HiddenStates(student, teacher, weight=2.0)
    assert hidden.pairs == 1 + 2 * LAYERS and not hidden.shapes_match()  # nothing run yet
    with torch.no_grad():
        teacher(*xs)
        student(*xs)
    assert hidden.shapes_match()
    assert float(hidden.loss()) == pytest.approx(0.0, abs=1e-9)  # the same weights
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
        student(*xs)
    assert float(hidden.loss()) > 0.0
    hidden.close()
    student(*xs)
    assert not hidden.captured  # hooks gone


def test_hidden_states_count_only_the_real_tokens(tmp_path: Path) -> None:
    """With the attention mask's position, a padding position's hidden state (never attended
    to, left out of the pooling) does not count; a real token's does."""
    from engine.torchgraph.hidden import HiddenStates

    _, pt2, _ = _export(tmp_path)
    student, teacher = load_lifted(pt2)[0], load_lifted(pt2)[0]
    data = _sentences(6, 3)
    xs = [torch.from_numpy(data[k]) for k in ("input_ids", "attention_mask")]
    pad = xs[1] == 0
    assert pad.any() and (~pad).any()
    hidden = HiddenStates(student, teacher, weight=1.0, mask=1)
    with torch.no_grad():
        teacher(*xs)
        student(*xs)
    assert float(hidden.loss()) == pytest.approx(0.0, abs=1e-9)
    for k in range(hidden.pairs):  # move every padding position far away
        hidden.captured[("s", k)] = hidden.captured[("s", k)] + 10.0 * pad[..., None]
    assert float(hidden.loss()) == pytest.approx(0.0, abs=1e-9)
    hidden.captured[("s", 0)] = hidden.captured[("s", 0)] + 0.1 * (~pad)[..., None]
    assert float(hidden.loss()) > 1e-4
    unmasked = HiddenStates(student, teacher, weight=1.0)  # without it, padding counts
    with torch.no_grad():
        teacher(*xs)
        student(*xs)
    unmasked.captured[("s", 0)] = unmasked.captured[("s", 0)] + 10.0 * pad[..., None]
    assert float(unmasked.loss()) > 1.0
    hidden.close()
    unmasked.close()


def _gm_and_data(tmp_path: Path) -> tuple[Any, tuple[torch.Tensor, ...], Data, list[Any]]:
    _, pt2, _ = _export(tmp_path)
    gm, _ = load_lifted(pt2)
    sentences = _sentences(48, 4)
    xs = [torch.from_numpy(sentences[k]) for k in ("input_ids", "attention_mask")]
    blocks, _ = find_blocks(gm, traced_shapes(gm, tuple(x[:4] for x in xs)))
    return gm, tuple(xs), Data(xs, None, None), blocks


def test_activation_scores_are_the_energy_each_head_and_channel_adds(tmp_path: Path) -> None:
    gm, xs, data, blocks = _gm_and_data(tmp_path)
    grams = sink_grams(gm, blocks, data, 16)
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        gm.get_submodule(b.sink).register_forward_pre_hook(
            lambda m, args, name=b.sink: seen.setdefault(name, []).append(args[0])
        )
        for b in blocks
    ]
    with torch.no_grad():
        gm(*xs)
    for h in hooks:
        h.remove()
    for block in blocks:
        x = torch.cat(seen[block.sink]).reshape(-1, block.units * block.unit_sizes[block.sink])
        w = gm.get_submodule(block.sink).weight.detach()
        size = block.unit_sizes[block.sink]
        brute = torch.stack(
            [
                (x[:, u * size : (u + 1) * size] @ w[:, u * size : (u + 1) * size].T)
                .pow(2)
                .sum(1)
                .mean()
                for u in range(block.units)
            ]
        )
        scores = _contribution(block, w, grams[block.sink])
        torch.testing.assert_close(scores, brute.float(), rtol=1e-4, atol=1e-7)


def test_refitting_the_sink_moves_a_removed_channel_onto_its_twin(tmp_path: Path) -> None:
    gm, xs, data, blocks = _gm_and_data(tmp_path)
    ffn = next(b for b in blocks if b.kind == "ffn" and b.name == "layers.0")
    up, down = gm.get_submodule("layers.0.intermediate"), gm.get_submodule("layers.0.output")
    with torch.no_grad():  # channel 5 computes exactly what channel 3 does, and both matter
        up.weight[5], up.bias[5] = up.weight[3], up.bias[3]
        down.weight[:, [3, 5]] *= 20
        reference = gm(*xs)[0]
    keep = [u for u in range(FFN) if u != 5]
    grams = sink_grams(gm, [ffn], data, 16)
    weight, bias = down.weight.detach().clone(), down.bias.detach().clone()
    plain = copy.deepcopy(gm)
    remove_units(
        plain,
        next(b for b in find_blocks(plain, traced_shapes(plain, xs))[0] if b.name == "layers.0"),
        keep,
    )
    remove_units(gm, ffn, keep)
    _assign(down, fit_kept(weight, bias, grams[ffn.sink], unit_index(keep, 1)), len(keep))
    with torch.no_grad():
        refitted, sliced = gm(*xs)[0], plain(*xs)[0]
    gap = (1 - F.cosine_similarity(refitted, reference)).mean()
    lost = (1 - F.cosine_similarity(sliced, reference)).mean()
    assert gap < 0.1 * lost  # what channel 5 added now comes through channel 3


def test_reconstruction_stops_each_pass_at_the_layer_norm_it_fits(tmp_path: Path) -> None:
    """A block's fit reads the residual sum at the LayerNorm after it: the layers after that
    never run, for the pruned model or the original, and the fit still closes the gap."""
    gm, xs, data, blocks = _gm_and_data(tmp_path)
    reference = copy.deepcopy(gm)
    first = [b for b in blocks if b.name.startswith("layers.0")]
    for block in first:
        remove_units(gm, block, list(range(block.units // 2)))
    ran: list[str] = []
    for model, side in ((gm, "pruned"), (reference, "original")):
        model.get_submodule("layers.1.attention.query").register_forward_hook(
            lambda *_a, side=side: ran.append(side)
        )
    fits = correct_in_order(gm, reference, first, data, 16, None)
    assert [f["sink"] for f in fits] == ["layers.0.attention.out", "layers.0.output"]
    assert all(f["refitted"] and f["error_after"] < f["error_before"] for f in fits)
    assert ran == []  # layer 1 ran for neither model
    with torch.no_grad():  # and the model still runs whole afterwards
        assert gm(*xs)[0].shape == reference(*xs)[0].shape
    assert ran == ["pruned", "original"]


@pytest.mark.slow  # kept out of the fast set (< 2 min on 2 cores)
def test_reconstruction_refits_every_projection_against_the_original(tmp_path: Path) -> None:
    model, pt2, npz = _export(tmp_path)
    gm, _ = load_lifted(pt2)
    assert downstream_norm(gm, "layers.0.attention.out") == "layers.0.attention_norm"
    assert downstream_norm(gm, "layers.1.output") == "layers.1.output_norm"
    assert downstream_norm(gm, "layers.1.intermediate") is None  # GELU is in the way
    results = {}
    for refit in (False, True):
        result = compress(
            pt2,
            [
                {
                    "op": "prune",
                    "granularity": "channels",
                    "sparsity": 0.5,
                    "criterion": "activation",
                    "reconstruct": refit,
                    "scope": "layer",
                }
            ],
            dataset_path=npz,
            evaluation_task="embedding",
            workdir=tmp_path / f"w{refit}",
        )
        results[refit] = result
        assert result["steps"][0]["details"]["reconstruct"] is refit
    rounds = results[True]["steps"][0]["details"]["rounds"]
    fits = rounds[0]["reconstruction"]
    # in graph order, each against the residual sum of the LayerNorm after it
    assert [f["sink"] for f in fits] == [
        "layers.0.attention.out",
        "layers.0.output",
        "layers.1.attention.out",
        "layers.1.output",
    ]
    assert fits[0]["target"] == "layers.0.attention_norm input"
    # every block lost units: each fit lowers its gap, the later ones also repair the drift
    assert all(f["refitted"] and f["error_after"] < 0.95 * f["error_before"] for f in fits)
    assert "reconstruction" not in results[False]["steps"][0]["details"]["rounds"][0]
    # held-out sentences: the refitted model is closer to the original
    data = _sentences(64, 11)
    with torch.no_grad():
        reference = model(*(torch.from_numpy(data[k]) for k in ("input_ids", "attention_mask")))
    cosine = {
        refit: _cosine(_run_onnx(r["artifacts"][0]["path"], data), reference.numpy())
        for refit, r in results.items()
    }
    assert cosine[True] > cosine[False] + 0.01


def test_allocation_is_the_least_error_that_removes_the_budget() -> None:
    """The dynamic programme against brute force over every combination of keep counts."""
    import itertools

    rng = np.random.default_rng(3)
    for _ in range(20):
        units = [int(u) for u in rng.integers(3, 6, size=4)]
        costs = [int(c) for c in rng.integers(1, 50, size=4)]
        errors = []
        for n in units:
            rises = np.cumsum(rng.random(n))  # error grows with every unit cut
            errors.append({n: 0.0, **{n - j: float(rises[j - 1]) for j in range(1, n)}})
        most = sum(c * (n - 1) for c, n in zip(costs, units, strict=True))
        budget = float(rng.uniform(0.2, 0.6) * most)
        chosen = allocate(errors, costs, units, budget)
        removed = sum(c * (n - k) for c, n, k in zip(costs, units, chosen, strict=True))
        assert removed >= budget * (1 - 1e-9)
        best = min(
            sum(e[k] for e, k in zip(errors, combo, strict=True))
            for combo in itertools.product(*(list(e) for e in errors))
            if sum(c * (n - k) for c, n, k in zip(costs, units, combo, strict=True)) >= budget
        )
        # exact up to the budget's 1/BINS discretisation, which can only remove more
        assert sum(e[k] for e, k in zip(errors, chosen, strict=True)) <= best + 1e-9
    assert allocate([{4: 0.0, 3: 1.0}], [10], [4], 0.0) == [4]
    assert allocate([{4: 0.0, 3: 1.0}], [10], [4], 1e6) == [3]  # out of reach: the largest cut


def test_probing_a_block_measures_what_removing_its_units_does(tmp_path: Path) -> None:
    gm, xs, data, blocks = _gm_and_data(tmp_path)
    grams = sink_grams(gm, blocks, data, 16)
    scores = [
        _contribution(b, gm.get_submodule(b.sink).weight.detach(), grams[b.sink]) for b in blocks
    ]
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    errors = sensitivities(gm, blocks, scores, grams, data, 16, 8)
    for k, v in gm.state_dict().items():  # every probe put its projection back
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    ffn = next(i for i, b in enumerate(blocks) if b.kind == "ffn" and b.name == "layers.1")
    block = blocks[ffn]
    assert probe_counts(block, 8)[0] == FFN and min(errors[ffn]) >= math.ceil(FFN * 0.2)
    assert all(c % 8 == 0 for c in errors[ffn])
    assert errors[ffn][FFN] == 0.0 and max(errors[ffn].values()) > 0.0
    heads = next(i for i, b in enumerate(blocks) if b.kind == "attention")
    assert sorted(errors[heads]) == list(range(2, HEADS + 1))  # every head count to 80 % cut
    # the probe's figure for 128 channels is the error of really removing and refitting them
    count = 128
    with torch.no_grad():
        reference = gm(*xs)[0]
    down: Any = gm.get_submodule(block.sink)
    weight, bias = down.weight.detach().clone(), down.bias.detach().clone()
    keep = sorted(torch.topk(scores[ffn], count).indices.tolist())
    remove_units(gm, block, keep)
    _assign(down, fit_kept(weight, bias, grams[block.sink], unit_index(keep, 1)), len(keep))
    with torch.no_grad():
        cut = gm(*xs)[0]
    real = float((cut.double() - reference.double()).pow(2).sum() / reference.double().pow(2).sum())
    # the probe measured on the first MEASURED_PROBE_SAMPLES sentences, which are all 48 here
    assert errors[ffn][count] == pytest.approx(real, rel=1e-3)


@pytest.mark.slow  # kept out of the fast set (< 2 min on 2 cores)
def test_measured_scope_moves_the_cut_to_where_it_costs_least(tmp_path: Path) -> None:
    model, pt2, npz = _export(tmp_path)
    with torch.no_grad():  # layer 0's FFN matters ten times more than layer 1's
        model.layers[0].output.weight *= 10
    batch = torch.export.Dim("batch", min=1, max=65536)
    example = tuple(
        torch.from_numpy(v[:4])
        for v in (_sentences(4, 1)["input_ids"], _sentences(4, 1)["attention_mask"])
    )
    torch.export.save(
        torch.export.export(model, example, dynamic_shapes=({0: batch}, {0: batch})), pt2
    )
    results = {}
    for scope in ("layer", "measured"):
        results[scope] = compress(
            pt2,
            [{"op": "prune", "granularity": "channels", "sparsity": 0.3, "scope": scope}],
            dataset_path=npz,
            evaluation_task="embedding",
            workdir=tmp_path / scope,
        )
    layer, measured = results["layer"], results["measured"]
    # at least as many weights removed as 30 % of every block, with less damage
    assert measured["final"]["params"] <= layer["final"]["params"]
    assert measured["final"]["cosine_similarity"] > layer["final"]["cosine_similarity"]
    details = measured["steps"][0]["details"]
    allocation = {e["name"]: e for e in details["allocation"]}
    assert allocation["layers.0"]["keep"] > allocation["layers.0"]["uniform_keep"]
    assert all(e["errors"][str(e["units"])] == 0.0 for e in allocation.values())
    widths = {e["name"]: e.get("width_after") for e in details["layers"]}
    assert widths["layers.0"] == allocation["layers.0"]["keep"]


def test_measured_scope_is_for_transformer_channels() -> None:
    from engine.config import PruneConfig

    with pytest.raises(ValueError, match="only granularity 'channels'"):
        PruneConfig(granularity="unstructured", scope="measured")
    assert PruneConfig(granularity="channels", scope="measured").needs_dataset()
