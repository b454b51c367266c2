"""`prune` on the pipeline's torch model: every criterion, granularity and schedule.

The .pt2 is lifted to real Conv/Linear/BatchNorm modules (lift.lift_modules), scored,
pruned — zero masks for `unstructured` / `n:m`, real channel removal with Torch-Pruning's
dependency graph for `channels`, or, on a model with attention blocks, whole heads and FFN
channels (engine.ops.prune.transformer) — optionally trained between rounds and at the end,
and re-exported as a .pt2.

Criteria (scores: higher = keep; computed in engine.ops.prune.scores):
- magnitude: |w| (l1) or w² (l2); for channels, Torch-Pruning's group L1/L2 norm.
- random: uniform scores from the job's seed (the baseline the others must beat).
- gradient: first-order Taylor, Σ_batches |w ⊙ ∂L/∂w| over `samples` samples of the dataset;
  L is the cross-entropy on the labels, or without labels on the original model's top-1
  predictions (the KL to the original's outputs has a zero gradient while the model still
  equals the original, so it cannot rank weights in the first round). Channels sum their
  weights' scores.
- entropy: the Shannon entropy (bits, 32 equal-width bins between the channel's min and max
  over the dataset) of each channel's activation, global-average-pooled per sample, measured
  on `samples` samples. `channels` removes the output channels whose activations carry the
  least information; `unstructured` / `n:m` score weight w[o, i] as |w[o, i]| · H(input
  channel i), so weights reading low-information inputs go first.

Schedules: `one_shot` prunes once; `gradual` prunes in `steps` rounds to s_t = s·(1 − (1 −
t/steps)³) (Zhu & Gupta's cubic ramp) and trains `epochs_per_step` epochs after each round
(labels → cross-entropy, no labels → distillation from the original), with pruned weights held
at zero. `fine_tune_epochs` trains once more at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config import PruneConfig
from engine.context import StepContext
from engine.errors import EngineError
from engine.onnxgraph.graph import matches
from engine.ops.prune.onnx_weights import make_masks
from engine.ops.prune.scores import channel_importance, weight_scores
from engine.ops.prune.transformer import prune_blocks, reconstructs
from engine.ops.registry import register
from engine.torchgraph.blocks import Block, find_blocks, has_attention, traced_shapes
from engine.torchgraph.lift import weight_layers
from engine.torchgraph.losses import Loss
from engine.torchgraph.program import example_args, flatten, save_program
from engine.torchgraph.train import (
    Data,
    epoch_progress,
    fit,
    job_data,
    load_lifted,
    lr_for,
    recovery_loss,
)

if TYPE_CHECKING:
    import torch

    from engine.ops.prune.scores import Layer


# ----------------------------------------------------------------------------- layers


def _targets(gm: torch.fx.GraphModule, outputs: list[str], config: PruneConfig) -> dict[str, Layer]:
    """Conv/Linear layers the op may prune: not ignored, not the output layer (for channels
    never; for weights unless include_last_layer)."""

    layers = weight_layers(gm)
    if not layers:
        raise EngineError(
            "nothing_to_prune",
            "The model has no conv2d/linear layers with constant weights to prune.",
            field="pipeline",
        )
    keep_outputs = config.granularity == "channels" or not config.include_last_layer
    targets = {}
    for name, mod in layers.items():
        if keep_outputs and name in outputs:
            continue
        if matches([name], config.ignore):
            continue
        targets[name] = mod
    if not targets:
        raise EngineError(
            "nothing_to_prune",
            "Every conv/linear layer is excluded (the output layer is kept, plus 'ignore'), so "
            "nothing can be pruned.",
            field="pipeline",
        )
    return targets


# ----------------------------------------------------------------------------- schedule


def _ramp(final: float, steps: int) -> list[float]:
    """Cubic ramp of sparsity targets, one per round, ending at `final`."""
    return [final * (1 - (1 - t / steps) ** 3) for t in range(1, steps + 1)]


# ----------------------------------------------------------------------------- handler


@dataclass
class _Run:
    """One prune step's state: the model, what to prune, its data and its report."""

    gm: Any
    layers: dict[str, Layer]
    config: PruneConfig
    ctx: StepContext
    example: tuple[Any, ...]
    score_data: Data | None
    train_data: Data | None
    loss: Loss | None
    rounds: int
    epochs: int
    lr: float | None  # None when the step does not train
    blocks: tuple[list[Block], list[str]] | None = None  # attention/FFN blocks (channels)
    details: dict[str, Any] = field(default_factory=dict)

    def train(
        self, epochs: int, masks: dict[str, torch.Tensor] | None, lo: float, hi: float, seed: int
    ) -> list[dict[str, float]]:
        """`epochs` of recovery training (none without training data), progress lo..hi."""
        if not epochs or self.train_data is None or self.loss is None or self.lr is None:
            return []

        history = fit(
            self.gm,
            self.train_data,
            self.loss,
            epochs=epochs,
            lr=self.lr,
            batch_size=self.config.batch_size,
            seed=seed,
            masks=masks,
            report=epoch_progress(self.ctx.report, "training", epochs, lo, hi),
            device=self.ctx.device,
            threads=self.ctx.train_threads,
        )
        return history.epochs


@register(PruneConfig, on="torch")
def prune_torch(config: PruneConfig, model_path: Path, ctx: StepContext) -> Path:
    """Prune the pipeline's torch model (.pt2 in, .pt2 out)."""
    import torch

    gm, outputs = load_lifted(model_path)
    example = example_args(ctx)
    with torch.no_grad():
        before = gm(*example)
    found = (
        find_blocks(gm, traced_shapes(gm, example)) if config.granularity == "channels" else None
    )
    transformer = found is not None and has_attention(*found)
    config = config.resolved(transformer, ctx.samples.source == "dataset")
    needs_data = (
        config.criterion in ("gradient", "entropy", "activation")
        or config.trains()
        or config.scope == "measured"
        or (config.granularity == "channels" and reconstructs(config, ctx))
    )
    train_data = job_data(ctx) if config.trains() else None
    loss, how = recovery_loss(ctx, train_data) if train_data is not None else (None, "")
    rounds, epochs = config.rounds()
    run = _Run(
        gm=gm,
        layers=_targets(gm, outputs, config),
        config=config,
        ctx=ctx,
        example=example,
        score_data=job_data(ctx, config.samples) if needs_data else None,
        train_data=train_data,
        loss=loss,
        rounds=rounds,
        epochs=epochs,
        lr=lr_for(config.lr, gm) if config.trains() else None,
        blocks=found,
        details={
            "criterion": config.criterion,
            "scope": config.scope,
            "granularity": config.granularity,
            "schedule": config.schedule.kind,
            "rounds": [],
        },
    )
    ctx.report(0.05, f"pruning ({config.criterion}, {config.granularity})")
    if config.granularity == "channels":
        _prune_channels(run)
    else:
        _prune_weights(run)
    if config.trains():
        run.details["training"] = how
        run.details["lr"] = run.lr
        ctx.warnings.append(f"Trained with {how}.")
    with torch.no_grad():
        after = gm(*example)
    shapes = [getattr(t, "shape", None) for t in flatten(before)]
    if shapes != [getattr(t, "shape", None) for t in flatten(after)]:
        raise EngineError("prune_failed", "Pruning changed the model's output shapes.")
    ctx.details.update(run.details)
    ctx.report(0.9, "exporting")
    return save_program(
        gm, example, ctx.output, batch=ctx.batch, error_code="prune_failed", what="pruned model"
    )


def _prune_weights(run: _Run) -> None:
    """Unstructured / N:M: zero masks per round (cubic ramp), training with masks held."""
    import torch

    config, layers, ctx = run.config, run.layers, run.ctx
    params = {name: f"{name}.weight" for name in layers}
    keep = {name: torch.ones_like(mod.weight, dtype=torch.bool) for name, mod in layers.items()}
    targets = _ramp(config.sparsity, run.rounds) if config.granularity == "unstructured" else [0.0]
    span = 0.8 / (len(targets) + (1 if config.fine_tune_epochs else 0))

    def masks() -> dict[str, torch.Tensor]:
        return {params[n]: keep[n].to(layers[n].weight.dtype) for n in layers}

    for r, target in enumerate(targets):
        lo = 0.05 + span * r
        scores = weight_scores(run.gm, layers, config, ctx, run.score_data, r)  # type: ignore[arg-type]
        arrays = {}
        for name, s in scores.items():
            s = s.float().clone()
            s[~keep[name]] = -1.0  # what an earlier round pruned stays pruned
            arrays[name] = s.numpy()
        chosen = make_masks(arrays, {n: 1 for n in arrays}, config, target)
        with torch.no_grad():
            for name, mod in layers.items():
                keep[name] = torch.from_numpy(chosen[name])
                mod.weight.mul_(keep[name])
        history = run.train(run.epochs, masks(), lo, lo + span, ctx.seed + r)
        run.details["rounds"].append(
            {
                "round": r + 1,
                "target_sparsity": round(target, 6),
                "sparsity": round(_sparsity(keep), 6),
                "training": history,
            }
        )
    if config.fine_tune_epochs:
        run.details["fine_tune"] = run.train(
            config.fine_tune_epochs, masks(), 0.85 - span, 0.85, ctx.seed + len(targets)
        )
    run.details["layers"] = [
        {"name": n, "weights": int(k.numel()), "sparsity": round(1 - float(k.float().mean()), 6)}
        for n, k in keep.items()
    ]
    zeros = sum(int((~k).sum()) for k in keep.values())
    total = sum(k.numel() for k in keep.values())
    ctx.warnings.append(
        f"Pruned {zeros / total:.1%} of the weights of {len(keep)} layer(s) ({config.criterion}). "
        "Zeros keep a dense ONNX file the same size and speed; the saving shows in "
        "size_zstd_bytes (and in runtimes with sparse kernels)."
    )


def _sparsity(keep: dict[str, torch.Tensor]) -> float:
    total = sum(k.numel() for k in keep.values())
    return 1 - sum(int(k.sum()) for k in keep.values()) / total


def _round_to(
    config: PruneConfig, layers: dict[str, Layer], all_layers: dict[str, Any], warnings: list[str]
) -> int | None:
    """The kept-channel multiple to ask Torch-Pruning for, or None (with a warning) where its
    rounding would leave layers whole: a layer that would keep fewer than round_to channels,
    or any grouped convolution (RegNet, ResNeXt: 1 < groups, not depthwise), whose per-group
    kept count Torch-Pruning rounds against the whole layer's width."""
    from torch import nn

    round_to = config.kept_multiple()
    if round_to is None:
        return None
    smallest = min(int(m.weight.shape[0]) for m in layers.values())
    if smallest * (1 - config.sparsity) < round_to:
        warnings.append(
            f"round_to {round_to} was not applied: at {config.sparsity:.0%} the smallest pruned "
            f"layer ({smallest} channels) would keep fewer than {round_to}; exact ratios used."
        )
        return None
    grouped = [
        (name, m.groups)
        for name, m in all_layers.items()
        if isinstance(m, nn.Conv2d) and 1 < m.groups != m.out_channels
    ]
    if grouped:
        name, groups = grouped[0]
        warnings.append(
            f"round_to {round_to} was not applied: {name!r} is a grouped convolution ({groups} "
            "groups), and rounding would leave its channels (and those coupled to them) whole; "
            "exact ratios used."
        )
        return None
    return round_to


def _prune_channels(run: _Run) -> None:
    """Channels: Torch-Pruning removes them in `rounds` steps of the ramp, training between;
    a model with attention blocks loses whole heads and FFN channels instead."""
    import torch
    import torch_pruning as tp
    from torch import nn

    gm, config, ctx, example = run.gm, run.config, run.ctx, run.example
    assert run.blocks is not None  # prune_torch traced them for granularity channels
    blocks, skipped = run.blocks
    if has_attention(blocks, skipped):
        run.details.update(
            prune_blocks(
                gm,
                blocks,
                skipped,
                example,
                config,
                ctx,
                run.score_data,
                lambda epochs, lo, hi, seed: run.train(epochs, None, lo, hi, seed),
                _ramp(1.0, run.rounds),
                run.epochs,
            )
        )
        return
    if config.scope == "measured":
        raise EngineError(
            "invalid_pipeline",
            "scope 'measured' chooses how many attention heads and FFN channels each block of a "
            "transformer keeps, and this model has no attention block. Use scope 'layer' or "
            "'global' to prune its channels.",
            field="pipeline",
        )
    if config.head_sparsity is not None:
        raise EngineError(
            "invalid_pipeline",
            "head_sparsity is set but the model has no attention block (query/key/value Linears "
            "viewed as heads, matmul + softmax or scaled_dot_product_attention, an output "
            "Linear). Drop head_sparsity to prune channels.",
            field="pipeline",
        )
    all_layers = weight_layers(gm)
    ignored = [m for n, m in all_layers.items() if n not in run.layers]
    macs0, params0 = tp.utils.count_ops_and_params(gm, example)
    torch.manual_seed(ctx.seed)
    ramp = _ramp(config.sparsity, run.rounds)
    span = 0.8 / (run.rounds + (1 if config.fine_tune_epochs else 0))
    round_to = _round_to(config, run.layers, all_layers, ctx.warnings)
    try:
        pruner = tp.pruner.MagnitudePruner(
            gm,
            example_inputs=example if len(example) > 1 else example[0],
            importance=tp.importance.MagnitudeImportance(p=1),  # replaced per round below
            pruning_ratio=config.sparsity,
            global_pruning=config.scope == "global",
            ignored_layers=ignored,
            round_to=round_to,
            iterative_steps=run.rounds,
            iterative_pruning_ratio_scheduler=lambda ratio, steps: [0.0, *ramp],
        )
        for r in range(run.rounds):
            lo = 0.05 + span * r
            pruner.importance = channel_importance(gm, all_layers, config, ctx, run.score_data)  # type: ignore[arg-type]
            pruner.step()
            gm.eval()
            macs, params = tp.utils.count_ops_and_params(gm, example)
            history = run.train(run.epochs, None, lo, lo + span, ctx.seed + r)
            run.details["rounds"].append(
                {
                    "round": r + 1,
                    "target_sparsity": round(ramp[r], 6),
                    "macs_ratio": round(macs / macs0, 6),
                    "params_ratio": round(params / params0, 6),
                    "training": history,
                }
            )
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(
            "prune_failed",
            f"Torch-Pruning could not prune this graph ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}). Use granularity 'unstructured' or 'n:m'.",
            field="pipeline",
        ) from exc
    if config.fine_tune_epochs:
        run.details["fine_tune"] = run.train(
            config.fine_tune_epochs, None, 0.85 - span, 0.85, ctx.seed + run.rounds
        )
    gm.eval()
    macs1, params1 = tp.utils.count_ops_and_params(gm, example)
    run.details["layers"] = [
        {"name": n, "out_channels": int(m.weight.shape[0])}
        for n, m in gm.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    ctx.warnings.append(
        f"Removed channels: MACs {macs0:,.0f} → {macs1:,.0f} ({macs1 / macs0:.1%}), parameters "
        f"{params0:,} → {params1:,} ({params1 / params0:.1%}); "
        f"{len(ignored)} output/ignored layer(s) kept whole."
        + (
            f" Kept channel counts are rounded down to multiples of {round_to} (faster "
            f"CPU kernels), so more than {config.sparsity:.0%} of a layer's channels may be "
            "removed; set round_to null for the exact ratio."
            if round_to
            else ""
        )
    )
