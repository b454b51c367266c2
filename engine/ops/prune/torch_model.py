"""`prune` on the pipeline's torch model: every criterion, granularity and schedule.

The .pt2 is lifted to real Conv/Linear/BatchNorm modules (structured.lift_modules), scored,
pruned — zero masks for `unstructured` / `n:m`, real channel removal with Torch-Pruning's
dependency graph for `channels` — optionally trained between rounds and at the end, and
re-exported as a .pt2.

Criteria (scores: higher = keep):
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

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config import PruneConfig
from engine.context import StepContext
from engine.errors import EngineError
from engine.ops.prune.onnx_weights import make_masks
from engine.ops.registry import register
from engine.torchgraph.lift import _example_args, _export, _flat, weight_layers
from engine.torchgraph.train import (
    Data,
    Loss,
    epoch_progress,
    first,
    fit,
    is_logits,
    job_data,
    load_lifted,
    recovery_loss,
    teacher_model,
)

if TYPE_CHECKING:
    from typing import TypeAlias

    import torch
    from torch import nn

    Layer: TypeAlias = nn.Conv2d | nn.Linear

ENTROPY_BINS = 32


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
        if any(fnmatch.fnmatch(name, pat) for pat in config.ignore):
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


# ----------------------------------------------------------------------------- scores


def _gradient_scores(
    gm: torch.fx.GraphModule,
    layers: dict[str, Layer],
    data: Data,
    ctx: StepContext,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Σ over batches of |w ⊙ ∂L/∂w| per weight (Molchanov et al.'s first-order Taylor)."""
    import torch
    import torch.nn.functional as F

    labels = data.labels
    if labels is None:
        teacher = teacher_model(ctx)
        labels = torch.cat(
            [
                first(teacher(*(x[idx] for x in data.inputs))).argmax(1)
                for idx in data.batches(batch_size, None)
            ]
        )
    scores = {name: torch.zeros_like(mod.weight) for name, mod in layers.items()}
    gm.eval()  # BatchNorm in inference mode: score the model as it will run
    for idx in data.batches(batch_size, None):
        gm.zero_grad()
        out = first(gm(*(x[idx] for x in data.inputs)))
        if not is_logits(out):
            raise EngineError(
                "unsupported_op",
                "The gradient criterion needs a classifier output [batch, classes] (it scores "
                "weights by the classification loss); use magnitude or entropy.",
                field="pipeline",
            )
        F.cross_entropy(out, labels[idx], reduction="sum").backward()
        with torch.no_grad():
            for name, mod in layers.items():
                if mod.weight.grad is not None:
                    scores[name] += (mod.weight * mod.weight.grad).abs()
    gm.zero_grad()
    return scores


def _entropy(values: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each column of [N, C] values, quantized with one 32-bin grid spanning
    the whole layer's range, so a channel with small activations carries little information."""
    import torch

    out = torch.zeros(values.shape[1])
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return out  # a constant layer carries no information
    for c in range(values.shape[1]):
        counts = torch.histc(values[:, c], bins=ENTROPY_BINS, min=lo, max=hi)
        p = counts[counts > 0] / counts.sum()
        out[c] = float(-(p * p.log2()).sum())
    return out


def _pooled(t: torch.Tensor) -> torch.Tensor:
    """[N, C, ...] conv activations or [N, ..., C] linear ones → [N, C] per-sample means."""
    if t.dim() == 2:
        return t
    return t.mean(dim=tuple(range(2, t.dim())))


def _activation_entropy(
    gm: torch.fx.GraphModule,
    layers: dict[str, Layer],
    data: Data,
    side: str,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Per-channel entropy of each layer's output (side "out") or input (side "in")."""
    import torch
    from torch import nn

    pooled: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = []
    for name, mod in layers.items():

        def hook(module: Any, args: Any, output: Any, name: str = name) -> None:
            t = output if side == "out" else args[0]
            if isinstance(module, nn.Linear) and t.dim() > 2:  # [N, ..., C] → [N, C]
                t = t.mean(dim=tuple(range(1, t.dim() - 1)))
            pooled[name].append(_pooled(t.detach()))

        hooks.append(mod.register_forward_hook(hook))
    try:
        gm.eval()
        with torch.no_grad():
            for idx in data.batches(batch_size, None):
                gm(*(x[idx] for x in data.inputs))
    finally:
        for h in hooks:
            h.remove()
    return {name: _entropy(torch.cat(parts)) for name, parts in pooled.items()}


def _input_channel_index(mod: Layer) -> torch.Tensor:
    """For every [out, in/groups] weight position, the input channel it reads."""
    import torch
    from torch import nn

    w = mod.weight
    out_ch, in_per_group = w.shape[0], w.shape[1]
    groups = mod.groups if isinstance(mod, nn.Conv2d) else 1
    group_of_out = torch.arange(out_ch) // (out_ch // groups)
    return group_of_out[:, None] * in_per_group + torch.arange(in_per_group)[None, :]


def weight_scores(
    gm: torch.fx.GraphModule,
    layers: dict[str, Layer],
    config: PruneConfig,
    ctx: StepContext,
    data: Data,
    round_: int,
) -> dict[str, torch.Tensor]:
    """Per-weight importance of each layer (same shape as its weight); higher = keep."""
    import torch

    if config.criterion == "magnitude":
        return {
            n: (m.weight.detach().abs() if config.norm == "l1" else m.weight.detach() ** 2)
            for n, m in layers.items()
        }
    if config.criterion == "random":
        gen = torch.Generator().manual_seed(ctx.seed * 1000 + round_)
        return {n: torch.rand(m.weight.shape, generator=gen) for n, m in layers.items()}
    if config.criterion == "gradient":
        return _gradient_scores(gm, layers, data, ctx, config.batch_size)
    entropy = _activation_entropy(gm, layers, data, "in", config.batch_size)
    scores = {}
    for name, mod in layers.items():
        w = mod.weight.detach()
        h = entropy[name][_input_channel_index(mod)]
        scores[name] = w.abs() * h.reshape(*h.shape, *([1] * (w.dim() - 2)))
    return scores


class _ChannelScores:
    """A Torch-Pruning importance from precomputed per-channel scores.

    `out_scores` score a Conv/Linear layer's output channels (gradient); `in_scores` score the
    input channels of the layers that consume a channel (entropy: the activation a channel
    actually passes on, after its BatchNorm and nonlinearity). A group's channel importance is
    the mean over the scored layers it touches, divided by the group's mean (Torch-Pruning's
    default normalisation), so global pruning compares channels across layers on one scale.
    """

    def __init__(
        self,
        out_scores: dict[Layer, torch.Tensor] | None = None,
        in_scores: dict[Layer, torch.Tensor] | None = None,
    ) -> None:
        self.out_scores = out_scores or {}
        self.in_scores = in_scores or {}

    def __call__(self, group: Any) -> torch.Tensor | None:
        import torch
        import torch_pruning as tp

        outs = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
        ins = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
        total: torch.Tensor | None = None
        hits: torch.Tensor | None = None
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if dep.handler in outs and layer in self.out_scores:
                values = self.out_scores[layer][list(idxs)]
            elif dep.handler in ins and layer in self.in_scores:
                values = self.in_scores[layer][list(idxs)]
            else:
                continue
            root = torch.tensor(group[i].root_idxs)
            if total is None or hits is None:
                size = len(group[0].root_idxs)
                total, hits = torch.zeros(size), torch.zeros(size)
            total.scatter_add_(0, root, values.float())
            hits.scatter_add_(0, root, torch.ones(len(root)))
        if total is None or hits is None:
            return None
        total = total / hits.clamp(min=1)
        return total / (total.mean() + 1e-12)


def _channel_importance(
    gm: torch.fx.GraphModule,
    layers: dict[str, Layer],
    config: PruneConfig,
    ctx: StepContext,
    data: Data,
) -> Any:
    import torch_pruning as tp

    if config.criterion == "random":
        return tp.importance.RandomImportance()
    if config.criterion == "magnitude":
        return tp.importance.MagnitudeImportance(p=1 if config.norm == "l1" else 2)
    # Every conv/linear is scored: Torch-Pruning couples layers (e.g. a residual add), and a
    # coupled layer's scores count for the group even if it is not itself a target.
    if config.criterion == "gradient":
        per_weight = _gradient_scores(gm, layers, data, ctx, config.batch_size)
        return _ChannelScores(
            out_scores={layers[n]: s.flatten(1).sum(1) for n, s in per_weight.items()}
        )
    entropy = _activation_entropy(gm, layers, data, "in", config.batch_size)
    return _ChannelScores(in_scores={layers[n]: h for n, h in entropy.items()})


# ----------------------------------------------------------------------------- schedule


def _ramp(final: float, steps: int) -> list[float]:
    """Cubic ramp of sparsity targets, one per round, ending at `final`."""
    return [final * (1 - (1 - t / steps) ** 3) for t in range(1, steps + 1)]


def _rounds(config: PruneConfig) -> tuple[int, int]:
    if config.schedule.kind == "gradual":
        return config.schedule.steps, config.schedule.epochs_per_step
    return 1, 0


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
    details: dict[str, Any] = field(default_factory=dict)

    def train(
        self, epochs: int, masks: dict[str, torch.Tensor] | None, lo: float, hi: float, seed: int
    ) -> list[dict[str, float]]:
        """`epochs` of recovery training (none without training data), progress lo..hi."""
        if not epochs or self.train_data is None or self.loss is None:
            return []

        history = fit(
            self.gm,
            self.train_data,
            self.loss,
            epochs=epochs,
            lr=self.config.lr,
            batch_size=self.config.batch_size,
            seed=seed,
            masks=masks,
            report=epoch_progress(self.ctx.report, "training", epochs, lo, hi),
        )
        return history.epochs


@register(PruneConfig, on="torch")
def prune_torch(config: PruneConfig, model_path: Path, ctx: StepContext) -> Path:
    """Prune the pipeline's torch model (.pt2 in, .pt2 out)."""
    import torch

    gm, outputs = load_lifted(model_path)
    example = _example_args(ctx)
    with torch.no_grad():
        before = gm(*example)
    needs_data = config.criterion in ("gradient", "entropy") or config.trains()
    train_data = job_data(ctx) if config.trains() else None
    loss, how = recovery_loss(ctx, train_data) if train_data is not None else (None, "")
    rounds, epochs = _rounds(config)
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
        details={
            "criterion": config.criterion,
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
        ctx.warnings.append(f"Trained with {how}.")
    with torch.no_grad():
        after = gm(*example)
    shapes = [getattr(t, "shape", None) for t in _flat(before)]
    if shapes != [getattr(t, "shape", None) for t in _flat(after)]:
        raise EngineError("prune_failed", "Pruning changed the model's output shapes.")
    ctx.details.update(run.details)
    ctx.report(0.9, "exporting")
    return _export(gm, example, ctx)


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


def _prune_channels(run: _Run) -> None:
    """Channels: Torch-Pruning removes them in `rounds` steps of the ramp, training between."""
    import torch
    import torch_pruning as tp
    from torch import nn

    gm, config, ctx, example = run.gm, run.config, run.ctx, run.example
    all_layers = weight_layers(gm)
    ignored = [m for n, m in all_layers.items() if n not in run.layers]
    macs0, params0 = tp.utils.count_ops_and_params(gm, example)
    torch.manual_seed(ctx.seed)
    ramp = _ramp(config.sparsity, run.rounds)
    span = 0.8 / (run.rounds + (1 if config.fine_tune_epochs else 0))
    round_to = config.round_to if config.round_to and config.round_to > 1 else None
    smallest = min(int(m.weight.shape[0]) for m in run.layers.values())
    if round_to and smallest * (1 - config.sparsity) < round_to:
        # Torch-Pruning would round such a layer's kept count to 0 and then leave it whole.
        ctx.warnings.append(
            f"round_to {round_to} was not applied: at {config.sparsity:.0%} the smallest pruned "
            f"layer ({smallest} channels) would keep fewer than {round_to}; exact ratios used."
        )
        round_to = None
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
            pruner.importance = _channel_importance(gm, all_layers, config, ctx, run.score_data)  # type: ignore[arg-type]
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
