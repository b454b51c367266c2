"""`quantize` with `mode: "qat"`: quantization-aware training on the torch model.

Each Conv/Linear weight is replaced, through a torch parametrization, by its quantized value
with a straight-through estimator (the forward sees quantized weights, the gradient updates the
float ones): int8/uint8 symmetric per output channel; TWN ternary α·{−1, 0, +1} with
Δ = lowbit.ternary_threshold (0.7·mean|w|); XNOR binary α·{−1, +1} (α per output channel,
rounded to float16 as the packed format stores it). For int8/uint8 the inputs of those layers
also pass torch.ao's FakeQuantize (moving-average min/max), as static QDQ will quantize them.
The model trains with the job's recovery loss (labels → cross-entropy, none → distillation from
the original), the weights are baked onto their grid, and the result goes through the ONNX
quantizer of the same dtype — static QDQ for int8 (it reproduces the trained grid: max|w| is
unchanged) or the binary/ternary packer — so a QAT artifact is an ordinary QDQ (or packed) ONNX.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config import QuantizeConfig
from engine.context import StepContext
from engine.errors import EngineError
from engine.onnxgraph.convert import pt2_to_onnx
from engine.onnxgraph.graph import matches
from engine.ops.quantize.lowbit import ternary_threshold
from engine.ops.registry import handler_for, register
from engine.torchgraph.lift import weight_layers
from engine.torchgraph.program import example_args, save_program
from engine.torchgraph.train import epoch_progress, fit, job_data, load_lifted, recovery_loss

if TYPE_CHECKING:
    import torch
    from torch import nn


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


def _ste(dtype: str) -> nn.Module:
    from torch import nn

    class StraightThrough(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w + (quantized_weight(w, dtype) - w).detach()

    return StraightThrough()


def _targets(gm: Any, outputs: list[str], config: QuantizeConfig) -> dict[str, Any]:
    layers = weight_layers(gm)
    keep: set[str] = set()
    if config.dtype in ("binary", "ternary") and config.keep_first_last:
        convs = [n for n, m in layers.items() if type(m).__name__ == "Conv2d"]
        keep.update(convs[:1])
        keep.update(n for n in outputs if type(layers.get(n)).__name__ == "Linear")
    keep.update(n for n in layers if matches([n], config.exclude))
    return {n: m for n, m in layers.items() if n not in keep}


@register(QuantizeConfig, on="torch")
def qat(config: QuantizeConfig, model_path: Path, ctx: StepContext) -> Path:
    """Train with fake-quantized weights (and activations for int8), then export quantized."""
    import torch
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver
    from torch.nn.utils import parametrize

    if config.mode != "qat":
        raise EngineError("unsupported_op", f"quantize mode {config.mode!r} runs on ONNX.")
    gm, outputs = load_lifted(model_path)
    targets = _targets(gm, outputs, config)
    if not targets:
        raise EngineError(
            "nothing_to_quantize",
            "Every conv/linear layer is kept float (exclude / keep_first_last).",
            field=f"pipeline[{ctx.index}]",
        )
    data = job_data(ctx)
    loss, how = recovery_loss(ctx, data)
    hooks = []
    for module in targets.values():
        parametrize.register_parametrization(module, "weight", _ste(config.dtype))
        if config.dtype in ("int8", "uint8"):
            fq = FakeQuantize(
                observer=MovingAverageMinMaxObserver,
                quant_min=-128,
                quant_max=127,
                dtype=torch.qint8,
                qscheme=torch.per_tensor_affine,
            )
            module.add_module("input_fake_quant", fq)
            hooks.append(
                module.register_forward_pre_hook(lambda m, args: (m.input_fake_quant(args[0]),))
            )
    epochs = config.epochs
    ctx.report(0.05, f"quantization-aware training ({config.dtype}, {how})")

    lr = (
        config.lr
        if config.lr is not None
        else (1e-4 if config.dtype in ("int8", "uint8") else 1e-3)
    )
    history = fit(
        gm,
        data,
        loss,
        epochs=epochs,
        lr=lr,
        batch_size=config.batch_size,
        seed=ctx.seed,
        report=epoch_progress(ctx.report, "QAT", epochs, 0.05, 0.65),
    )
    for h in hooks:
        h.remove()
    for module in targets.values():
        # bake the quantized values, drop the training-only parts
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        if hasattr(module, "input_fake_quant"):
            del module.input_fake_quant
    ctx.details.update(
        {
            "qat": {
                "dtype": config.dtype,
                "training": how,
                "lr": lr,
                "epochs": history.epochs,
                "layers": sorted(targets),
            },
        }
    )
    ctx.warnings.append(f"Quantization-aware training: {epochs} epoch(s) with {how}.")
    ctx.report(0.7, "exporting the trained model")
    trained = save_program(
        gm,
        example_args(ctx),
        ctx.workdir / "qat.pt2",
        batch=ctx.batch,
        error_code="quantization_failed",
        what="quantization-aware trained model",
    )
    onnx_path = pt2_to_onnx(trained, ctx.workdir / "qat.onnx")
    # Same dtype through the ONNX quantizer: static QDQ for int8, the packer for binary/ternary.
    onnx_config = config.model_copy(
        update={"mode": "static" if config.dtype in ("int8", "uint8") else None}
    )
    onnx_ctx = dataclasses.replace(ctx, output=ctx.output.with_suffix(".onnx"))
    ctx.report(0.8, "quantizing the trained model")
    return Path(handler_for(onnx_config, "onnx")(onnx_config, onnx_path, onnx_ctx))
