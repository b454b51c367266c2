"""`low_rank` on the torch model (.pt2): truncated-SVD factorization of Linear and Conv2d layers.

The .pt2 is lifted into real nn modules (structured.lift_modules). A Linear in→out with weight
W ≈ U_r S_r V_rᵀ becomes Linear(in→r, weight √S_r V_rᵀ, no bias) then Linear(r→out, weight
U_r √S_r, the original bias). A Conv2d (groups 1, k×k) is factorized through its weight
reshaped to [out, in·k·k]: a k×k conv with r filters (same stride/padding/dilation) followed by
a 1×1 conv to the original outputs. The result is re-exported as .pt2; the pipeline converts it
to ONNX and measures params, MACs, latency and accuracy (no fine-tuning here: add a fine_tune
step after this one to recover accuracy).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.config import LowRankConfig
from engine.context import StepContext
from engine.errors import EngineError
from engine.onnxgraph.graph import matches
from engine.ops.registry import register
from engine.torchgraph.lift import weight_layers
from engine.torchgraph.program import example_args, flatten, save_program
from engine.torchgraph.train import load_lifted

if TYPE_CHECKING:
    from torch import nn


def choose_rank(singular: np.ndarray, config: LowRankConfig) -> int:
    """r from rank_ratio·min(out, in·k·k), or the smallest r keeping `energy` of Σσ²."""
    full = len(singular)
    if config.rank_ratio is not None:
        return max(1, min(full, int(round(config.rank_ratio * full))))
    energy = np.cumsum(singular.astype(np.float64) ** 2)
    total = energy[-1] if len(energy) and energy[-1] > 0 else 1.0
    target = float(config.energy if config.energy is not None else 0.9)
    return min(full, int(np.searchsorted(energy / total, target - 1e-12)) + 1)


def _factorize(module: nn.Module, rank: int, u: Any, s: Any, vh: Any) -> nn.Module:
    """Two modules computing the rank-`rank` approximation of `module`."""
    import torch
    from torch import nn

    root = torch.sqrt(s[:rank])
    first_w = (root[:, None] * vh[:rank]).float()  # [r, in·k·k]
    second_w = (u[:, :rank] * root[None, :]).float()  # [out, r]
    bias = getattr(module, "bias", None)
    if isinstance(module, nn.Linear):
        first: nn.Module = nn.Linear(module.in_features, rank, bias=False)
        second: nn.Module = nn.Linear(rank, module.out_features, bias=bias is not None)
        first.weight = nn.Parameter(first_w.contiguous())
        second.weight = nn.Parameter(second_w.contiguous())
    else:
        assert isinstance(module, nn.Conv2d)
        kh, kw = module.kernel_size
        conv: Any = module  # stride/padding/dilation are 2-tuples on a Conv2d
        first = nn.Conv2d(
            module.in_channels,
            rank,
            (kh, kw),
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=False,
            padding_mode=module.padding_mode,
        )
        second = nn.Conv2d(rank, module.out_channels, 1, bias=bias is not None)
        first.weight = nn.Parameter(first_w.reshape(rank, module.in_channels, kh, kw).contiguous())
        second.weight = nn.Parameter(second_w.reshape(module.out_channels, rank, 1, 1).contiguous())
    if bias is not None:
        second.bias = nn.Parameter(bias.detach().clone())
    return nn.Sequential(first, second)


def _params(module: nn.Module) -> int:
    return sum(int(p.numel()) for p in module.parameters())


@register(LowRankConfig, on="torch")
def low_rank_torch(config: LowRankConfig, model_path: Path, ctx: StepContext) -> Path:
    import torch
    from torch import nn

    ctx.report(0.05, "lifting conv/linear layers")
    gm, output_layers = load_lifted(model_path)
    layers = weight_layers(gm)
    if not layers:
        raise EngineError(
            "nothing_to_factorize",
            "The model has no conv2d/linear layers with constant weights to factorize.",
            field="pipeline",
        )
    example = example_args(ctx)
    with torch.no_grad():
        before = flatten(gm(*example))
    report: dict[str, dict[str, Any]] = {}
    replaced = 0
    params_before = sum(_params(m) for m in layers.values())
    for n, (name, mod) in enumerate(layers.items()):
        ctx.report(0.1 + 0.6 * n / len(layers), f"SVD of {name}")
        entry: dict[str, Any] = {"type": type(mod).__name__, "params_before": _params(mod)}
        report[name] = entry
        if name in output_layers and not config.include_last_layer:
            entry["skipped"] = "output layer (set include_last_layer to factorize it)"
            continue
        if matches([name], config.ignore):
            entry["skipped"] = "matched 'ignore'"
            continue
        if isinstance(mod, nn.Conv2d) and mod.groups != 1:
            entry["skipped"] = f"grouped conv (groups={mod.groups})"
            continue
        weight = mod.weight.detach().double()
        out_dim, inner = weight.shape[0], int(weight[0].numel())
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(weight.reshape(out_dim, inner), full_matrices=False)
        singular = s.numpy()
        rank = choose_rank(singular, config)
        total = float((singular**2).sum()) or 1.0
        entry.update(
            rank=rank,
            max_rank=len(singular),
            kept_energy=round(float((singular[:rank] ** 2).sum()) / total, 6),
        )
        if rank * (inner + out_dim) >= inner * out_dim:
            entry["skipped"] = (
                f"no saving: rank {rank} × (in {inner} + out {out_dim}) ≥ {inner} × {out_dim}"
            )
            continue
        new = _factorize(mod, rank, u, s, vh)
        _set_submodule(gm, name, new)
        entry["params_after"] = _params(new)
        replaced += 1
    for entry in report.values():
        entry.setdefault("params_after", entry["params_before"])
    params_after = sum(int(e["params_after"]) for e in report.values())
    ctx.details.update(
        {
            "criterion": (
                f"rank_ratio {config.rank_ratio}"
                if config.rank_ratio is not None
                else f"energy {config.energy}"
            ),
            "layers": report,
            "factorized": replaced,
            "layer_params_before": params_before,
            "layer_params_after": params_after,
        }
    )
    if not replaced:
        ctx.warnings.append(
            "low_rank factorized no layer: every eligible layer would need a rank with no "
            "parameter saving (or is excluded); the model is unchanged."
        )
    gm.recompile()
    with torch.no_grad():
        after = flatten(gm(*example))
    errors = [
        float((a - b).abs().max())
        for a, b in zip(before, after, strict=True)
        if a.is_floating_point()
    ]
    if errors:
        ctx.details["max_abs_output_change"] = round(max(errors), 6)
    ctx.report(0.8, "exporting")
    save_program(
        gm,
        example,
        ctx.output,
        batch=ctx.batch,
        error_code="low_rank_failed",
        what="factorized model",
    )
    if replaced:
        ctx.warnings.append(
            f"Factorized {replaced} layer(s) by truncated SVD: conv/linear parameters "
            f"{params_before:,} → {params_after:,} ({params_after / params_before:.1%}). No "
            "fine-tuning was done here; add a fine_tune step after low_rank to recover accuracy."
        )
    return ctx.output


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    owner_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(owner_name), leaf, module)
