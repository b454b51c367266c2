"""`scope: measured` for `prune` channels on a transformer: how many heads and FFN channels each
block keeps, chosen from the model's measured output error rather than one fraction per layer.

1. Sensitivity: each block alone is cut to a few keep counts — its lowest-scoring units removed
   (the op's criterion), the output projection refitted on the kept ones when the step
   reconstructs — and the model's output error on a subset of the job's samples is measured:
   Σ‖y − y₀‖² / Σ‖y₀‖² per output, averaged over outputs (for an L2-normalised embedding this is
   2·(1 − cosine)). Removing a unit's output-projection columns is what removing the unit does,
   so each probe only rewrites that projection in place and puts it back.
2. Allocation: the keep counts minimise the summed errors (errors of separate blocks are taken
   as additive, as in HAWQ and OBS-style layer-wise allocation) while removing at least the
   parameters that one fraction per layer would (`sparsity` of every FFN, `head_sparsity` of
   every attention layer): a multiple-choice knapsack solved exactly by dynamic programming
   over the parameters removed, in 1/400ths of the budget.

A head owns 4·d_head·d_model weights (query, key, value rows and output-projection columns), an
FFN channel 2·d_model (3·d_model with a gate), so the budget is the same number of weights the
uniform cut removes, moved to where the model misses them least.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from engine.config.prune import MEASURED_PROBE_SAMPLES, measured_probe_counts
from engine.ops.prune.reconstruct import fit_kept
from engine.torchgraph.blocks import Block, unit_index
from engine.torchgraph.program import flatten
from engine.torchgraph.train import Data

if TYPE_CHECKING:
    import torch
    from torch import fx

BINS = 400


def unit_cost(gm: fx.GraphModule, block: Block) -> int:
    """Weights one unit owns: its rows of every source Linear, its columns of the sink."""
    total = 0
    for name in block.linears:
        weight: Any = gm.get_submodule(name).weight
        other = weight.shape[0] if name == block.sink else weight.shape[1]
        total += int(other) * block.unit_sizes[name]
    return total


def probe_counts(block: Block, round_to: int | None) -> list[int]:
    """Keep counts probed for a block (engine.config.prune.measured_probe_counts)."""
    return measured_probe_counts(block.kind, block.units, round_to)


def _error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    per = [
        float((o.double() - r.double()).pow(2).sum() / r.double().pow(2).sum().clamp_min(1e-30))
        for o, r in zip(outputs, reference, strict=True)
    ]
    return sum(per) / max(len(per), 1)


def _outputs(gm: fx.GraphModule, data: Data, batch_size: int) -> list[torch.Tensor]:
    import torch

    parts: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for idx in data.batches(batch_size, None):
            outs = [o for o in flatten(gm(*[x[idx] for x in data.inputs])) if o is not None]
            parts.append([o.detach().float() for o in outs if o.is_floating_point()])
    return [torch.cat(list(group)) for group in zip(*parts, strict=True)]


def sensitivities(
    gm: fx.GraphModule,
    blocks: list[Block],
    scores: list[torch.Tensor],
    grams: dict[str, torch.Tensor],
    data: Data,
    batch_size: int,
    round_to: int | None,
    report: Any = None,
) -> list[dict[int, float]]:
    """Per block, the output error at each probed keep count (module docstring, step 1)."""
    import torch

    gm.eval()
    probe = Data([x[:MEASURED_PROBE_SAMPLES] for x in data.inputs], None, data.batch)
    reference = _outputs(gm, probe, batch_size)
    found: list[dict[int, float]] = []
    for k, (block, score) in enumerate(zip(blocks, scores, strict=True)):
        if report is not None:
            report(k, len(blocks))
        sink: Any = gm.get_submodule(block.sink)
        weight = sink.weight.detach().clone()
        bias = None if sink.bias is None else sink.bias.detach().clone()
        size = block.unit_sizes[block.sink]
        errors = {block.units: 0.0}
        try:
            for count in probe_counts(block, round_to)[1:]:
                keep = sorted(torch.topk(score, count).indices.tolist())
                cols = unit_index(keep, size)
                new_w = torch.zeros_like(weight)
                new_b = bias
                if block.sink in grams:
                    v = fit_kept(weight, bias, grams[block.sink], cols)
                    new_w[:, cols] = v[: len(cols)].T.to(weight.dtype)
                    if bias is not None:
                        new_b = v[len(cols)].to(bias.dtype)
                else:
                    new_w[:, cols] = weight[:, cols]
                with torch.no_grad():
                    sink.weight.copy_(new_w)
                    if new_b is not None:
                        sink.bias.copy_(new_b)
                errors[count] = _error(_outputs(gm, probe, batch_size), reference)
        finally:
            with torch.no_grad():
                sink.weight.copy_(weight)
                if bias is not None:
                    sink.bias.copy_(bias)
        found.append(errors)
    return found


def allocate(
    errors: list[dict[int, float]],
    costs: list[int],
    units: list[int],
    budget: float,
) -> list[int]:
    """Keep counts, one per block, that remove at least `budget` weights (each unit of block i
    costs costs[i]) with the least summed error (module docstring, step 2). When even the
    largest cuts cannot reach the budget, the largest cuts."""
    if budget <= 0:
        return list(units)
    deepest = [min(err) for err in errors]
    if sum(c * (n - k) for c, n, k in zip(costs, units, deepest, strict=True)) <= budget:
        return deepest
    step = budget / BINS
    inf = math.inf
    # best[b] = (error, choices) with b bins of the budget removed so far (capped at BINS)
    best: list[tuple[float, list[int]] | None] = [None] * (BINS + 1)
    best[0] = (0.0, [])
    for err, cost, n in zip(errors, costs, units, strict=True):
        nxt: list[tuple[float, list[int]] | None] = [None] * (BINS + 1)
        for b, entry in enumerate(best):
            if entry is None:
                continue
            for count, e in err.items():
                gained = min(BINS, b + int((n - count) * cost / step + 1e-9))
                total = entry[0] + e
                if total < (nxt[gained][0] if nxt[gained] is not None else inf):  # type: ignore[index]
                    nxt[gained] = (total, [*entry[1], count])
        best = nxt
    for entry in reversed(best):  # the fullest budget reached, BINS when it is reachable
        if entry is not None:
            return entry[1]
    return list(units)  # pragma: no cover - best[0] always survives
