"""`prune` channels on a transformer: whole attention heads and FFN channels.

The blocks come from engine.torchgraph.blocks (query/key/value → heads → output projection;
up (+ gate) → activation → down). Each unit (a head, an FFN channel) is scored with the op's
criterion over all the weights it owns — its rows of every source Linear and its columns of
the sink — and the lowest-scoring ones are removed: `head_sparsity` (default `sparsity`) of each
attention layer's heads, `sparsity` of each FFN's channels (kept counts rounded down to a
multiple of `round_to`). `scope: global` ranks units across layers by their score divided by
their layer's mean score, keeping at least one head / `round_to` channels per layer. The
residual width (embeddings, LayerNorms, the model's outputs) is never changed.

Criteria: magnitude (Σ|w| or Σw² of the unit's weights), random (seeded), gradient (Σ|w·∂L/∂w|,
a classifier output), entropy (mean entropy of the unit's features as the sink reads them),
activation (E‖x_u·W_uᵀ‖², the energy of what the unit adds to the sink's output on the data: for a
head, trace(W_u G_uu W_uᵀ) with G the Gram matrix of the sink's inputs).

`scope: measured` (engine.ops.prune.allocate) cuts each block alone at several widths, measures
the model's output error, and moves the per-layer fractions' budget of removed weights to where
it costs least; with a gradual schedule it measures again before every round, on the model the
earlier rounds cut and corrected.

Reconstruction (`reconstruct`, on by default when the job has a dataset): once a round's blocks
are cut, each output projection is refitted by least squares in graph order against the
original model's residual stream (engine.ops.prune.reconstruct).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.config import PruneConfig
from engine.context import StepContext
from engine.errors import EngineError
from engine.onnxgraph.graph import matches
from engine.ops.prune.allocate import allocate, sensitivities, unit_cost
from engine.ops.prune.reconstruct import correct_in_order, sink_grams
from engine.ops.prune.scores import activation_entropy, gradient_scores
from engine.torchgraph.augment import token_mask
from engine.torchgraph.blocks import (
    Block,
    find_blocks,
    remove_units,
    traced_shapes,
)
from engine.torchgraph.train import Data

if TYPE_CHECKING:
    import torch

Train = Callable[[int, float, float, int], list[dict[str, float]]]


@dataclass
class _Kept:
    """A block's original unit count and which original units it still has."""

    kind: str
    units: int
    ids: list[int]


def _per_unit(block: Block, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum weight-shaped values over each unit's rows (sources) and columns (sink)."""
    import torch

    total = torch.zeros(block.units)
    for name in block.linears:
        per_feature = values[name].float().sum(0 if name == block.sink else 1)
        total += per_feature.reshape(block.units, block.unit_sizes[name]).sum(1)
    return total


def unit_scores(
    gm: torch.fx.GraphModule,
    blocks: list[Block],
    config: PruneConfig,
    ctx: StepContext,
    data: Data | None,
    round_: int,
    grams: dict[str, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Per block, one importance per unit (higher = keep); `grams` (sink_grams) for the
    activation criterion."""
    import torch

    if config.criterion == "random":
        gen = torch.Generator().manual_seed(ctx.seed * 1000 + round_)
        return [torch.rand(b.units, generator=gen) for b in blocks]
    layers: dict[str, Any] = {n: gm.get_submodule(n) for b in blocks for n in b.linears}
    if config.criterion == "magnitude":
        w: dict[str, torch.Tensor] = {n: m.weight.detach() for n, m in layers.items()}
        values = {n: t.abs() if config.norm == "l1" else t**2 for n, t in w.items()}
        return [_per_unit(b, values) for b in blocks]
    assert data is not None
    if config.criterion == "gradient":
        per_weight = gradient_scores(gm, layers, data, ctx, config.batch_size)  # type: ignore[arg-type]
        return [_per_unit(b, per_weight) for b in blocks]
    sinks = {b.sink: layers[b.sink] for b in blocks}
    if config.criterion == "activation":
        assert grams is not None
        return [_contribution(b, layers[b.sink].weight.detach(), grams[b.sink]) for b in blocks]
    entropy = activation_entropy(gm, sinks, data, "in", config.batch_size)  # type: ignore[arg-type]
    return [entropy[b.sink].reshape(b.units, -1).mean(1) for b in blocks]


def _contribution(block: Block, weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """E‖x_u·W_uᵀ‖² per unit: trace(W_u G_uu W_uᵀ)."""
    import torch

    size = block.unit_sizes[block.sink]
    w = weight.double()
    out = torch.zeros(block.units)
    for u in range(block.units):
        cols = slice(u * size, (u + 1) * size)
        w_u = w[:, cols]
        out[u] = float(((w_u @ gram[cols, cols]) * w_u).sum())
    return out


def reconstructs(config: PruneConfig, ctx: StepContext) -> bool:
    """PruneConfig.reconstructs for this step's samples."""
    return config.reconstructs(ctx.samples.source == "dataset")


def _keep_count(units: int, target: float, kind: str, round_to: int | None) -> int:
    keep = max(1, round(units * (1 - target)))
    if kind == "ffn" and round_to and keep >= round_to:
        keep = keep // round_to * round_to
    return keep


def _chosen(
    blocks: list[Block],
    scores: list[torch.Tensor],
    kept: dict[str, _Kept],
    targets: dict[str, float],
    config: PruneConfig,
    round_to: int | None,
    measured: dict[str, int] | None = None,
) -> list[list[int]]:
    """Per block, the (current) unit indices to keep; `measured`: this round's keep count per
    block (scope measured)."""
    import torch

    counts = [
        min(
            b.units,
            measured[b.sink]
            if measured is not None
            else _keep_count(kept[b.sink].units, targets[b.kind], b.kind, round_to),
        )
        for b in blocks
    ]
    if config.scope == "global":
        for kind in ("attention", "ffn"):
            members = [i for i, b in enumerate(blocks) if b.kind == kind]
            goal = round(sum(kept[blocks[i].sink].units for i in members) * (1 - targets[kind]))
            least = 1 if kind == "attention" else round_to or 1
            floor = {i: min(least, blocks[i].units) for i in members}
            units = {i: blocks[i].units for i in members}
            ranked = sorted(
                (float(s) / (float(scores[i].mean()) + 1e-12), i)
                for i in members
                for s in scores[i]
            )
            for _, i in ranked:
                if sum(units.values()) <= goal:
                    break
                if units[i] > floor[i]:
                    units[i] -= 1
            for i in members:
                counts[i] = min(blocks[i].units, _keep_count(units[i], 0.0, kind, round_to))
    return [sorted(torch.topk(s, k).indices.tolist()) for s, k in zip(scores, counts, strict=True)]


def prune_blocks(
    gm: torch.fx.GraphModule,
    blocks: list[Block],
    skipped: list[str],
    example: tuple[Any, ...],
    config: PruneConfig,
    ctx: StepContext,
    data: Data | None,
    train: Train,
    ramp: list[float],
    epochs: int,
) -> dict[str, Any]:
    """Remove heads and FFN channels in len(ramp) rounds, training `epochs` after each; round
    r reaches ramp[r] (0..1) of the final head and channel sparsity.

    Returns the step's details (rounds, per-layer report) and adds the summary warning.
    """
    import torch_pruning as tp

    heads_target = config.head_sparsity if config.head_sparsity is not None else config.sparsity
    chosen = [b for b in blocks if not matches([b.name, *b.linears], config.ignore)]
    if not chosen:
        raise EngineError(
            "nothing_to_prune",
            "Every attention and FFN block is excluded by 'ignore', so nothing can be pruned.",
            field="pipeline",
        )
    kept = {b.sink: _Kept(b.kind, b.units, list(range(b.units))) for b in chosen}
    refit = reconstructs(config, ctx) and data is not None
    mask = token_mask(data.inputs, [spec.name for spec in ctx.inputs]) if data else None
    reference = copy.deepcopy(gm).eval() if refit else None
    round_to = config.kept_multiple()
    macs0, params0 = tp.utils.count_ops_and_params(gm, example)
    span = 0.8 / (len(ramp) + (1 if config.fine_tune_epochs else 0))
    rounds = []
    allocation: list[dict[str, Any]] | None = None
    for r, fraction in enumerate(ramp):
        if r:
            found, _ = find_blocks(gm, traced_shapes(gm, example))
            chosen = [b for b in found if b.sink in kept]
        targets = {"ffn": config.sparsity * fraction, "attention": heads_target * fraction}
        probing = config.scope == "measured" and data is not None
        grams = (
            sink_grams(gm, chosen, data, config.batch_size, mask)
            if data is not None and (probing or config.criterion == "activation")
            else {}
        )
        scores = unit_scores(gm, chosen, config, ctx, data, r, grams)
        measured = None
        if probing and data is not None:
            measured, allocation = _measured(
                gm, chosen, scores, grams if refit else {}, kept, targets, ctx, data, config
            )
        picks = _chosen(chosen, scores, kept, targets, config, round_to, measured)
        for block, keep in zip(chosen, picks, strict=True):
            if len(keep) < block.units:
                ids = kept[block.sink].ids
                kept[block.sink].ids = [ids[i] for i in keep]
                remove_units(gm, block, keep)
        gm.eval()
        lo = 0.05 + span * r
        corrected = None
        if reference is not None and data is not None:
            corrected = correct_in_order(
                gm,
                reference,
                chosen,
                data,
                config.batch_size,
                mask,
                lambda k, n, at=lo: ctx.report(at, f"refitting output projection {k + 1}/{n}"),
            )
        macs, params = tp.utils.count_ops_and_params(gm, example)
        history = train(epochs, lo, lo + span, ctx.seed + r)
        rounds.append(
            {
                "round": r + 1,
                "target_sparsity": round(targets["ffn"], 6),
                "target_head_sparsity": round(targets["attention"], 6),
                "macs_ratio": round(macs / macs0, 6),
                "params_ratio": round(params / params0, 6),
                "training": history,
                **({"reconstruction": corrected} if corrected is not None else {}),
            }
        )
    details: dict[str, Any] = {"structure": "transformer", "rounds": rounds, "reconstruct": refit}
    if allocation is not None:
        details["allocation"] = allocation
    if config.fine_tune_epochs:
        details["fine_tune"] = train(
            config.fine_tune_epochs, 0.85 - span, 0.85, ctx.seed + len(ramp)
        )
    gm.eval()
    macs1, params1 = tp.utils.count_ops_and_params(gm, example)
    details["layers"] = [_report(b, kept[b.sink]) for b in blocks if b.sink in kept]
    details["skipped"] = skipped
    ctx.warnings.append(_summary(kept, (macs0, macs1), (params0, params1), config, blocks))
    if skipped:
        ctx.warnings.append(
            f"{len(skipped)} attention block(s) were kept whole because the rewrite cannot "
            f"follow them: {'; '.join(skipped[:3])}."
        )
    return details


def _measured(
    gm: torch.fx.GraphModule,
    blocks: list[Block],
    scores: list[torch.Tensor],
    grams: dict[str, torch.Tensor],
    kept: dict[str, _Kept],
    targets: dict[str, float],
    ctx: StepContext,
    data: Data,
    config: PruneConfig,
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """This round's keep counts per block for scope measured (engine.ops.prune.allocate): the
    weights that the round's per-layer fractions would have removed from the original, less
    what earlier rounds removed, taken where the measured output error is least; and the
    details' per-block report (the probed errors and the count chosen)."""
    round_to = config.kept_multiple()
    costs = [unit_cost(gm, b) for b in blocks]
    # per block, what the per-layer fraction keeps of the original (a block earlier rounds cut
    # deeper counts against the budget)
    uniform = [_keep_count(kept[b.sink].units, targets[b.kind], b.kind, round_to) for b in blocks]
    budget = sum(c * (b.units - k) for b, c, k in zip(blocks, costs, uniform, strict=True))
    errors = sensitivities(
        gm,
        blocks,
        scores,
        grams,
        data,
        config.batch_size,
        round_to,
        lambda k, n: ctx.report(0.03, f"measuring block {k + 1}/{n} alone at several widths"),
    )
    counts = allocate(errors, costs, [b.units for b in blocks], budget)
    report = [
        {
            "name": b.name,
            "kind": b.kind,
            "units": b.units,
            "uniform_keep": u,
            "keep": k,
            "errors": {str(c): round(e, 6) for c, e in sorted(err.items(), reverse=True)},
        }
        for b, u, k, err in zip(blocks, uniform, counts, errors, strict=True)
    ]
    return {b.sink: k for b, k in zip(blocks, counts, strict=True)}, report


def _report(block: Block, kept: _Kept) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": block.name, "kind": block.kind, "linears": block.linears}
    if block.kind == "attention":
        removed = sorted(set(range(kept.units)) - set(kept.ids))
        return {
            **entry,
            "head_dim": block.unit_sizes[block.sources[0]],
            "heads_before": kept.units,
            "heads_after": len(kept.ids),
            "heads_kept": kept.ids,
            "heads_removed": removed,
        }
    return {**entry, "width_before": kept.units, "width_after": len(kept.ids)}


def _summary(
    kept: dict[str, _Kept],
    macs: tuple[float, float],
    params: tuple[float, float],
    config: PruneConfig,
    blocks: list[Block],
) -> str:
    parts = []
    for kind, what in (("attention", "attention heads"), ("ffn", "FFN channels")):
        rows = [k for k in kept.values() if k.kind == kind]
        if rows:
            before, after = sum(k.units for k in rows), sum(len(k.ids) for k in rows)
            parts.append(f"{before - after} of {before} {what} in {len(rows)} layer(s)")
    ignored = len(blocks) - len(kept)
    return (
        f"Removed {' and '.join(parts)} ({config.criterion}): linear-layer MACs "
        f"{macs[0]:,.0f} → {macs[1]:,.0f} ({macs[1] / macs[0]:.1%}), parameters "
        f"{params[0]:,.0f} → {params[1]:,.0f} ({params[1] / params[0]:.1%}). The hidden width "
        "(embeddings, LayerNorms, residual stream, outputs) is kept"
        + (f"; {ignored} block(s) matched 'ignore' and were kept whole." if ignored else ".")
    )
