"""SmoothQuant-style scaling for MatMuls whose input has outlier channels.

Transformers put a few hidden channels at 10-100× the others (after LayerNorm, typically). One
int8 scale per activation tensor (static QDQ, or dynamic quantization's per-tensor scale) then
spends its range on those few channels and rounds the rest to a handful of steps. Dividing the
activation by a per-channel factor s and multiplying the matching weight rows by s leaves the
float product unchanged, X·W = (X/s)·(s·W), and moves the outliers into the weights, which are
quantized per output channel from their own values (Xiao et al., SmoothQuant, 2023:
s_j = max|X_j|^α / max|W_j|^(1-α)).

The division is an explicit `Mul` by 1/s in front of the MatMuls that share the activation, so
other consumers of that tensor (a residual Add) still see it unscaled. Whether smoothing helps a
given model is measured by the caller, who keeps it only when fidelity improves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.io.datasets import Samples
from engine.onnxgraph.graph import drop_unused_initializers

# Migration strengths tried; which one (if any) is kept is measured. On all-MiniLM-L6-v2
# (dynamic int8) 0.5 left the cosine where it was (0.9928 vs 0.9931) and 0.7-0.85 raised it
# to 0.998.
SMOOTH_ALPHAS = (0.5, 0.75)
# A tensor is smoothed when its largest channel maximum is this many times its median one.
OUTLIER_RATIO = 2.0
SMOOTH_SAMPLES = 64


@dataclass(frozen=True)
class Smoothed:
    tensor: str
    matmuls: list[str]
    outlier_ratio: float
    alpha: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "matmuls": self.matmuls,
            "action": "rescaled",
            "reason": f"its largest channel is {self.outlier_ratio:.0f}× its median channel: "
            "the channels were divided by s and the MatMul weight rows multiplied by s "
            f"(SmoothQuant, alpha {self.alpha})",
        }


def _matmul_groups(model: Any) -> dict[str, list[Any]]:
    """Activation tensor -> the MatMul nodes that read it with a constant 2-D weight."""
    inits = {t.name: t for t in model.graph.initializer}
    groups: dict[str, list[Any]] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        if len(inits[node.input[1]].dims) != 2 or node.input[0] in inits:
            continue
        groups.setdefault(node.input[0], []).append(node)
    return groups


def channel_maxima(
    model_path: Path, tensors: list[str], samples: Samples, fixed: int | None, scratch: Path
) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each tensor, over the samples (float model)."""
    from engine.onnxgraph.runtime import intermediates

    found: dict[str, np.ndarray] = {}
    for batch in intermediates(model_path, tensors, samples, fixed, scratch):
        for name, value in batch.items():
            arr = np.abs(value.astype(np.float32))
            peak = arr.reshape(-1, arr.shape[-1]).max(axis=0)
            found[name] = np.maximum(found[name], peak) if name in found else peak
    return found


def smooth(
    src: Path, dst: Path, samples: Samples, fixed: int | None, alpha: float
) -> list[Smoothed]:
    """Write the smoothed float model to dst; the list says what was rescaled (empty: dst not
    written, nothing had outliers)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    groups = _matmul_groups(model)
    if not groups:
        return []
    scratch = dst.with_name("smooth-probe.onnx")
    maxima = channel_maxima(src, list(groups), samples.take(SMOOTH_SAMPLES), fixed, scratch)
    inits = {t.name: t for t in model.graph.initializer}
    done: list[Smoothed] = []
    new_nodes: dict[str, Any] = {}
    for tensor, nodes in groups.items():
        peak = maxima.get(tensor)
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        if peak is None or any(w.shape[0] != peak.shape[0] for w in weights):
            continue
        ratio = float(peak.max() / max(np.median(peak), 1e-12))
        if ratio < OUTLIER_RATIO:
            continue
        w_peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        scale = np.power(np.maximum(peak, 1e-5), alpha) / np.power(
            np.maximum(w_peak, 1e-5), 1 - alpha
        )
        scale = np.clip(scale, 1e-2, 1e2).astype(np.float32)
        inv_name, out_name = f"{tensor}_smooth_inv", f"{tensor}_smoothed"
        model.graph.initializer.append(numpy_helper.from_array(1.0 / scale, inv_name))
        new_nodes[tensor] = helper.make_node(
            "Mul", [tensor, inv_name], [out_name], name=f"{tensor}_smooth"
        )
        for node, w in zip(nodes, weights, strict=True):
            # Each MatMul gets its own scaled copy; the originals are dropped when unread.
            name = f"{node.input[1]}_smoothed_{len(done)}_{node.name}"
            scaled = (w * scale[:, None]).astype(w.dtype)
            model.graph.initializer.append(numpy_helper.from_array(scaled, name))
            node.input[0], node.input[1] = out_name, name
        done.append(Smoothed(tensor, [n.name for n in nodes], ratio, alpha))
    if not done:
        return []
    # Put each Mul right before the first MatMul that reads it (keeps topological order).
    ordered = []
    placed: set[str] = set()
    for node in model.graph.node:
        source = node.input[0] if node.input else ""
        for tensor, mul in new_nodes.items():
            if tensor not in placed and source == mul.output[0]:
                ordered.append(mul)
                placed.add(tensor)
        ordered.append(node)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    drop_unused_initializers(model.graph)
    onnx.save(model, str(dst))
    return done
