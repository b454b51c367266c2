"""Bias correction for int8 weights (Nagel et al., Data-Free Quantization, ICCV 2019, §4.2, with
the input means measured instead of derived from BatchNorm).

Rounding a layer's weights to int8 adds an error ΔW = Q(W) − W that is not zero-mean per output
channel: the quantized layer's output is shifted by E[ΔW·x] = ΔW·E[x]. Small and depthwise
convolutions, whose few weights per channel round coarsely, carry the largest shifts, and the
next layers amplify them. Subtracting ΔW·E[x] from the layer's bias in the float model, before
quantizing, cancels the shift in expectation; the rounding of W itself is unchanged, because it
depends on W alone (symmetric int8, |max| / 127 per output channel or per tensor, as
onnxruntime's QDQ quantizer rounds weights).

E[x] is the mean of each input channel over the calibration samples (float model). Conv (any
group count) and Gemm (alpha = beta = 1, no transA) with a constant weight are corrected; a
MatMul's bias lives in a separate Add and is left alone. Whether the corrected model is kept is
measured by the caller (engine.ops.quantize.search), like every other variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.io.datasets import Samples
from engine.onnxgraph.graph import bias_of, weight_layers
from engine.onnxgraph.runtime import intermediates
from engine.ops.quantize.weight_only import symmetric_int8

BIAS_SAMPLES = 64  # calibration samples the input means are taken over


@dataclass(frozen=True)
class Corrected:
    layer: str
    shift_max: float  # the largest |ΔW·E[x]| subtracted from the bias
    bias_max: float  # the largest |bias| before

    def as_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "shift_max": self.shift_max, "bias_max": self.bias_max}


def _correctable(model: Any) -> list[tuple[Any, dict[str, Any]]]:
    """(layer, attributes) of every Conv and plain Gemm with a constant weight and a computed
    input: the layers whose bias can absorb ΔW·E[x]."""
    from onnx import helper

    inits = {t.name for t in model.graph.initializer}
    out = []
    for layer in weight_layers(model, min_ndim=2):
        node = layer.node
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (
            attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA")
        ):
            continue
        if node.op_type not in ("Conv", "Gemm") or node.input[0] in inits:
            continue
        out.append((layer, attrs))
    return out


def input_means(
    src: Path, samples: Samples, fixed: int | None, scratch: Path
) -> dict[str, np.ndarray]:
    """Per-channel means of every correctable layer's input over up to BIAS_SAMPLES samples
    (float model): what correct_biases needs, for either weight granularity."""
    import onnx

    layers = _correctable(onnx.load(str(src)))
    if not layers:
        return {}
    tensors = sorted({layer.node.input[0] for layer, _ in layers})
    return _channel_means(src, tensors, samples.take(BIAS_SAMPLES), fixed, scratch)


def correct_biases(
    src: Path, dst: Path, means: dict[str, np.ndarray], per_channel: bool
) -> list[Corrected]:
    """Write src with every correctable layer's bias reduced by ΔW·E[x] (E[x] from
    input_means) to dst; the list says which layers changed (empty: nothing to correct, dst
    not written)."""
    import onnx
    from onnx import numpy_helper

    if not means:
        return []
    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    done: list[Corrected] = []
    for layer, attrs in _correctable(model):
        node, mean = layer.node, means.get(layer.node.input[0])
        if mean is None:
            continue
        w = numpy_helper.to_array(inits[layer.weight]).astype(np.float64)
        shift = _shift(node.op_type, attrs, w, layer.out_axis, mean, per_channel)
        if shift is None or not np.any(shift):
            continue
        bias_name = bias_of(node)
        if bias_name is not None and bias_name not in inits:
            continue  # a computed bias: leave it
        if bias_name is None:
            bias = np.zeros(shift.shape, dtype=np.float64)
            bias_name = f"{layer.weight}_bias_corrected"
            node.input.append(bias_name)
            zero = numpy_helper.from_array(bias.astype(np.float32), bias_name)
            model.graph.initializer.append(zero)
            inits[bias_name] = model.graph.initializer[-1]
        else:
            bias = numpy_helper.to_array(inits[bias_name]).astype(np.float64)
        if bias.shape != shift.shape:
            continue
        inits[bias_name].CopyFrom(
            numpy_helper.from_array((bias - shift).astype(np.float32), bias_name)
        )
        done.append(Corrected(node.name, float(np.abs(shift).max()), float(np.abs(bias).max())))
    if done:
        onnx.save(model, str(dst))
    return done


def _shift(
    op_type: str,
    attrs: dict[str, Any],
    w: np.ndarray,
    out_axis: int,
    mean: np.ndarray,
    per_channel: bool,
) -> np.ndarray | None:
    """ΔW·E[x] per output channel (None when the shapes do not line up)."""
    q, scale = symmetric_int8(w, out_axis if per_channel else None)
    shape = [-1 if i == out_axis else 1 for i in range(w.ndim)] if per_channel else [1] * w.ndim
    dw = q.astype(np.float64) * scale.astype(np.float64).reshape(shape) - w
    if op_type == "Conv":
        groups = int(attrs.get("group", 1))
        out_ch, in_per_group = dw.shape[0], dw.shape[1]
        if mean.shape[0] != groups * in_per_group or out_ch % groups:
            return None
        per_input = dw.reshape(out_ch, in_per_group, -1).sum(axis=2)  # kernel taps summed
        group_of = np.arange(out_ch) // (out_ch // groups)
        inputs = mean.reshape(groups, in_per_group)[group_of]  # [out, in_per_group]
        return np.asarray((per_input * inputs).sum(axis=1))
    if w.ndim != 2:
        return None
    transposed = bool(attrs.get("transB", 0))  # y = x·Wᵀ (W [out, in]) or x·W (W [in, out])
    if mean.shape[0] != (w.shape[1] if transposed else w.shape[0]):
        return None
    return np.asarray(dw @ mean if transposed else mean @ dw)


def _channel_means(
    model_path: Path, tensors: list[str], samples: Samples, fixed: int | None, scratch: Path
) -> dict[str, np.ndarray]:
    """The mean of each tensor per axis-1 channel ([N, C, ...] or [N, C]) over the samples."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in intermediates(model_path, tensors, samples, fixed, scratch):
        for name, value in batch.items():
            if value.ndim < 2:
                continue
            arr = value.astype(np.float64)
            axes = tuple(i for i in range(arr.ndim) if i != 1)
            total = arr.sum(axis=axes)
            n = arr.size // arr.shape[1]
            sums[name] = sums[name] + total if name in sums else total
            counts[name] = counts.get(name, 0) + n
    return {name: sums[name] / counts[name] for name in sums}
