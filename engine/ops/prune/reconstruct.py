"""Least-squares reconstruction of a transformer's output projections after heads or FFN
channels are removed (`prune` `reconstruct`, engine.ops.prune.transformer).

Two fits, both closed-form ridge regressions over the real tokens of the job's data (padding,
which the pooling drops, is left out when the inputs carry an attention mask):

1. `fit_kept`, for one block: the kept inputs of its output projection (plus the bias) fitted to
   reproduce the projection's output before a removal, from the Gram matrix of its inputs
   (`sink_grams`) — what a removed unit carried that the kept ones correlate with moves onto
   them (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers"). `scope:
   measured` probes each block with it (engine.ops.prune.allocate).
2. `correct_in_order`, once all blocks of a round are cut: block by block in graph order (each
   with the earlier ones already corrected), the projection is fitted so that the residual sum
   it feeds — the input of the first LayerNorm after it, reached through adds only — matches
   the original model's on the same tokens: target = LN_in(original) − (LN_in(pruned) − own
   output). Each projection also repairs the drift that the blocks before it left in the
   residual stream, which a fit to its own old output cannot see. Where no LayerNorm follows
   through adds only, the target is the projection's original output. A fit that does not
   lower the gap (a block nothing upstream of it changed: the ridge only shrinks it) is not
   applied. Each forward pass stops at the LayerNorm (or the projection) the fit reads: the
   layers after it are not run (all-MiniLM-L6-v2, 1024 sentences: the whole prune step
   115 → 90 s, the same weights).

Ridge damping: 1 % of the mean diagonal of the Gram matrix, towards zero. (Damping towards the
weights the projection had instead — a prior that keeps a fit near the layer it refits — measured
worse on all-MiniLM-L6-v2 at 30 %: held-out cosine after the cut 0.888 against 0.940 on other
topics, so the plain ridge stays.)
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from engine.torchgraph.blocks import Block
from engine.torchgraph.train import Data

if TYPE_CHECKING:
    import torch
    from torch import fx

RIDGE = 0.01
# ops a projection's output may pass through on its way to the LayerNorm (a residual add)
_PASS = ("aten.add.Tensor", "aten.dropout.default", "aten.clone.default", "aten.alias.default")


def _rows(x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """[..., d] → [rows, d] float64, only the real tokens when `real` fits."""
    flat = x.reshape(-1, x.shape[-1]).double()
    return flat[real] if real is not None and real.numel() == flat.shape[0] else flat


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.cat([x, x.new_ones(x.shape[0], 1)], 1)


class _Enough(Exception):
    """Raised by a hook once a forward pass has produced what a fit reads: the layers after
    it are not run."""


def _run_until(model: Any, xs: list[Any]) -> None:
    """A forward pass that stops where a hook raises _Enough."""
    with contextlib.suppress(_Enough):
        model(*xs)


def _batches(data: Data, batch_size: int, mask: int | None) -> Any:
    """(inputs, real-token flags or None) per batch, in order."""
    for idx in data.batches(batch_size, None):
        real = None if mask is None else data.inputs[mask][idx].reshape(-1) != 0
        yield [x[idx] for x in data.inputs], real


def sink_grams(
    gm: fx.GraphModule,
    blocks: list[Block],
    data: Data,
    batch_size: int,
    mask: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per block's output projection, the mean Gram matrix [x, 1]ᵀ[x, 1] / rows of its inputs
    (float64); the last row/column is the bias's constant input."""
    import torch

    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    real: list[torch.Tensor | None] = [None]

    def hook(args: Any, name: str) -> None:
        x = _with_ones(_rows(args[0].detach(), real[0]))
        sums[name] = sums.get(name, 0) + x.T @ x
        rows[name] = rows.get(name, 0) + x.shape[0]

    hooks = [
        gm.get_submodule(b.sink).register_forward_pre_hook(
            lambda _m, args, name=b.sink: hook(args, name)
        )
        for b in blocks
    ]
    try:
        gm.eval()
        with torch.no_grad():
            for xs, real[0] in _batches(data, batch_size, mask):
                gm(*xs)
    finally:
        for h in hooks:
            h.remove()
    return {n: sums[n] / max(rows[n], 1) for n in sums}


def _solve(gram: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """(G + λ·mean(diag G)·I)⁻¹ C."""
    import torch

    damp = RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.solve(gram + damp, cross)


def _assign(sink: Any, v: torch.Tensor, inputs: int) -> None:
    """Set the Linear's weight (and bias, the last row of v when it has one) from v."""
    from torch import nn

    dtype = sink.weight.dtype
    sink.weight = nn.Parameter(v[:inputs].T.contiguous().to(dtype))
    if sink.bias is not None:
        sink.bias = nn.Parameter(v[inputs].contiguous().to(dtype))


def fit_kept(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gram: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """The ridge fit of [x_K, 1]·V to the old [x, 1]·[W, b]ᵀ from the inputs' Gram matrix:
    V is [len(cols) (+1 for the bias), out]; without a bias the constant column is left out
    (the fit cannot move the mean)."""
    import torch

    d = weight.shape[1]
    old = weight.double()
    if bias is not None:
        old = torch.cat([old, bias.double()[:, None]], 1)
        keep, rows = torch.cat([cols, torch.tensor([d])]), torch.arange(d + 1)
    else:
        keep, rows = cols, torch.arange(d)
    return _solve(gram[keep][:, keep], gram[keep][:, rows] @ old.T)


def downstream_norm(gm: fx.GraphModule, sink: str) -> str | None:
    """The first LayerNorm module the sink's output reaches through residual adds (and
    inference no-ops) only, or None."""
    from torch import nn

    modules = dict(gm.named_modules())
    start = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == sink)
    frontier, seen = list(start.users), set()
    while frontier:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.LayerNorm):
            return str(node.target)
        if node.op != "call_function" or str(node.target) not in _PASS:
            return None
        frontier.extend(node.users)
    return None


def correct_in_order(
    gm: fx.GraphModule,
    reference: fx.GraphModule,
    blocks: list[Block],
    data: Data,
    batch_size: int,
    mask: int | None,
    report: Any = None,
) -> list[dict[str, Any]]:
    """Refit each block's output projection in graph order so the residual sum it feeds matches
    the reference model's (module docstring). Returns per block {sink, target, error_before,
    error_after}: the mean squared gap to the target over the real tokens, relative to the
    target's mean square."""
    import torch

    order = {str(n.target): i for i, n in enumerate(gm.graph.nodes) if n.op == "call_module"}
    out = []
    grabbed: dict[str, torch.Tensor] = {}

    def grab(key: str, last: bool = False) -> Any:
        def save(_m: Any, args: Any, output: Any = None) -> None:
            grabbed[key] = (args[0] if output is None else output).detach()
            if last:  # the rest of the model cannot change what this fit reads
                raise _Enough

        return save

    for k, block in enumerate(sorted(blocks, key=lambda b: order.get(b.sink, 0))):
        if report is not None:
            report(k, len(blocks))
        sink: Any = gm.get_submodule(block.sink)
        norm = downstream_norm(gm, block.sink)
        grabbed.clear()
        ref_sink: Any = reference.get_submodule(block.sink)
        hooks = [
            sink.register_forward_pre_hook(grab("x")),
            sink.register_forward_hook(grab("s", last=norm is None)),
        ]
        if norm is not None:
            hooks.append(gm.get_submodule(norm).register_forward_pre_hook(grab("l", True)))
            hooks.append(reference.get_submodule(norm).register_forward_pre_hook(grab("lr", True)))
        else:
            hooks.append(ref_sink.register_forward_hook(grab("sr", True)))
        gram: torch.Tensor | Any = 0
        cross: torch.Tensor | Any = 0
        base = energy = 0.0
        try:
            gm.eval()
            reference.eval()
            with torch.no_grad():
                for xs, real in _batches(data, batch_size, mask):
                    _run_until(gm, xs)
                    _run_until(reference, xs)
                    x = _rows(grabbed["x"], real)
                    s = _rows(grabbed["s"], real)
                    if norm is not None:
                        target = _rows(grabbed["lr"], real) - (_rows(grabbed["l"], real) - s)
                    else:
                        target = _rows(grabbed["sr"], real)
                    xa = x if sink.bias is None else _with_ones(x)
                    gram = gram + xa.T @ xa
                    cross = cross + xa.T @ target
                    base += float((s - target).pow(2).sum())
                    energy += float(target.pow(2).sum())
        finally:
            for h in hooks:
                h.remove()
        v = _solve(gram, cross)
        # the fitted gap, from the same sums: ‖XV − T‖² = VᵀGV − 2VᵀC + ‖T‖²
        fitted = max(float((v * (gram @ v)).sum() - 2 * (v * cross).sum()) + energy, 0.0)
        refitted = fitted < base  # the ridge's shrinkage can cost more than an intact block gains
        if refitted:
            _assign(sink, v, sink.weight.shape[1])
        out.append(
            {
                "sink": block.sink,
                "target": f"{norm} input" if norm else "own output",
                "refitted": refitted,
                "error_before": round(base / max(energy, 1e-30), 6),
                "error_after": round((fitted if refitted else base) / max(energy, 1e-30), 6),
            }
        )
    return out
