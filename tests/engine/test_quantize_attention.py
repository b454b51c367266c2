"""Static int8 and QAT on a Hugging Face BertModel with an attention mask (a small config,
random init, built in the test): the mask path stays float, the output stays close to fp32,
and QAT never delivers below its post-training start; QAT's torch simulation smooths with the
factors the ONNX build computes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from engine.io.datasets import Samples
from engine.onnxgraph.runtime import make_session
from engine.ops.quantize.attention import attention_plan, attention_softmaxes
from engine.ops.quantize.qat import smoothing_alpha, smoothing_factors
from engine.ops.quantize.smooth import smooth
from engine.pipeline import compress

SEQ, VOCAB = 16, 200
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _encoder() -> Any:
    """BertModel (2 layers, hidden 64, 4 heads) + mean pooling over the mask + L2 norm, as
    sentence-transformers runs a MiniLM. Random init made to look trained where it matters:
    sharp attention (query/key ×15: scores of ±10 and more, where BERT's init gives near-uniform
    attention that a destroyed mask would not change), attention that moves the residual
    stream (value/output ×10), and two residual channels 25× the rest (trained BERTs have
    such outlier dimensions)."""
    import torch

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    bert = transformers.BertModel(config).eval()
    with torch.no_grad():
        for layer in bert.encoder.layer:
            layer.attention.self.query.weight *= 15
            layer.attention.self.key.weight *= 15
            layer.attention.self.value.weight *= 10
            layer.attention.output.dense.weight *= 10
            layer.output.LayerNorm.weight[:2] *= 25

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return Encoder().eval()


def _sentences(n: int, seed: int) -> dict[str, np.ndarray]:
    """Token ids padded to SEQ with 4..SEQ real tokens each (padding is what the mask hides)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, size=(n, SEQ))
    lengths = rng.integers(4, SEQ + 1, size=n)
    mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int64)
    return {
        "input_ids": ids * mask,
        "attention_mask": mask,
        "token_type_ids": np.zeros((n, SEQ), np.int64),
    }


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The encoder as an ONNX file (torch.onnx, opset 17, as a team exports it) and as a .pt2
    (torch.export, dynamic batch), with 96 job sentences and 64 held-out ones."""
    import torch

    encoder = _encoder()
    out = tmp_path_factory.mktemp("bert")
    example = _sentences(4, 0)
    args = tuple(torch.from_numpy(example[k]) for k in INPUTS)
    torch.onnx.export(
        encoder,
        args,
        str(out / "bert.onnx"),
        input_names=list(INPUTS),
        output_names=["embedding"],
        dynamic_axes={**{k: {0: "batch"} for k in INPUTS}, "embedding": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(encoder, args, dynamic_shapes=({0: batch},) * 3)
    torch.export.save(program, out / "bert.pt2")
    np.savez(out / "job.npz", **_sentences(96, 1))
    np.savez(out / "held.npz", **_sentences(64, 2))
    return {
        "onnx": out / "bert.onnx",
        "pt2": out / "bert.pt2",
        "npz": out / "job.npz",
        "held": out / "held.npz",
    }


def _cosine(reference: Path, model: Path, held: Path) -> float:
    data = dict(np.load(held))
    a, b = (make_session(p).run(None, {k: data[k] for k in INPUTS})[0] for p in (reference, model))
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.mean())


def _plain_quantize_static(src: Path, dst: Path, npz: Path) -> Path:
    """What a team would call: onnxruntime's quantize_static with its defaults (QDQ)."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    data = dict(np.load(npz))

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.items = iter([{k: data[k][i : i + 16] for k in INPUTS} for i in range(0, 96, 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(str(src), str(dst), Reader())
    return dst


def test_the_attention_softmaxes_are_found(bert: dict[str, Path]) -> None:
    model = onnx.load(str(bert["onnx"]))
    assert len(attention_softmaxes(model)) == 2  # one per layer
    plan = attention_plan(model)
    assert plan is not None
    assert plan.op_types["quantized"]["MatMul"] == 12  # q, k, v, out, FFN in and out, ×2
    assert plan.op_types["kept_float"]["Softmax"] == 2
    assert "LayerNormalization" in plan.op_types["kept_float"]


def test_static_int8_keeps_the_mask_path_float_and_stays_close(
    bert: dict[str, Path], tmp_path: Path
) -> None:
    result = compress(
        bert["onnx"],
        [{"op": "quantize", "dtype": "int8"}],
        dataset_path=bert["npz"],
        evaluation_task="embedding",
        workdir=tmp_path / "job",
    )
    (step,) = result["steps"]
    assert step["details"]["attention"]["attention_softmaxes"] == 2
    delivered = Path(result["artifacts"][0]["path"])
    graph = onnx.load(str(delivered)).graph
    producer = {o: n for n in graph.node for o in n.output}
    softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == 2
    for softmax in softmaxes:
        # the masked scores reach the Softmax in float: no DequantizeLinear before it or
        # before the Add that puts the mask on
        add = producer[softmax.input[0]]
        assert add.op_type == "Add"
        for name in [softmax.input[0], *add.input]:
            assert producer.get(name) is None or producer[name].op_type != "DequantizeLinear"
    quantized = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert quantized  # the weight layers' inputs are int8
    ours = _cosine(bert["onnx"], delivered, bert["held"])
    plain = _cosine(
        bert["onnx"],
        _plain_quantize_static(bert["onnx"], tmp_path / "plain.onnx", bert["npz"]),
        bert["held"],
    )
    assert ours >= 0.99
    # the plain call quantizes the mask and the residual stream (measured: 0.997 vs 0.826)
    assert ours > plain + 0.05, (ours, plain)


@pytest.mark.slow
def test_qat_on_bert_is_never_below_its_post_training_start(
    bert: dict[str, Path], tmp_path: Path
) -> None:
    # A learning rate far too high for int8 QAT: training can only lose, and the step keeps
    # the post-training build, naming both figures.
    result = compress(
        bert["pt2"],
        [{"op": "quantize", "mode": "qat", "epochs": 1, "lr": 0.05, "batch_size": 16}],
        dataset_path=bert["npz"],
        evaluation_task="embedding",
        workdir=tmp_path,
    )
    (step,) = result["steps"]
    qat = step["details"]["qat"]
    assert step["details"]["attention"]["attention_softmaxes"] == 2
    ptq = qat["post_training"]["cosine_similarity"]
    assert ptq is not None and ptq >= 0.98  # the ONNX build's held-out figure (0.988)
    assert qat["delivered"] == "post_training"
    assert qat["best_epoch"] == 0
    assert any("delivered the post-training result" in w for w in step["warnings"])
    assert result["final"]["cosine_similarity"] >= ptq - 1e-3


def test_the_simulation_smooths_with_the_onnx_builds_factors(tmp_path: Path) -> None:
    """Two Linears reading one tensor with two outlier channels (30×): the torch factors are
    those engine.ops.quantize.smooth writes into the ONNX build (shared by both layers), and a
    Linear whose input has no outliers is not smoothed on either side."""
    import torch
    from torch import nn

    from engine.torchgraph.train import Data

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre, self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)
            with torch.no_grad():
                self.pre.weight[:2] *= 30

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.pre(x)
            return self.q(h) + self.k(h)

    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(80, 6, 16)
    torch.onnx.export(
        model,
        (x[:2],),
        str(tmp_path / "b.onnx"),
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    done = smooth(
        tmp_path / "b.onnx",
        tmp_path / "s.onnx",
        Samples({"x": x.numpy()}, None, "dataset"),
        None,
        0.75,
    )
    assert len(done) == 1 and len(done[0].matmuls) == 2  # q and k share one factor
    inv = next(
        t for t in onnx.load(str(tmp_path / "s.onnx")).graph.initializer if "smooth_inv" in t.name
    )
    expected = 1.0 / onnx.numpy_helper.to_array(inv)
    targets = {"pre": model.pre, "q": model.q, "k": model.k}
    factors = smoothing_factors(model, targets, Data([x], None, None), 0.75)
    assert sorted(factors) == ["k", "q"]
    for name in ("q", "k"):
        np.testing.assert_allclose(factors[name].numpy(), expected, rtol=1e-4)
    assert smoothing_alpha("static_int8_u8act_smoothquant0.75_mse") == 0.75
    assert smoothing_alpha("static_int8_u8act") is None
