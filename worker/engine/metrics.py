"""Measurements on an ONNX file, named as in DESIGN.md §4, taken on the exact bytes delivered."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine.datasets import Samples
from worker.engine.formats import onnx_session

WEIGHT_CONSUMERS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "MatMulNBits": 1}
QUANT_PARAM_OPS = {"QuantizeLinear", "DequantizeLinear"}


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def zstd_size(path: str | Path, level: int = 19) -> int:
    import zstandard

    return len(zstandard.ZstdCompressor(level=level).compress(Path(path).read_bytes()))


def file_metrics(path: str | Path) -> dict[str, Any]:
    """Size, zstd size, parameter count and sparsity from the file's weight tensors."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    scale_like: set[str] = set()
    for node in model.graph.node:
        if node.op_type in QUANT_PARAM_OPS:
            scale_like.update(node.input[1:])
    params = nonzero = 0
    for init in model.graph.initializer:
        if init.name in scale_like:
            continue
        array = numpy_helper.to_array(init)
        if array.size <= 1 or array.dtype.kind not in "fiu":
            continue
        params += int(array.size)
        nonzero += int(np.count_nonzero(array))
    return {
        "size_bytes": Path(path).stat().st_size,
        "size_zstd_bytes": zstd_size(path),
        "params": params,
        "nonzero_params": nonzero,
        "sparsity": round(1 - nonzero / params, 6) if params else 0.0,
        "macs": count_macs(model),
    }


def count_macs(model: Any) -> int:
    """Multiply-accumulates for one sample (batch 1) of Conv, ConvTranspose, Gemm and MatMul."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = 1
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return 0
    shapes: dict[str, list[int]] = {}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = [
            d.dim_value if d.HasField("dim_value") else 0 for d in value.type.tensor_type.shape.dim
        ]
        shapes[value.name] = dims
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    producers = {out: node for node in model.graph.node for out in node.output}

    def weight_shape(name: str) -> list[int]:
        node = producers.get(name)
        if node is not None and node.op_type == "DequantizeLinear":
            return shapes.get(node.input[0], [])
        return shapes.get(name, [])

    total = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0], []) if node.output else []
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            w = weight_shape(node.input[1])
            if len(w) >= 3 and out and all(out):
                per_out = int(np.prod(w[1:]))
                if node.op_type == "Conv":
                    total += int(np.prod(out)) * per_out
                else:
                    total += (
                        int(np.prod(shapes.get(node.input[0], [0]))) * w[1] * int(np.prod(w[2:]))
                    )
        elif node.op_type in ("Gemm", "MatMul") and len(node.input) > 1:
            a = shapes.get(node.input[0], [])
            if a and out and all(out) and all(a):
                total += int(np.prod(out)) * a[-1]
    return total


def latency(path: str | Path, sample: dict[str, np.ndarray], threads: int = 1) -> dict[str, float]:
    """p50/p95 of batch-1 inference after warm-up (onnxruntime CPU, fixed threads)."""
    session = onnx_session(path, threads)
    feed = {k: v[:1] for k, v in sample.items()}
    for _ in range(10):
        session.run(None, feed)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < 2000 and (len(times) < 50 or time.perf_counter() - started < 0.5):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000)
    return {
        "latency_ms_p50": round(float(np.percentile(times, 50)), 5),
        "latency_ms_p95": round(float(np.percentile(times, 95)), 5),
    }


def run_model(path: str | Path, samples: Samples, batch: int | None = None) -> np.ndarray:
    """The first output over all samples, batched (a static batch dim is respected)."""
    session = onnx_session(path, threads=2)
    first = session.get_inputs()[0].shape[0]
    size = first if isinstance(first, int) and first > 0 else (batch or 256)
    outputs = []
    for feed in samples.batches(size):
        n = len(next(iter(feed.values())))
        if n < size and isinstance(first, int):
            feed = {k: np.concatenate([v, np.repeat(v[-1:], size - n, 0)]) for k, v in feed.items()}
        outputs.append(np.asarray(session.run(None, feed)[0], dtype=np.float64)[:n])
    return np.concatenate(outputs)


def quality(
    outputs: np.ndarray, reference: np.ndarray | None, labels: np.ndarray | None, task: str
) -> dict[str, Any]:
    """Accuracy (with labels, classification) and fidelity to the reference outputs."""
    out: dict[str, Any] = {}
    classification = task == "classification" and outputs.ndim == 2
    if classification and labels is not None:
        out["accuracy_top1"] = round(float((outputs.argmax(1) == labels).mean()), 6)
        if outputs.shape[1] >= 5:
            top5 = np.argsort(-outputs, axis=1)[:, :5]
            out["accuracy_top5"] = round(float((top5 == labels[:, None]).any(1).mean()), 6)
    if reference is not None:
        if classification:
            out["agreement_top1"] = round(
                float((outputs.argmax(1) == reference.argmax(1)).mean()), 6
            )
        a = reference.reshape(len(reference), -1)
        b = outputs.reshape(len(outputs), -1)
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.where(denom > 0, (a * b).sum(1) / np.maximum(denom, 1e-30), 1.0)
        out["cosine_similarity"] = round(float(cos.mean()), 6)
        noise = float(((a - b) ** 2).sum())
        signal = float((a**2).sum())
        out["sqnr_db"] = round(10 * np.log10(signal / noise), 3) if noise > 0 else 200.0
        out["max_abs_error"] = float(np.abs(a - b).max())
    return out
