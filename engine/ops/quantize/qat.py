"""`quantize` with `mode: "qat"`: quantization-aware training on the torch model.

1. The post-training start: the step's float model through the ONNX quantizer of the same dtype
   (static QDQ for int8/uint8, the packer for binary/ternary), scored on the held-out samples.
2. BatchNorm is folded into the preceding convs, and each Conv/Linear weight is replaced,
   through a torch parametrization, by its quantized value with a straight-through estimator
   (the forward sees quantized weights, the gradient updates the float ones): int8/uint8
   symmetric per output channel; TWN ternary α·{−1, 0, +1} with Δ = lowbit.ternary_threshold
   (0.7·mean|w|); XNOR binary α·{−1, +1} (α per output channel, rounded to float16 as the
   packed format stores it). For int8/uint8 the inputs of those layers also pass torch.ao's
   FakeQuantize, whose min/max observers are calibrated on the data before any training step
   and then frozen: training starts from the post-training scales. When the post-training
   build chose SmoothQuant, the Linears get the same factors (input ÷ s before its
   FakeQuantize, weight quantized as W·diag(s)), so the simulation computes what that build
   computes; on a graph with attention the build quantizes the same tensors as the simulation
   (engine.ops.quantize.attention).
3. The model learns the float model's outputs (distillation with the task's loss, plus the
   labels for classification) with a small learning rate decayed on a cosine; the epoch with
   the best held-out fidelity is kept (epoch 0 is the calibrated, untrained start).
4. The weights are baked onto their grid and the result goes through the same ONNX quantizer
   (static QDQ reproduces the trained grid: max|w| is unchanged), so a QAT artifact is an
   ordinary QDQ (or packed) ONNX. It is delivered only when its held-out fidelity is at least
   the post-training result's; otherwise the post-training result is, and a warning says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config import QuantizeConfig
from engine.context import StepContext
from engine.errors import EngineError
from engine.onnxgraph.convert import pt2_to_onnx
from engine.onnxgraph.graph import matches
from engine.onnxgraph.runtime import make_session, run_all
from engine.ops.quantize.lowbit import ternary_threshold
from engine.ops.quantize.smooth import OUTLIER_RATIO, SMOOTH_SAMPLES
from engine.ops.registry import handler_for, register
from engine.torchgraph.fidelity import (
    Holdout,
    fidelity_change,
    fidelity_figure,
    format_fidelity,
    history_details,
    holdout_check,
)
from engine.torchgraph.lift import weight_layers
from engine.torchgraph.losses import Loss, describe_loss, loss_name
from engine.torchgraph.program import example_args, flatten, save_program
from engine.torchgraph.train import Data, epoch_progress, fit, frozen, job_data, load_lifted

if TYPE_CHECKING:
    import torch
    from torch import nn

CALIBRATION_BATCH = 64
DEFAULT_LR = {"int8": 1e-4, "uint8": 1e-4, "binary": 1e-3, "ternary": 1e-3}
# int8 QAT of a graph with attention (a pretrained transformer) when `lr` is unset. On
# all-MiniLM-L6-v2 (512 prose sentences, 2 epochs, the job's held-out share) 1e-5 took the
# ONNX build from 0.99757 post-training to 0.99799; at 1e-4 no epoch beat the start.
ATTENTION_INT8_LR = 1e-5
Report = Callable[[float, str], None]


def _per_channel(w: torch.Tensor) -> torch.Tensor:
    """|w| reduced per output channel, shaped to broadcast against w."""
    return w.abs().reshape(w.shape[0], -1)


def quantized_weight(w: torch.Tensor, dtype: str) -> torch.Tensor:
    """The value the deployed model will hold for `w` (no gradient logic here)."""
    import torch

    shape = (w.shape[0],) + (1,) * (w.dim() - 1)
    absw = _per_channel(w)
    if dtype in ("int8", "uint8"):
        scale = (absw.amax(1) / 127).clamp(min=1e-12).reshape(shape)
        return torch.clamp(torch.round(w / scale), -127, 127) * scale
    if dtype == "binary":
        alpha = absw.mean(1).half().float().reshape(shape)
        return alpha * torch.where(w >= 0, 1.0, -1.0)
    delta = ternary_threshold(absw.mean(1)).reshape(shape)
    mask = (w.abs() > delta).to(w.dtype)
    kept = mask.reshape(w.shape[0], -1)
    alpha = (absw * kept).sum(1) / kept.sum(1).clamp(min=1)
    return alpha.half().float().reshape(shape) * torch.sign(w) * mask


def _ste(dtype: str, module: nn.Module, scale: torch.Tensor | None) -> nn.Module:
    """The quantized weight with a straight-through gradient. A Linear's also carries a
    SmoothQuant factor per input channel (`scale`, ones when not smoothed): the forward
    then gives the weight the smoothed ONNX build holds, Q(W·diag(s)), and the layer's input
    hook divides its input by s before the input's FakeQuantize, as the build's `Mul` does."""
    import torch
    from torch import nn

    if scale is not None:
        factor = scale
    elif isinstance(module, nn.Linear):
        factor = torch.ones(module.in_features)
    else:
        factor = torch.ones(())

    class StraightThrough(nn.Module):
        scale: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", factor.detach().clone())

        def forward(self, w: torch.Tensor) -> torch.Tensor:
            ws = w * self.scale
            return ws + (quantized_weight(ws, dtype) - ws).detach()

    return StraightThrough()


def _smooth_scale(module: Any) -> torch.Tensor:
    return module.parametrizations.weight[0].scale  # type: ignore[no-any-return]


def _targets(gm: Any, outputs: list[str], config: QuantizeConfig) -> dict[str, Any]:
    layers = weight_layers(gm)
    keep: set[str] = set()
    if config.dtype in ("binary", "ternary") and config.keep_first_last:
        convs = [n for n, m in layers.items() if type(m).__name__ == "Conv2d"]
        keep.update(convs[:1])
        keep.update(n for n in outputs if type(layers.get(n)).__name__ == "Linear")
    keep.update(n for n in layers if matches([n], config.exclude))
    return {n: m for n, m in layers.items() if n not in keep}


def fold_batch_norms(gm: torch.fx.GraphModule) -> list[str]:
    """Fold every BatchNorm2d that follows a Conv2d (its only reader) into the conv's weight
    and bias, as the deployed graph holds them; the folded BatchNorm names."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    modules = dict(gm.named_modules())
    folded = []
    for node in list(gm.graph.nodes):
        bn = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or not node.args:
            continue
        src = node.args[0]
        conv = modules.get(str(src.target)) if getattr(src, "op", None) == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or len(src.users) != 1:
            continue
        assert bn.running_mean is not None and bn.running_var is not None
        conv.weight, conv.bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        gm.delete_submodule(str(node.target))
        folded.append(str(node.target))
    if folded:
        gm.graph.lint()
        gm.recompile()
    return folded


def _attach(
    targets: dict[str, Any], dtype: str, smoothing: dict[str, torch.Tensor] | None = None
) -> list[Any]:
    """Quantized weights (STE) on every target, smoothed by `smoothing` (SmoothQuant factors
    by layer name); for int8/uint8 an input FakeQuantize with a min/max observer, not yet
    calibrated. Returns the forward hooks to remove later."""
    import torch
    from torch.ao.quantization import FakeQuantize, MinMaxObserver
    from torch.nn.utils import parametrize

    hooks = []
    for name, module in targets.items():
        scale = (smoothing or {}).get(name)
        parametrize.register_parametrization(module, "weight", _ste(dtype, module, scale))
        if dtype in ("int8", "uint8"):
            fq = FakeQuantize(
                observer=MinMaxObserver,
                quant_min=-128,
                quant_max=127,
                dtype=torch.qint8,
                qscheme=torch.per_tensor_affine,
            )
            module.add_module("input_fake_quant", fq)
            hooks.append(
                module.register_forward_pre_hook(
                    lambda m, args: (m.input_fake_quant(args[0] / _smooth_scale(m)),)
                )
            )
    return hooks


def smoothing_factors(
    gm: nn.Module, targets: dict[str, Any], data: Data, alpha: float
) -> dict[str, torch.Tensor]:
    """The Linear layers' SmoothQuant factors, as the ONNX build computes them for the same
    strength (engine.ops.quantize.smooth: per input channel s = max|x|^α / max|W|^(1-α), the
    weight maximum over the layers that read the same input, only where the input's largest
    channel is OUTLIER_RATIO× its median), from the float model's inputs on up to
    SMOOTH_SAMPLES samples. Layers reading 2-D inputs are left alone (they export as Gemm,
    which the build does not smooth). Measured on the float model (before `_attach`)."""
    import torch
    from torch import nn

    linears: dict[str, Any] = {n: m for n, m in targets.items() if isinstance(m, nn.Linear)}
    peaks: dict[str, torch.Tensor] = {}
    # each layer's input in the first batch, held so that no other tensor takes its memory:
    # layers whose inputs are the same tensor share one factor, as the build's Mul
    first: dict[str, torch.Tensor] = {}

    def observe(name: str) -> Any:
        def hook(m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if x.dim() < 3:
                return
            peak = x.detach().abs().reshape(-1, x.shape[-1]).amax(0)
            peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak
            first.setdefault(name, x)

        return hook

    hooks = [m.register_forward_pre_hook(observe(n)) for n, m in linears.items()]
    seen = 0
    gm.eval()
    with torch.no_grad():
        for idx in data.batches(CALIBRATION_BATCH, None):
            if seen >= SMOOTH_SAMPLES:
                break
            gm(*[x[idx] for x in data.inputs])
            seen += len(idx)
    for h in hooks:
        h.remove()
    groups: dict[int, list[str]] = {}
    for name, x in first.items():
        groups.setdefault(id(x), []).append(name)
    first.clear()
    factors: dict[str, torch.Tensor] = {}
    for names in groups.values():
        peak = peaks[names[0]]
        if float(peak.max() / torch.quantile(peak, 0.5).clamp(min=1e-12)) < OUTLIER_RATIO:
            continue
        with torch.no_grad():
            w_peak = torch.stack([linears[n].weight.abs().amax(0) for n in names]).amax(0)
            scale = (peak.clamp(min=1e-5) ** alpha / w_peak.clamp(min=1e-5) ** (1 - alpha)).clamp(
                1e-2, 1e2
            )
        factors.update(dict.fromkeys(names, scale))
    return factors


def calibrate(gm: nn.Module, targets: dict[str, Any], data: Data, limit: int) -> int:
    """Observe the layer inputs' min/max on up to `limit` samples (fake quantization off), then
    quantize with those post-training scales, frozen. The number of samples observed."""
    import torch

    quantizers = [m.input_fake_quant for m in targets.values() if hasattr(m, "input_fake_quant")]
    if not quantizers:
        return 0
    for fq in quantizers:
        fq.disable_fake_quant()
        fq.enable_observer()
    seen = 0
    gm.eval()
    with torch.no_grad():
        for idx in data.batches(CALIBRATION_BATCH, None):
            if seen >= limit:
                break
            gm(*[x[idx] for x in data.inputs])
            seen += len(idx)
    for fq in quantizers:
        fq.enable_fake_quant()
        fq.disable_observer()
    return seen


def _bake(targets: dict[str, Any], hooks: list[Any]) -> None:
    """Bake the quantized weight values in and drop the training-only parts."""
    import torch
    from torch.nn.utils import parametrize

    for h in hooks:
        h.remove()
    for module in targets.values():
        scale = _smooth_scale(module).clone()
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        with torch.no_grad():  # Q(W·diag(s)) back to the float model's W: the build smooths
            module.weight.div_(scale)
        if hasattr(module, "input_fake_quant"):
            del module.input_fake_quant


@dataclasses.dataclass
class _Built:
    """An ONNX quantizer run: its file, its own context (details, warnings, extras), its score."""

    path: Path
    ctx: StepContext
    score: float | None


def _quantize_onnx(
    config: QuantizeConfig,
    onnx_path: Path,
    ctx: StepContext,
    name: str,
    holdout: Holdout | None,
    report: Report,
) -> _Built:
    """The same dtype through the ONNX quantizer (static QDQ for int8/uint8, the packer for
    binary/ternary), in its own scratch folder, scored on the held-out samples."""
    onnx_config = config.model_copy(
        update={"mode": "static" if config.dtype in ("int8", "uint8") else None}
    )
    workdir = ctx.workdir / name
    workdir.mkdir(exist_ok=True)
    sub = dataclasses.replace(
        ctx,
        workdir=workdir,
        output=ctx.output.with_name(f"{ctx.output.stem}_{name}.onnx"),
        report=report,
        warnings=[],
        extras=[],
        metrics={},
        details={},
    )
    path = Path(handler_for(onnx_config, "onnx")(onnx_config, onnx_path, sub))
    score = None
    if holdout is not None:
        outputs = run_all(make_session(path), holdout.samples, ctx.batch)
        score = holdout.score_outputs(outputs)
    return _Built(path, sub, score)


def _deliver(chosen: _Built, dropped: _Built | None, ctx: StepContext) -> Path:
    """Hand the chosen build's file, details, warnings and extras to the step; remove the
    other's files."""
    ctx.warnings.extend(chosen.ctx.warnings)
    ctx.extras.extend(chosen.ctx.extras)
    ctx.metrics.update(chosen.ctx.metrics)
    ctx.details.update(chosen.ctx.details)
    if dropped is not None:
        for path in [dropped.path, *(p for p, _ in dropped.ctx.extras)]:
            path.unlink(missing_ok=True)
    out = ctx.output.with_suffix(".onnx")
    chosen.path.replace(out)
    for i, (path, fmt) in enumerate(ctx.extras):
        if path.stem == chosen.path.stem:
            moved = out.with_suffix(path.suffix)
            path.replace(moved)
            ctx.extras[i] = (moved, fmt)
    return out


@register(QuantizeConfig, on="torch")
def qat(config: QuantizeConfig, model_path: Path, ctx: StepContext) -> Path:
    """Post-training quantization, then training from its scales; the better one is delivered."""
    if config.mode != "qat":
        raise EngineError("unsupported_op", f"quantize mode {config.mode!r} runs on ONNX.")
    gm, outputs = load_lifted(model_path)
    folded = fold_batch_norms(gm)
    targets = _targets(gm, outputs, config)
    if not targets:
        raise EngineError(
            "nothing_to_quantize",
            "Every conv/linear layer is kept float (exclude / keep_first_last).",
            field=f"pipeline[{ctx.index}]",
        )
    holdout = holdout_check(ctx)
    ctx.report(0.02, f"post-training {config.dtype} quantization: the start QAT must beat")
    float_onnx = pt2_to_onnx(model_path, ctx.workdir / "float.onnx")
    ptq = _quantize_onnx(config, float_onnx, ctx, "ptq", holdout, _span(ctx.report, 0.02, 0.2))

    data = job_data(ctx)
    teacher_gm, _ = load_lifted(model_path)
    for p in teacher_gm.parameters():
        p.requires_grad_(False)
    loss = Loss(
        teacher=frozen(teacher_gm),
        use_labels=data.labels is not None,
        alpha=0.5,
        task=ctx.task,
    )
    name = loss_name(loss, _float_outputs(teacher_gm, data), data.labels is not None)
    how = f"distillation from the float model: {describe_loss(name, loss)}"
    # The post-training build's SmoothQuant strength, when it chose one: the simulation then
    # quantizes what that build quantizes, with the same factors.
    alpha = smoothing_alpha(ptq.ctx.details.get("chosen"))
    smoothing = smoothing_factors(gm, targets, data, alpha) if alpha is not None else {}
    hooks = _attach(targets, config.dtype, smoothing)
    calibrated = calibrate(gm, targets, data, config.calibration.samples)
    lr = config.lr if config.lr is not None else default_lr(config.dtype, ptq.ctx.details)
    ctx.report(0.22, f"quantization-aware training ({config.dtype}, {how})")
    history = fit(
        gm,
        data,
        loss,
        epochs=config.epochs,
        lr=lr,
        batch_size=config.batch_size,
        seed=ctx.seed,
        report=epoch_progress(ctx.report, "QAT", config.epochs, 0.22, 0.7),
        holdout=holdout,
        schedule="cosine",
        device=ctx.device,
        threads=ctx.train_threads,
    )
    _bake(targets, hooks)
    report: dict[str, Any] = {
        "dtype": config.dtype,
        "training": how,
        "loss": name,
        "lr": lr,
        "lr_schedule": "cosine",
        "calibration_samples": calibrated,
        "batch_norms_folded": folded,
        "smoothquant": {"alpha": alpha, "layers": len(smoothing)} if smoothing else None,
        "layers": sorted(targets),
        **history_details(history, holdout),
    }
    ctx.details["qat"] = report
    ctx.warnings.append(f"Quantization-aware training: {config.epochs} epoch(s) with {how}.")
    if holdout is None:  # a handler called on its own: nothing to compare on
        report["delivered"] = "qat"
        return _deliver(_export_quantized(gm, config, ctx, None), ptq, ctx)
    metric = holdout.metric
    report["post_training"] = {metric: fidelity_figure(ptq.score)}
    if history.best_epoch == 0:
        report["delivered"] = "post_training"
        change = fidelity_change(
            metric,
            history.start,
            history.best_trained,
            since=" at the calibrated start",
            until=" after the best epoch, simulated in torch",
        )
        ctx.warnings.append(
            f"Quantization-aware training made the result worse on {holdout.where} ({change}); "
            f"delivered the post-training result ({format_fidelity(metric, ptq.score)})."
        )
        return _deliver(ptq, None, ctx)
    built = _export_quantized(gm, config, ctx, holdout)
    report["qat"] = {metric: fidelity_figure(built.score)}
    assert built.score is not None and ptq.score is not None
    if built.score < ptq.score:
        report["delivered"] = "post_training"
        change = fidelity_change(
            metric, ptq.score, built.score, since=" post-training", until=" after QAT"
        )
        ctx.warnings.append(
            f"Quantization-aware training made the result worse on {holdout.where} ({change}); "
            "delivered the post-training result."
        )
        return _deliver(ptq, built, ctx)
    report["delivered"] = "qat"
    return _deliver(built, ptq, ctx)


def default_lr(dtype: str, post_training: dict[str, Any]) -> float:
    """QAT's learning rate when `lr` is unset: ATTENTION_INT8_LR for int8/uint8 when the
    post-training build found attention (its `details.attention`), else DEFAULT_LR."""
    if dtype in ("int8", "uint8") and post_training.get("attention"):
        return ATTENTION_INT8_LR
    return DEFAULT_LR[dtype]


def smoothing_alpha(chosen: str | None) -> float | None:
    """The SmoothQuant strength in a build's variant name (`static_int8_u8act_smoothquant0.75`),
    or None."""
    import re

    found = re.search(r"smoothquant(\d+(?:\.\d+)?)", chosen or "")
    return float(found.group(1)) if found else None


def _span(report: Report, lo: float, hi: float) -> Report:
    """A part's own 0..1 progress mapped onto lo..hi of the step's."""
    return lambda fraction, message: report(lo + (hi - lo) * fraction, message)


def _float_outputs(gm: nn.Module, data: Data) -> list[torch.Tensor]:
    """The float model's outputs on two samples (what the loss is chosen by)."""
    import torch

    idx = next(data.batches(2, None))
    with torch.no_grad():
        return list(flatten(gm(*[x[idx] for x in data.inputs])))


def _export_quantized(
    gm: nn.Module, config: QuantizeConfig, ctx: StepContext, holdout: Holdout | None
) -> _Built:
    """The trained model (weights on their grid) as .pt2 → ONNX → the ONNX quantizer."""
    ctx.report(0.72, "exporting the trained model")
    trained = save_program(
        gm,
        example_args(ctx),
        ctx.workdir / "qat.pt2",
        batch=ctx.batch,
        error_code="quantization_failed",
        what="quantization-aware trained model",
    )
    onnx_path = pt2_to_onnx(trained, ctx.workdir / "qat.onnx")
    return _quantize_onnx(config, onnx_path, ctx, "qat", holdout, _span(ctx.report, 0.8, 0.98))
