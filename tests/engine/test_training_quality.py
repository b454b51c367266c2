"""Training that does not wreck a real model: the task's loss, the best-epoch rule, QAT from
post-training scales. On a small sentence-encoder-like transformer trained in the test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.examples import token_order_task
from engine.pipeline import compress
from engine.torchgraph.losses import Loss, loss_kind, loss_value, normalised_mse

SEQ, VOCAB, DIM = 16, 32, 48


def _encoder() -> Any:
    """Token + position embeddings (positions read from a `position_ids` buffer, as in BERT),
    2 post-norm blocks of 4-head self-attention and a GELU FFN, mean pooling, L2 norm."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
            self.ff1, self.ff2 = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)
            self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape

            def heads(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(b, s, 4, DIM // 4).transpose(1, 2)

            q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
            att = torch.softmax(q @ k.transpose(-1, -2) / (DIM // 4) ** 0.5, dim=-1)
            x = self.ln1(x + self.o((att @ v).transpose(1, 2).reshape(b, s, DIM)))
            return self.ln2(x + self.ff2(F.gelu(self.ff1(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(VOCAB, DIM), nn.Embedding(SEQ, DIM)
            self.register_buffer("position_ids", torch.arange(SEQ)[None])
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.tok(ids) + self.pos(self.position_ids[:, : ids.shape[1]])
            for block in self.blocks:
                x = block(x)
            return F.normalize(x.mean(1), dim=-1)

    return Encoder()


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The encoder trained (with a linear head, then dropped) on which of two tokens comes
    first, exported alone as a .pt2; 600 unlabelled sequences as its dataset."""
    import torch

    torch.manual_seed(0)
    model = _encoder()
    head = torch.nn.Linear(DIM, 2)
    x, y = token_order_task(1500, seed=0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(head(model(xt[idx]) * 8), yt[idx])
            loss.backward()
            opt.step()
    model.eval()
    out = tmp_path_factory.mktemp("encoder")
    example = (torch.from_numpy(x[:4]),)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model, example, dynamic_shapes=({0: batch},))
    torch.export.save(program, out / "encoder.pt2")
    np.savez(out / "sentences.npz", x=token_order_task(600, seed=1)[0])
    return {"pt2": out / "encoder.pt2", "npz": out / "sentences.npz"}


def _distill(encoder: dict[str, Path], workdir: Path, lr: float) -> dict[str, Any]:
    return compress(
        encoder["pt2"],
        [
            {"op": "low_rank", "rank_ratio": 0.25},
            {"op": "distill", "epochs": 3, "lr": lr, "batch_size": 32},
        ],
        dataset_path=encoder["npz"],
        evaluation_task="embedding",
        workdir=workdir,
    )


@pytest.mark.slow
def test_low_rank_then_distill_recovers_the_embedding_with_the_cosine_loss(
    encoder: dict[str, Path], tmp_path: Path
) -> None:
    result = _distill(encoder, tmp_path, lr=1e-3)
    factorized, distilled = result["steps"]
    details = distilled["details"]
    assert details["loss"] == "cosine"
    assert details["held_out"]["metric"] == "cosine_similarity"
    assert details["held_out"]["held_out"] is True
    epochs = details["epochs"]
    assert [row["epoch"] for row in epochs] == [0, 1, 2, 3]
    # epoch 0 is the step's input, scored on the held-out samples the pipeline measures
    start = epochs[0]["held_out_cosine_similarity"]
    assert start == pytest.approx(factorized["metrics"]["cosine_similarity"], abs=1e-4)
    assert start < 0.99  # the factorization really lost something
    assert details["best_epoch"] >= 1
    assert details["held_out"]["best"] > start
    assert distilled["metrics"]["cosine_similarity"] > factorized["metrics"]["cosine_similarity"]
    assert distilled["metrics"]["cosine_similarity"] == pytest.approx(
        details["held_out"]["best"], abs=1e-4
    )
    assert not any("worse" in w for w in distilled["warnings"])


@pytest.mark.slow  # kept out of the fast set (< 2 min on 2 cores)
def test_distill_that_wrecks_the_model_keeps_its_input_and_says_so(
    encoder: dict[str, Path], tmp_path: Path
) -> None:
    result = _distill(encoder, tmp_path, lr=1.0)
    factorized, distilled = result["steps"]
    details = distilled["details"]
    assert details["best_epoch"] == 0
    before = factorized["metrics"]["cosine_similarity"]
    assert distilled["metrics"]["cosine_similarity"] == before  # the input, unchanged
    (warning,) = [w for w in distilled["warnings"] if "made the result worse" in w]
    assert f"cosine {details['held_out']['start']:.3f} → " in warning
    trained = [
        r["held_out_cosine_similarity"]
        for r in details["epochs"][1:]
        if r["held_out_cosine_similarity"] is not None
    ]
    if trained:  # the figure after the best epoch (none when the loss blew up at once)
        assert f"→ {max(trained):.3f} after the best epoch" in warning
    assert "kept the step's input" in warning


@pytest.mark.slow  # kept out of the fast set (< 2 min on 2 cores)
def test_qat_int8_is_never_below_its_post_training_start(
    encoder: dict[str, Path], tmp_path: Path
) -> None:
    result = compress(
        encoder["pt2"],
        [{"op": "quantize", "mode": "qat", "epochs": 2, "batch_size": 32}],
        dataset_path=encoder["npz"],
        evaluation_task="embedding",
        workdir=tmp_path,
    )
    (step,) = result["steps"]
    qat = step["details"]["qat"]
    assert qat["loss"] == "cosine"
    assert qat["calibration_samples"] > 0  # observers calibrated before training
    ptq = qat["post_training"]["cosine_similarity"]
    assert ptq is not None and ptq > 0.9
    final = result["final"]["cosine_similarity"]
    assert final >= ptq - 1e-6
    if qat["delivered"] == "qat":
        assert qat["qat"]["cosine_similarity"] >= ptq
        assert final == pytest.approx(qat["qat"]["cosine_similarity"], abs=1e-4)
    else:
        assert final == pytest.approx(ptq, abs=1e-4)
        assert any("delivered the post-training result" in w for w in step["warnings"])
    assert [row["epoch"] for row in qat["epochs"]] == [0, 1, 2]
    assert step["details"]["calibration"]  # the delivered build is static QDQ


def test_the_loss_follows_the_task() -> None:
    import torch

    teacher = lambda x: x  # noqa: E731 - any callable marks distillation
    logits, embedding = torch.randn(8, 10), torch.randn(8, 384)
    assert loss_kind(Loss(teacher=teacher), [logits]) == "kl"
    # a [B, 384] embedding is no set of logits, whatever its shape says
    assert loss_kind(Loss(teacher=teacher, task="embedding"), [embedding]) == "cosine"
    assert loss_kind(Loss(teacher=teacher, task="generic"), [logits]) == "mse"
    assert loss_kind(Loss(), [logits]) == "cross_entropy"
    # 1 − cosine ignores the scale of the embedding
    cos = loss_value([embedding * 3], Loss(teacher=teacher, task="embedding"), None, [embedding])
    assert float(cos) == pytest.approx(0.0, abs=1e-6)
    # generic: every output counts, each relative to its own variance
    small, large = torch.randn(64, 4) * 0.01, torch.randn(64, 4) * 100
    off = normalised_mse([small * 1.1, large * 1.1], [small, large])
    assert float(off) == pytest.approx(0.01, rel=0.05)


def test_batch_norm_is_folded_into_its_conv_before_qat(tmp_path: Path) -> None:
    import torch
    from torch import nn

    from engine.ops.quantize.qat import fold_batch_norms
    from engine.torchgraph.lift import weight_layers
    from engine.torchgraph.train import load_lifted

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():  # BatchNorm statistics as training would leave them
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    gm, _ = load_lifted(tmp_path / "m.pt2")
    assert fold_batch_norms(gm) == ["1"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    assert sorted(weight_layers(gm)) == ["0", "3"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[0], model(x), atol=1e-5, rtol=1e-4)
