"""`low_rank` on the torch model (.pt2): truncated-SVD factorization of Linear and Conv2d layers.

The .pt2 is lifted into real nn modules (structured.lift_modules). A Linear in→out with weight
W ≈ U_r S_r V_rᵀ becomes Linear(in→r, weight √S_r V_rᵀ, no bias) then Linear(r→out, weight
U_r √S_r, the original bias). A Conv2d (groups 1, k×k) is factorized through its weight
reshaped to [out, in·k·k]: a k×k conv with r filters (same stride/padding/dilation) followed by
a 1×1 conv to the original outputs. The ranks: measured (low_rank_search, the default), or
from the singular values alone (`energy`, `rank_ratio`). The result is re-exported as .pt2;
the pipeline converts it to ONNX and measures params, MACs, latency and accuracy (no training
here: add distill or fine_tune after this step to recover accuracy).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.config import LowRankConfig
from engine.context import StepContext
from engine.errors import EngineError
from engine.onnxgraph.graph import matches
from engine.ops.low_rank_search import Factor, Search, paying_rank, search
from engine.ops.registry import register
from engine.torchgraph.lift import weight_layers
from engine.torchgraph.program import example_args, flatten, save_program
from engine.torchgraph.train import load_lifted

if TYPE_CHECKING:
    from torch import nn

# Below this share of the model's parameters saved, the step's warning says it saved little.
LITTLE_SAVING = 0.10


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
    positions = _positions(gm, layers, example)
    model_params = _params(gm)
    report, factors = _candidates(layers, output_layers, positions, config)
    ctx.report(0.1, "choosing ranks")
    if config.measured and factors:
        found = search(
            gm, factors, config, ctx, model_params, lambda f, m: ctx.report(0.1 + 0.6 * f, m)
        )
        ranks = found.ranks
        _report_search(found, report)
    else:
        found = None
        ranks = _spectral_ranks(factors, config, report)
    for f in factors:
        report[f.name]["max_rank"] = len(f.s)
        chosen = ranks.get(f.name)
        if chosen is None:
            continue
        new = _factorize(f.module, chosen, f.u, f.s, f.vh)
        _set_submodule(gm, f.name, new)
        report[f.name].update(rank=chosen, params_after=_params(new))
    for name, entry in report.items():
        entry.setdefault("params_after", entry["params_before"])
        entry["macs_after"] = entry["params_after"] * positions.get(name, 0)
    replaced = len(ranks)
    params_before = sum(int(e["params_before"]) for e in report.values())
    params_after = sum(int(e["params_after"]) for e in report.values())
    model_after = model_params - params_before + params_after
    ctx.details.update(
        {
            "criterion": (
                "measured"
                if config.measured
                else f"rank_ratio {config.rank_ratio}"
                if config.rank_ratio is not None
                else f"energy {config.energy}"
            ),
            "min_saving": config.saving(),
            "layers": report,
            "factorized": replaced,
            "layer_params_before": params_before,
            "layer_params_after": params_after,
            "layer_macs_before": sum(int(e["macs_before"]) for e in report.values()),
            "layer_macs_after": sum(int(e["macs_after"]) for e in report.values()),
            "params_before": model_params,
            "params_after": model_after,
        }
    )
    if found is not None:
        ctx.details["search"] = _search_details(found, config)
        ctx.warnings += _search_warnings(found, config, model_after, model_params)
    if not replaced:
        ctx.warnings.append(
            "low_rank factorized no layer (details.layers says why for each); the model is "
            "unchanged."
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
        saved = 1 - model_after / model_params
        text = (
            f"Factorized {replaced} layer(s) by truncated SVD: the model's parameters "
            f"{model_params:,} → {model_after:,} ({model_after / model_params:.1%})."
        )
        asked = config.max_params_ratio is not None and model_after <= (
            config.max_params_ratio * model_params
        )
        if saved < LITTLE_SAVING and not asked:  # a budget it reached is what was asked
            why = (
                "the layers that would save more cost too much fidelity or are excluded"
                if config.measured
                else "the other layers need ranks that save too little or are excluded"
            )
            text += f" That saves only {saved:.1%}: {why} (details.layers)."
        if not config.measured:
            text += " No fine-tuning was done here; add distill or fine_tune to recover accuracy."
        ctx.warnings.append(text)
    return ctx.output


def _candidates(
    layers: dict[str, Any],  # weight_layers: nn.Linear / nn.Conv2d
    output_layers: list[str],
    positions: dict[str, int],
    config: LowRankConfig,
) -> tuple[dict[str, dict[str, Any]], list[Factor]]:
    """Every layer's report entry, and the SVD of those that may be factorized."""
    import torch

    report: dict[str, dict[str, Any]] = {}
    factors: list[Factor] = []
    for name, mod in layers.items():
        weight = mod.weight.detach()
        entry: dict[str, Any] = {
            "type": type(mod).__name__,
            "shape": list(weight.shape),
            "params_before": _params(mod),
            "macs_before": _params(mod) * positions.get(name, 0),
        }
        report[name] = entry
        reason = _excluded(name, mod, output_layers, config)
        if reason is None:
            out_dim, inner = weight.shape[0], int(weight[0].numel())
            bias = entry["params_before"] - out_dim * inner
            largest = paying_rank(out_dim, inner, bias, config.saving())
            if largest < 1:
                reason = (
                    f"no rank pays: even rank 1 ({out_dim} + {inner} weights for "
                    f"{out_dim} × {inner}) {_saves_too_little(config)}"
                )
        if reason is not None:
            entry["skipped"] = reason
            continue
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(
                weight.double().reshape(weight.shape[0], -1), full_matrices=False
            )
        factors.append(Factor(name, mod, u, s, vh))
    return report, factors


def _spectral_ranks(
    factors: list[Factor], config: LowRankConfig, report: dict[str, dict[str, Any]]
) -> dict[str, int]:
    """`energy` / `rank_ratio`: each layer's rank from its singular values, where it saves."""
    ranks: dict[str, int] = {}
    for f in factors:
        rank = choose_rank(f.s.numpy(), config)
        total = float((f.s**2).sum()) or 1.0
        report[f.name].update(
            kept_energy=round(float((f.s[:rank] ** 2).sum()) / total, 6),
        )
        largest = paying_rank(f.out_dim, f.inner, f.bias, config.saving())
        if rank > largest:
            report[f.name]["rank_needed"] = rank
            report[f.name]["skipped"] = (
                f"saves too little: rank {rank} keeps {f.params_at(rank):,} of "
                f"{f.params:,} parameters: it {_saves_too_little(config)}; only ranks ≤ "
                f"{largest} do not"
            )
            continue
        ranks[f.name] = rank
    return ranks


def _saves_too_little(config: LowRankConfig) -> str:
    saving = config.saving()
    if saving > 0:
        return f"saves less than {saving:.0%} of the layer's parameters (min_saving)"
    return "saves nothing"


def _excluded(
    name: str, mod: nn.Module, output_layers: list[str], config: LowRankConfig
) -> str | None:
    """Why a layer is not a candidate at all (None: it is)."""
    from torch import nn

    if name in output_layers and not config.include_last_layer:
        return "output layer (set include_last_layer to factorize it)"
    if matches([name], config.ignore):
        return "matched 'ignore'"
    if isinstance(mod, nn.Conv2d) and mod.groups != 1:
        return f"grouped conv (groups={mod.groups})"
    return None


def _positions(gm: nn.Module, layers: dict[str, nn.Module], example: Any) -> dict[str, int]:
    """Per layer, the output positions one sample computes (tokens, pixels): MACs/params."""
    import torch

    rows = int(example[0].shape[0]) if example and example[0].dim() else 1
    found: dict[str, int] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            channels = int(output.shape[-1] if output.dim() < 4 else output.shape[1])
            found[name] = int(output.numel()) // max(1, rows * channels)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            gm(*example)
    finally:
        for h in handles:
            h.remove()
    return found


def _report_search(found: Search, report: dict[str, dict[str, Any]]) -> None:
    """Each scored layer's options (rank, params, fidelity alone) and what was chosen."""
    for name, options in found.options.items():
        entry = report[name]
        positions = entry["macs_before"] // max(1, entry["params_before"])
        entry["options"] = [
            {"rank": o.rank, "params_after": o.params, "macs_after": o.params * positions}
            | o.fidelity
            for o in options
        ]
        chosen = [o for o in options if o.rank == found.ranks.get(name)]
        if chosen:
            entry["fidelity_alone"] = chosen[0].fidelity
        else:
            entry["skipped"] = found.why_not[name]


def _search_details(found: Search, config: LowRankConfig) -> dict[str, Any]:
    target = config.goal()
    return {
        "target": target.describe() if target is not None else None,
        "target_met": found.met,
        "max_params_ratio": config.max_params_ratio,
        "samples": found.samples,
        "option_samples": found.option_samples,
        "measured_passes": found.passes,
        "seconds": found.seconds,
        "estimated_error": found.estimated,
        "measured": found.measured,
        "backed_off": found.backed_off,
    }


def _search_warnings(
    found: Search, config: LowRankConfig, model_after: int, model_params: int
) -> list[str]:
    warnings = []
    target = config.goal()
    ratio = config.max_params_ratio
    if ratio is not None and model_after > ratio * model_params:
        why = (
            f"{target.describe()} stopped it first"
            if target is not None
            else "no layer has a rank saving enough"
        )
        warnings.append(
            f"low_rank did not reach max_params_ratio {ratio}: the model keeps "
            f"{model_after / model_params:.1%} of its parameters ({why})."
        )
    return warnings


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    owner_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(owner_name), leaf, module)
