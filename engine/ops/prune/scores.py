"""Importance scores for `prune` on the torch model (higher = keep): per weight for
`unstructured` / `n:m`, per channel (a Torch-Pruning importance) for `channels`.

Criteria: magnitude (|w| or w²), random (seeded), gradient (first-order Taylor, Σ |w ⊙ ∂L/∂w|),
entropy (the information in the activations a channel reads or passes on) and activation (what a
weight or channel adds to the layer's output on the data: |w|·RMS(x) per weight, as Wanda; E[x_c²]
·‖W[:, c]‖² per input channel of every layer a channel feeds); see
engine.ops.prune.torch_model for how each is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine.config import PruneConfig
from engine.context import StepContext
from engine.errors import EngineError
from engine.torchgraph.losses import is_logits
from engine.torchgraph.train import Data, first_output, teacher_model

if TYPE_CHECKING:
    from typing import TypeAlias

    import torch
    from torch import nn

    Layer: TypeAlias = nn.Conv2d | nn.Linear

ENTROPY_BINS = 32


def gradient_scores(
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
                first_output(teacher(*(x[idx] for x in data.inputs))).argmax(1)
                for idx in data.batches(batch_size, None)
            ]
        )
    scores = {name: torch.zeros_like(mod.weight) for name, mod in layers.items()}
    gm.eval()  # BatchNorm in inference mode: score the model as it will run
    for idx in data.batches(batch_size, None):
        gm.zero_grad()
        out = first_output(gm(*(x[idx] for x in data.inputs)))
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


def entropy_bits(values: torch.Tensor) -> torch.Tensor:
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


def activation_entropy(
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

    def visit(name: str, module: Layer, x: torch.Tensor, output: torch.Tensor) -> None:
        t = output if side == "out" else x
        if isinstance(module, nn.Linear) and t.dim() > 2:  # [N, ..., C] → [N, C]
            t = t.mean(dim=tuple(range(1, t.dim() - 1)))
        pooled[name].append(_pooled(t.detach()))

    each_call(gm, layers, data, batch_size, visit)
    return {name: entropy_bits(torch.cat(parts)) for name, parts in pooled.items()}


def each_call(
    gm: torch.fx.GraphModule,
    layers: dict[str, Layer],
    data: Data,
    batch_size: int,
    visit: Callable[[str, Layer, torch.Tensor, torch.Tensor], None],
) -> None:
    """One pass over the data (inference mode, no gradients) calling visit(name, layer, input,
    output) for each call of each layer as the model computes it."""
    import torch

    hooks = [
        mod.register_forward_hook(
            lambda module, args, output, name=name: visit(
                name, module, args[0].detach(), output.detach()
            )
        )
        for name, mod in layers.items()
    ]
    try:
        gm.eval()
        with torch.no_grad():
            for idx in data.batches(batch_size, None):
                gm(*(x[idx] for x in data.inputs))
    finally:
        for h in hooks:
            h.remove()


def input_energy(
    gm: torch.fx.GraphModule, layers: dict[str, Layer], data: Data, batch_size: int
) -> dict[str, torch.Tensor]:
    """E[x_c²] of each layer's input channels over the data (every position of a conv map,
    every token of a sequence)."""
    from torch import nn

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def visit(name: str, mod: Layer, x: torch.Tensor, _output: torch.Tensor) -> None:
        rows = (
            x.transpose(0, 1).reshape(x.shape[1], -1).T
            if isinstance(mod, nn.Conv2d)
            else x.reshape(-1, x.shape[-1])
        )
        sums[name] = sums.get(name, 0) + rows.double().pow(2).sum(0)
        counts[name] = counts.get(name, 0) + rows.shape[0]

    each_call(gm, layers, data, batch_size, visit)
    return {n: (sums[n] / max(counts[n], 1)).float() for n in sums}


def _per_input_channel(mod: Layer, values: torch.Tensor) -> torch.Tensor:
    """Weight-shaped values summed into one figure per input channel of the layer."""
    import torch

    per_position = values.reshape(values.shape[0], values.shape[1], -1).sum(2)
    index = _input_channel_index(mod)
    channels = int(index.max()) + 1
    return torch.zeros(channels).scatter_add_(0, index.flatten(), per_position.flatten().float())


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
        return gradient_scores(gm, layers, data, ctx, config.batch_size)
    if config.criterion == "activation":  # Wanda: |w| × the RMS of the input it multiplies
        energy = input_energy(gm, layers, data, config.batch_size)
        scores = {}
        for name, mod in layers.items():
            w = mod.weight.detach()
            rms = energy[name].sqrt()[_input_channel_index(mod)]
            scores[name] = w.abs() * rms.reshape(*rms.shape, *([1] * (w.dim() - 2)))
        return scores
    entropy = activation_entropy(gm, layers, data, "in", config.batch_size)
    scores = {}
    for name, mod in layers.items():
        w = mod.weight.detach()
        h = entropy[name][_input_channel_index(mod)]
        scores[name] = w.abs() * h.reshape(*h.shape, *([1] * (w.dim() - 2)))
    return scores


class ChannelScores:
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


def channel_importance(
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
        per_weight = gradient_scores(gm, layers, data, ctx, config.batch_size)
        return ChannelScores(
            out_scores={layers[n]: s.flatten(1).sum(1) for n, s in per_weight.items()}
        )
    if config.criterion == "activation":  # E‖x_c · W[:, c]‖²: what a channel adds downstream
        energy = input_energy(gm, layers, data, config.batch_size)
        return ChannelScores(
            in_scores={
                mod: energy[n] * _per_input_channel(mod, mod.weight.detach() ** 2)
                for n, mod in layers.items()
            }
        )
    entropy = activation_entropy(gm, layers, data, "in", config.batch_size)
    return ChannelScores(in_scores={layers[n]: h for n, h in entropy.items()})
