"""`prune` on ONNX weight initializers: unstructured or N:M, by magnitude (L1/L2) or at random.

Everything that needs the torch graph (channels, gradient/entropy criteria, schedules with
training) runs on the pipeline's .pt2 (engine.ops.prune.torch_model).

Unstructured sparsity leaves a dense file the same size and speed; what it buys is a smaller
compressed download (size_zstd_bytes) and a start for weight sharing. The job reports that
honestly instead of claiming a speedup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine.config import PruneConfig
from engine.context import StepContext
from engine.errors import EngineError
from engine.onnxgraph.graph import matches, weight_layers
from engine.ops.registry import register


def _prunable(model: Any, config: PruneConfig) -> list[tuple[Any, Any, int]]:
    """(initializer, consuming node, reduction axis) for every weight the op may prune."""
    inits = {init.name: init for init in model.graph.initializer}
    found = [(inits[x.weight], x.node, x.in_axis) for x in weight_layers(model)]
    if not found:
        raise EngineError(
            "nothing_to_prune",
            "The model has no Conv/Gemm/MatMul weight initializers to prune.",
            field="pipeline",
        )
    last_weight = found[-1][0].name
    kept = []
    for init, node, axis in found:
        if matches((init.name, node.name), config.ignore):
            continue
        if init.name == last_weight and not config.include_last_layer:
            continue  # the classifier keeps every weight unless asked otherwise
        kept.append((init, node, axis))
    if not kept:
        raise EngineError(
            "nothing_to_prune",
            "Every weight layer is excluded (the last layer is kept by default, plus 'ignore').",
            field="pipeline",
        )
    return kept


def _scores(weights: np.ndarray, config: PruneConfig, rng: np.random.Generator) -> np.ndarray:
    if config.criterion == "random":
        return rng.random(weights.shape)
    return np.abs(weights) if config.norm == "l1" else weights.astype(np.float64) ** 2


def _nm_mask(scores: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """Keep the m−n largest of every m consecutive weights along the reduction axis."""
    moved = np.moveaxis(scores, axis, -1)
    if axis == 1 and scores.ndim > 2:  # Conv: group over in·kh·kw
        moved = scores.reshape(scores.shape[0], -1)
    length = moved.shape[-1]
    pad = (-length) % m
    padded = moved
    if pad:  # pad with +inf so padding is never among the weights zeroed
        padded = np.concatenate([moved, np.full((*moved.shape[:-1], pad), np.inf)], -1)
    groups = padded.reshape(*padded.shape[:-1], -1, m)
    order = np.argsort(groups, axis=-1, kind="stable")
    keep = np.ones_like(groups, dtype=bool)
    np.put_along_axis(keep, order[..., :n], False, axis=-1)
    keep = keep.reshape(*padded.shape[:-1], -1)[..., :length]
    if axis == 1 and scores.ndim > 2:
        return keep.reshape(scores.shape)
    return np.moveaxis(keep, -1, axis)


def make_masks(
    scores: dict[str, np.ndarray], axes: dict[str, int], config: PruneConfig, sparsity: float
) -> dict[str, np.ndarray]:
    """Keep-masks: N:M groups along each weight's reduction axis, else the `sparsity` fraction
    of lowest scores zeroed per layer or across all layers (scope global)."""
    if config.granularity == "n:m":
        return {name: _nm_mask(s, axes[name], config.n, config.m) for name, s in scores.items()}
    if config.scope == "global":
        names = list(scores)
        flat = _keep_top(np.concatenate([scores[n].ravel() for n in names]), sparsity)
        bounds = np.cumsum([0, *(scores[n].size for n in names)])
        return {
            n: flat[bounds[i] : bounds[i + 1]].reshape(scores[n].shape) for i, n in enumerate(names)
        }
    return {name: _keep_top(s.ravel(), sparsity).reshape(s.shape) for name, s in scores.items()}


def _keep_top(flat: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask zeroing exactly round(sparsity·n) lowest scores (ties broken by position, so
    many equal scores — e.g. weights of dead units with zero gradient — never over-prune)."""
    k = int(round(sparsity * flat.size))
    keep = np.ones(flat.size, dtype=bool)
    if k > 0:
        keep[np.argsort(flat, kind="stable")[:k]] = False
    return keep


@register(PruneConfig, on="onnx")
def prune_onnx(config: PruneConfig, model_path: Path, ctx: StepContext) -> Path:
    import onnx
    from onnx import numpy_helper

    config = config.resolved(transformer=False, dataset=False)  # auto → magnitude here
    model = onnx.load(str(model_path))
    rng = np.random.default_rng(ctx.seed)
    targets = _prunable(model, config)
    arrays = {init.name: numpy_helper.to_array(init) for init, _, _ in targets}
    scores = {name: _scores(w, config, rng) for name, w in arrays.items()}
    axes = {init.name: axis for init, _node, axis in targets}
    masks = make_masks(scores, axes, config, config.sparsity)
    for init, _node, _axis in targets:
        pruned = np.where(masks[init.name], arrays[init.name], 0).astype(arrays[init.name].dtype)
        init.CopyFrom(numpy_helper.from_array(pruned, init.name))
    onnx.save(model, str(ctx.output))
    zeros = sum(int((~mask).sum()) for mask in masks.values())
    total = sum(mask.size for mask in masks.values())
    ctx.warnings.append(
        f"Pruned {zeros / total:.1%} of the weights of {len(targets)} layer(s). Zeros keep a "
        "dense ONNX file the same size and speed; the saving shows in size_zstd_bytes "
        "(and in runtimes with sparse kernels)."
    )
    return ctx.output
