"""`weight_share` on ONNX: Deep Compression's per-layer k-means codebooks + Huffman coding.

Each Conv/Gemm/MatMul weight gets at most 2^bits shared values, fitted by 1-D k-means (Lloyd)
on its nonzero weights; zeros (pruned positions) stay exactly zero. Centroids are rounded to
float16 (float32 if fp16 cannot hold them) and those rounded values are what the dense ONNX
holds, so the archive decodes bit-exactly. Biases of the shared layers become `bias_bits`
linear levels. The step delivers two files: the dense ONNX (runs anywhere; the job measures
it) and the compact `cpz` archive (engine.io.cpz; docs/archive-format.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine.config import WeightShareConfig
from engine.context import StepContext
from engine.errors import EngineError
from engine.io import cpz as archive
from engine.onnxgraph.graph import bias_of, matches, weight_layers
from engine.ops.registry import register

FP16_MAX = 65504.0


def kmeans_1d(
    values: np.ndarray, k: int, init: str, iterations: int, rng: np.random.Generator
) -> np.ndarray:
    """Sorted centroids of a 1-D k-means (Lloyd) with linear, density (CDF) or random init."""
    v = np.sort(np.asarray(values, np.float64).ravel())
    if len(v) == 0:
        return np.zeros(0)
    k = min(k, len(np.unique(v)))
    if init == "linear":
        c = np.linspace(v[0], v[-1], k)
    elif init == "density":
        c = np.quantile(v, (np.arange(k) + 0.5) / k)
    else:
        c = np.sort(rng.choice(v, size=k, replace=False))
    for _ in range(iterations):
        edges = (c[1:] + c[:-1]) / 2
        assign = np.searchsorted(edges, v)
        counts = np.bincount(assign, minlength=len(c))
        sums = np.bincount(assign, weights=v, minlength=len(c))
        new = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        if np.array_equal(new, c):
            break
        c = np.sort(new)
    return c


def _nearest(values: np.ndarray, book: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook entry (book sorted ascending)."""
    if len(book) == 1:
        return np.zeros(len(values), np.int64)
    b = book.astype(np.float64)
    edges = (b[1:] + b[:-1]) / 2
    return np.searchsorted(edges, values.astype(np.float64)).astype(np.int64)


def share_tensor(
    w: np.ndarray, index: int, bits: int, config: WeightShareConfig, rng: np.random.Generator
) -> archive.Shared:
    flat = np.asarray(w, np.float32).ravel()
    positions = np.flatnonzero(flat != 0)
    nonzero = flat[positions]
    centroids = kmeans_1d(nonzero, 1 << bits, config.init, config.iterations, rng)
    fp16 = bool(len(centroids) == 0 or np.abs(centroids).max() < FP16_MAX)
    book = np.unique(centroids.astype(np.float16 if fp16 else np.float32))
    indices = _nearest(nonzero, book)
    used = np.unique(indices)  # drop centroids no weight maps to, and renumber
    book = book[used]
    indices = np.searchsorted(used, indices)
    return archive.Shared(index, tuple(w.shape), bits, book, positions, indices, config.huffman)


def quantize_uniform(b: np.ndarray, index: int, bits: int, huffman: bool) -> archive.Uniform:
    flat = np.asarray(b, np.float32).ravel()
    lo = np.float32(flat.min()) if flat.size else np.float32(0)
    hi = np.float32(flat.max()) if flat.size else np.float32(0)
    levels = (1 << bits) - 1
    step = np.float32((float(hi) - float(lo)) / levels)
    if step > 0:
        q = np.clip(np.rint((flat.astype(np.float64) - float(lo)) / float(step)), 0, levels)
    else:
        q = np.zeros(flat.size)
    return archive.Uniform(index, tuple(b.shape), bits, lo, step, q.astype(np.int64), huffman)


def _targets(model: Any, config: WeightShareConfig) -> tuple[list[tuple[int, str]], list[int]]:
    """(initializer index, node name) of every weight to share, and indices of their biases."""
    from onnx import TensorProto

    inits = model.graph.initializer
    position = {init.name: i for i, init in enumerate(inits)}
    weights: dict[int, str] = {}
    biases: list[int] = []
    for layer in weight_layers(model):
        i = position[layer.weight]
        if inits[i].data_type != TensorProto.FLOAT:
            continue
        if matches((layer.weight, layer.name), config.ignore):
            continue
        weights.setdefault(i, layer.name)
        bias = bias_of(layer.node)
        if bias is not None and bias in position:
            j = position[bias]
            if inits[j].data_type == TensorProto.FLOAT and j not in biases:
                biases.append(j)
    biases = [j for j in biases if j not in weights]
    return sorted(weights.items()), biases


@register(WeightShareConfig, on="onnx")
def weight_share_onnx(config: WeightShareConfig, model_path: Path, ctx: StepContext) -> Path:
    import onnx
    from onnx import numpy_helper

    model = archive.strip_model(onnx.load(str(model_path)))
    weights, biases = _targets(model, config)
    if not weights:
        raise EngineError(
            "nothing_to_share",
            "The model has no Conv/Gemm/MatMul float32 weight initializers to share "
            "(or 'ignore' excludes all of them).",
            field="pipeline",
        )
    rng = np.random.default_rng(ctx.seed)
    inits = model.graph.initializer
    records: list[archive.Record] = []
    for n, (i, _node) in enumerate(weights):
        ctx.report(0.05 + 0.7 * n / len(weights), f"k-means on {inits[i].name}")
        records.append(share_tensor(numpy_helper.to_array(inits[i]), i, config.bits, config, rng))
    if config.bias_bits:
        for j in biases:
            b = numpy_helper.to_array(inits[j])
            records.append(quantize_uniform(b, j, config.bias_bits, config.huffman))
    ctx.report(0.8, "writing the archive")
    data, sizes = archive.encode(model, records)
    packed = ctx.output.with_suffix(".cpz")
    packed.write_bytes(data)
    # The dense ONNX is the archive decoded: what a client rebuilds is what the job measured.
    onnx.save(archive.decode(data), str(ctx.output))
    ctx.extras.append((packed, "cpz"))

    reference = model_path.stat().st_size
    ctx.metrics["archive_size_bytes"] = len(data)
    ctx.metrics["archive_compression_ratio"] = round(reference / len(data), 4)
    layers = {}
    for rec in records:
        name = inits[rec.index].name
        if isinstance(rec, archive.Shared):
            size = int(np.prod(rec.shape))
            layers[name] = {
                "kind": "shared",
                "bits": rec.bits,
                "codebook_size": len(rec.codebook),
                "codebook_dtype": str(rec.codebook.dtype),
                "elements": size,
                "nonzeros": len(rec.positions),
                **rec.report,
            }
        else:
            layers[name] = {"kind": "uniform", "bits": rec.bits, "elements": rec.q.size}
            layers[name].update(rec.report)
    coded = sum(int(np.prod(r.shape)) for r in records)
    ctx.details.update(
        {
            "archive_format": f"cpz v{archive.VERSION}",
            "archive_size_bytes": len(data),
            "reference_size_bytes": reference,
            "reference": "the step's input ONNX file (fp32, before weight sharing)",
            **sizes,
            "layers": layers,
            "bits_per_coded_element": round(8 * len(data) / max(coded, 1), 4),
        }
    )
    ctx.warnings.append(
        f"Weight sharing: {len(weights)} layer(s) at {config.bits} bits; the cpz archive is "
        f"{len(data):,} bytes ({reference / len(data):.1f}× smaller than the {reference:,}-byte "
        "input ONNX). Decode it with `compaas decode ARCHIVE -o model.onnx`; the dense ONNX "
        "delivered with it holds the same values and is what was measured."
    )
    return ctx.output
