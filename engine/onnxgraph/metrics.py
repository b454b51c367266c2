"""Measurements on an ONNX file, named as in docs/metrics.md, taken on the exact bytes delivered."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

    from engine.onnxgraph.runtime import Feed

# Inputs of quantization ops that are scales or zero points, not weights.
QUANT_PARAM_INPUTS: dict[str, tuple[int, ...]] = {
    "QuantizeLinear": (1, 2),
    "DequantizeLinear": (1, 2),
    "QLinearConv": (1, 2, 4, 5, 6, 7),
    "QLinearMatMul": (1, 2, 4, 5, 6, 7),
    "MatMulInteger": (2, 3),
    "ConvInteger": (2, 3),
}
# op -> (quantized weight input, its zero-point input, the zero point's axis when per-channel)
QUANT_WEIGHT_INPUTS: dict[str, tuple[int, int, int]] = {
    "DequantizeLinear": (0, 2, 1),
    "MatMulInteger": (1, 3, -1),
    "ConvInteger": (1, 3, 0),
    "QLinearConv": (3, 5, 0),
    "QLinearMatMul": (3, 5, -1),
}
MAC_OPS = {
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "MatMulInteger",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulNBits",
}
LATENCY_WARMUP = 10  # runs a model, or as many as fit in LATENCY_WARMUP_SECONDS (at least 2)
LATENCY_WARMUP_SECONDS = 0.5
# Outputs with 2..this many channels on axis 1 (and more axes after it) are judged per channel.
SLICE_MAX_CHANNELS = 256
# A worst slice under this many dB is warned about (int8 done well keeps 30+ dB).
SLICE_SQNR_WARN_DB = 20.0
# A measured speedup under this is called slower (and warned about); above it is noise.
SLOWER = 0.95
LATENCY_MIN_RUNS = 50
LATENCY_MIN_SECONDS = 0.5
LATENCY_MAX_RUNS = 5000
# a model: 3 s is 30+ runs of a 480×640 page detector's slowest int8 build; 10 s made the
# side-by-side measurement of 7 builds 89 s of its 286 s job
LATENCY_MAX_SECONDS = 3.0


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# zstd level 19 runs at ~1 MB/s here: 21 s per measure of a 35 MB model, three measures a
# job. Above ZSTD_MAX_LEVEL_BYTES, level 9 (30x faster) reports within 3% on float weights and
# ~12% high on sparse int8 ones, which the same file at level 19 would save.
ZSTD_LEVEL = 19
ZSTD_LARGE_LEVEL = 9
ZSTD_MAX_LEVEL_BYTES = 8 << 20


def zstd_level(size_bytes: int) -> int:
    """The zstandard level size_zstd_bytes uses for a file of this size."""
    return ZSTD_LEVEL if size_bytes <= ZSTD_MAX_LEVEL_BYTES else ZSTD_LARGE_LEVEL


_ZSTD_SIZES: dict[tuple[str, int], int] = {}  # (sha256, level) -> bytes, this process


def zstd_size(path: str | Path, level: int | None = None) -> int:
    """Bytes of the file compressed with zstandard (what a download could weigh): at `level`,
    by default zstd_level(size). Measured once per content (a job's final file is its last
    step's)."""
    import zstandard

    data = Path(path).read_bytes()
    chosen = zstd_level(len(data)) if level is None else level
    key = (hashlib.sha256(data).hexdigest(), chosen)
    if key not in _ZSTD_SIZES:
        compressor = zstandard.ZstdCompressor(level=chosen, threads=-1)
        _ZSTD_SIZES[key] = len(compressor.compress(data))
    return _ZSTD_SIZES[key]


def artifact_info(path: Path, fmt: str = "onnx") -> dict[str, Any]:
    """path, format, size_bytes and sha256 of a produced file."""
    return {
        "path": str(path),
        "format": fmt,
        "size_bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


# ----------------------------------------------------------------------------- weights


def _zero_points(model: onnx.ModelProto, inits: dict[str, np.ndarray]) -> dict[str, Any]:
    """Quantized weight name -> (zero point array, axis) so sparsity counts real zeros."""
    out: dict[str, Any] = {}
    for node in model.graph.node:
        spec = QUANT_WEIGHT_INPUTS.get(node.op_type)
        if spec is None or len(node.input) <= spec[0]:
            continue
        weight, zp_index, axis = spec
        if node.op_type == "DequantizeLinear":
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        zp = inits.get(node.input[zp_index]) if len(node.input) > zp_index else None
        out[node.input[weight]] = (zp, axis)
    return out


def _dynamic_weight_scales(model: onnx.ModelProto, inits: dict[str, np.ndarray]) -> set[str]:
    """Dynamic quantization multiplies a weight's scale into the activation's with a plain
    Mul: the constant input of a Mul whose other input is a DynamicQuantizeLinear scale."""
    scales = {n.output[1] for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"}
    return {
        x
        for n in model.graph.node
        if n.op_type == "Mul" and any(i in scales for i in n.input)
        for x in n.input
        if x in inits
    }


def weight_metrics(model: onnx.ModelProto) -> dict[str, Any]:
    """params, nonzero_params and sparsity over weight tensors (scales/zero points excluded)."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quant_params: set[str] = set()
    for node in model.graph.node:
        for i in QUANT_PARAM_INPUTS.get(node.op_type, ()):
            if i < len(node.input):
                quant_params.add(node.input[i])
    quant_params.update(_dynamic_weight_scales(model, inits))
    zero_points = _zero_points(model, inits)
    params = nonzero = 0
    for name, array in inits.items():
        if name in quant_params or array.size <= 1 or array.dtype.kind not in "fiu":
            continue
        if array.dtype == np.int64:
            continue  # shapes, axes and indices
        if array.dtype.kind in "iu" and name not in zero_points:
            continue
        params += int(array.size)
        zp, axis = zero_points.get(name, (None, 0))
        nonzero += _count_nonzero(array, zp, axis)
    return {
        "params": params,
        "nonzero_params": nonzero,
        "sparsity": round(1 - nonzero / params, 6) if params else 0.0,
    }


def _count_nonzero(array: np.ndarray, zp: np.ndarray | None, axis: int) -> int:
    if zp is None or not np.any(zp):
        return int(np.count_nonzero(array))
    if zp.size == 1:
        return int(np.count_nonzero(array != zp.reshape(())))
    shape = [1] * array.ndim
    shape[axis] = zp.size
    return int(np.count_nonzero(array != zp.reshape(shape)))


# ----------------------------------------------------------------------------- MACs


def count_macs(model: onnx.ModelProto, batch: int | None = None) -> int | None:
    """Multiply-accumulates for one sample (batch 1): Conv/Gemm/MatMul and their integer forms."""
    import onnx

    from engine.onnxgraph.graph import sort_nodes

    model = sort_nodes(onnx.ModelProto.FromString(model.SerializeToString()))
    del model.graph.value_info[:]
    for value in model.graph.input:
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = 1
            elif i == 0 and batch:
                dim.dim_value = batch
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return None
    shapes: dict[str, list[int]] = {}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)

    total = 0
    for node in model.graph.node:
        if node.op_type not in MAC_OPS:
            continue
        macs = _node_macs(node, shapes, batch or 1)
        if macs is None:
            return None
        total += macs
    return total // batch if batch else total


def runtime_macs(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> int | None:
    """count_macs from the shapes of one onnxruntime run on `feed` (every MAC op's input and
    output made a graph output, graph optimizations off), per row of the feed's batch; for
    the graphs ONNX shape inference cannot follow (the attention-mask subgraph transformers 5
    exports for SDPA). None when the run fails."""
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    nodes = [n for n in g.node if n.op_type in MAC_OPS]
    known = {v.name for v in (*g.input, *g.output)} | {t.name for t in g.initializer}
    wanted = {x for n in nodes for x in (*n.input[:2], n.output[0]) if x and x not in known}
    for name in sorted(wanted):
        g.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in session.get_outputs()]
        values = session.run(None, feed)
    except Exception:
        return None
    shapes = {name: list(np.shape(v)) for name, v in zip(names, values, strict=True)}
    shapes |= {k: list(np.shape(v)) for k, v in feed.items()}
    shapes |= {t.name: list(t.dims) for t in g.initializer}
    rows = max(1, int(next(iter(feed.values())).shape[0])) if feed else 1
    total = 0
    for node in nodes:
        macs = _node_macs(node, shapes, rows)
        if macs is None:
            return None
        total += macs
    return total // rows


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]], rows: int = 1) -> int | None:
    op = node.op_type
    out = shapes.get(node.output[0]) if node.output else None
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = shapes.get(node.input[3 if op == "QLinearConv" else 1])
        if out is None or w is None or len(w) < 3:
            return None
        return int(np.prod(out, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
    if op == "ConvTranspose":
        x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
        if x is None or w is None or len(w) < 3:
            return None
        return int(np.prod(x, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
    if op == "Gemm":
        a = shapes.get(node.input[0])
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        if out is None or a is None or len(a) != 2:
            return None
        return int(np.prod(out, dtype=np.int64)) * (a[0] if trans_a else a[1])
    if op == "MatMulNBits":  # com.microsoft: A [..., K] times packed B [K, N]
        a = shapes.get(node.input[0])
        attrs = {attr.name: attr.i for attr in node.attribute}
        if "K" not in attrs or "N" not in attrs:
            return None
        # ONNX shape inference stops at contrib ops: without A's shape, one row per sample.
        m = int(np.prod(a[:-1], dtype=np.int64)) if a else rows
        return m * attrs["K"] * attrs["N"]
    a = shapes.get(node.input[0])  # MatMul, MatMulInteger, QLinearMatMul
    if out is None or not a:
        return None
    return int(np.prod(out, dtype=np.int64)) * a[-1]


def static_metrics(
    path: Path, batch: int | None = None, feed: dict[str, np.ndarray] | None = None
) -> dict[str, Any]:
    """Everything measured from the file alone: sizes, weights, MACs (from one run on `feed`
    where ONNX shape inference leaves a MAC op's shapes unknown)."""
    import onnx

    model = onnx.load(str(path))
    macs = count_macs(model, batch)
    if macs is None and feed is not None:
        macs = runtime_macs(model, feed)
    return {
        "size_bytes": path.stat().st_size,
        "size_zstd_bytes": zstd_size(path),
        **weight_metrics(model),
        "macs": macs,
    }


# ----------------------------------------------------------------------------- runtime


_PEAK_MEMORY_PROBE = """
import os
import resource
import sys
import numpy as np
import onnxruntime as ort

def peak():  # bytes (KiB on Linux); getrusage needs no /proc, which the sandbox hides
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

feed = dict(np.load(sys.argv[2], allow_pickle=False))
# A forked child's peak starts at its resident size at the fork; this process's own peak may
# still hold what its exec'ing parent had resident.
read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    before = peak()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(sys.argv[3])
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
    session.run(None, feed)
    os.write(write_end, str(peak() - before).encode())
    os._exit(0)
os.close(write_end)
answer = os.read(read_end, 64).decode()
_, status = os.waitpid(pid, 0)
sys.exit(1) if status or not answer else print(answer)
"""


def peak_memory(path: Path, feed: Feed, threads: int) -> int | None:
    """Peak resident memory a fresh process adds to load the model in onnxruntime and run it once.

    Measured in a new interpreter (forked after importing onnxruntime, before creating the
    session) so that memory this process already holds does not hide it; None where it cannot
    be measured.
    """
    import subprocess
    import sys
    import tempfile

    if sys.platform != "linux":  # ru_maxrss is in KiB on Linux only
        return None
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        feed_path = Path(scratch) / "feed.npz"
        np.savez(feed_path, **feed)  # type: ignore[arg-type]
        try:
            done = subprocess.run(
                [
                    sys.executable,
                    "-I",
                    "-c",
                    _PEAK_MEMORY_PROBE,
                    str(path),
                    str(feed_path),
                    str(threads),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            return (
                max(0, int(done.stdout.strip().splitlines()[-1])) if done.returncode == 0 else None
            )
        except (subprocess.SubprocessError, ValueError, IndexError, OSError):
            return None


def latency(path: Path, samples: Sequence[Feed], threads: int) -> dict[str, Any]:
    """p50/p95 of one inference (onnxruntime CPU, fixed threads, after warm-up) in ms."""
    from engine.onnxgraph.runtime import make_session

    session = make_session(path, threads)
    for i in range(LATENCY_WARMUP):
        session.run(None, samples[i % len(samples)])
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < LATENCY_MAX_RUNS:
        elapsed = time.perf_counter() - started
        if elapsed > LATENCY_MAX_SECONDS or (
            len(times) >= LATENCY_MIN_RUNS and elapsed >= LATENCY_MIN_SECONDS
        ):
            break
        feed = samples[len(times) % len(samples)]
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000.0)
    return {
        "latency_ms_p50": round(float(np.percentile(times, 50)), 5),
        "latency_ms_p95": round(float(np.percentile(times, 95)), 5),
    }


def latency_side_by_side(
    paths: Sequence[Path],
    samples: Sequence[Feed],
    threads: int,
    block: int = 10,
    min_runs: int = LATENCY_MIN_RUNS * 2,
    max_seconds: float = LATENCY_MAX_SECONDS,
) -> list[float]:
    """p50 latency (ms) of each model, measured in interleaved blocks of runs.

    Ratios of these numbers are what `speedup` reports: measuring the models in alternation
    cancels the load and clock changes of a shared machine that separate measurements, taken
    minutes apart, would put into the ratio. A ranking that only tells 3× apart from 1× can
    stop at fewer `min_runs` a model and `max_seconds` a model.
    """
    from engine.onnxgraph.runtime import make_session

    sessions = [make_session(path, threads) for path in paths]
    for session in sessions:
        warm = time.perf_counter()
        for i in range(LATENCY_WARMUP):
            session.run(None, samples[i % len(samples)])
            if i >= 1 and time.perf_counter() - warm > LATENCY_WARMUP_SECONDS:
                break
    times: list[list[float]] = [[] for _ in sessions]
    started = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - started
        runs = len(times[0])
        if (
            runs >= LATENCY_MAX_RUNS
            or elapsed > max_seconds * len(sessions)
            or (runs >= min_runs and elapsed >= LATENCY_MIN_SECONDS * len(sessions))
        ):
            break
        for session, bucket in zip(sessions, times, strict=True):
            for _ in range(block):
                feed = samples[len(bucket) % len(samples)]
                t0 = time.perf_counter()
                session.run(None, feed)
                bucket.append((time.perf_counter() - t0) * 1000.0)
    return [round(float(np.percentile(bucket, 50)), 5) for bucket in times]


# ----------------------------------------------------------------------------- quality


def _rows(outputs: Sequence[np.ndarray]) -> np.ndarray:
    n = len(outputs[0])
    return np.concatenate([np.asarray(o, dtype=np.float64).reshape(n, -1) for o in outputs], 1)


def is_classifier_output(outputs: Sequence[np.ndarray]) -> bool:
    """The first output looks like class scores: [N, classes] with at least two classes."""
    return bool(outputs) and outputs[0].ndim == 2 and outputs[0].shape[1] >= 2


def quality(
    outputs: Sequence[np.ndarray],
    reference: Sequence[np.ndarray] | None,
    labels: np.ndarray | None,
    task: str,
) -> dict[str, Any]:
    """Accuracy (labels, classification) and fidelity to the reference outputs on the same inputs.

    `sqnr_db` is None when the outputs equal the reference exactly (infinite SQNR).
    """
    out: dict[str, Any] = {}
    classify = task == "classification" and is_classifier_output(outputs)
    scores = np.asarray(outputs[0]) if classify else None
    if scores is not None and labels is not None and len(labels) == len(scores):
        out["accuracy_top1"] = round(float((scores.argmax(1) == labels).mean()), 6)
        if scores.shape[1] >= 5:
            top5 = np.argpartition(-scores, 4, axis=1)[:, :5]
            out["accuracy_top5"] = round(float((top5 == labels[:, None]).any(1).mean()), 6)
    if reference is None:
        return out
    if scores is not None:
        agree = scores.argmax(1) == np.asarray(reference[0]).argmax(1)
        out["agreement_top1"] = round(float(agree.mean()), 6)
    a, b = _rows(reference), _rows(outputs)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    cos = np.where(norms > 0, (a * b).sum(1) / np.where(norms > 0, norms, 1.0), both_zero * 1.0)
    out["cosine_similarity"] = round(float(cos.mean()), 6)
    noise = float(((a - b) ** 2).sum())
    signal = float((a**2).sum())
    out["sqnr_db"] = _db(signal, noise)
    out["max_abs_error"] = float(np.abs(a - b).max())
    worst = worst_slice(reference, outputs)
    if worst is not None:
        out["sqnr_db_min"], out["sqnr_db_min_slice"] = worst
    return out


def _db(signal: float, noise: float) -> float | None:
    """10·log10(signal / noise), rounded; None when there is no noise (or no signal)."""
    return round(float(10 * np.log10(signal / noise)), 3) if noise > 0 and signal > 0 else None


def output_slices(shape: Sequence[int]) -> bool:
    """Whether an output is judged per channel: [N, C, ...] with 2..SLICE_MAX_CHANNELS channels
    and at least one more axis (a detector head, a segmentation map, a feature map)."""
    return len(shape) >= 3 and 2 <= shape[1] <= SLICE_MAX_CHANNELS


def slice_sqnr(
    reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]
) -> list[tuple[str, float | None]]:
    """SQNR (dB) of each output as a whole, and of each axis-1 channel of the outputs that
    `output_slices` picks: `("output 0", 32.5), ("output 0[:, 4]", 0.0), ...` (None: exact)."""
    found: list[tuple[str, float | None]] = []
    for i, (ref, out) in enumerate(zip(reference, outputs, strict=True)):
        r = np.asarray(ref, dtype=np.float64)
        d = r - np.asarray(out, dtype=np.float64)
        found.append((f"output {i}", _db(float((r**2).sum()), float((d**2).sum()))))
        if output_slices(r.shape):
            axes = (0, *range(2, r.ndim))
            signal, noise = (r**2).sum(axis=axes), (d**2).sum(axis=axes)
            found += [
                (f"output {i}[:, {c}]", _db(float(signal[c]), float(noise[c])))
                for c in range(r.shape[1])
                if signal[c] > 0
            ]
    return found


def worst_slice(
    reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]
) -> tuple[float, str] | None:
    """The lowest SQNR over the outputs and their channel slices, with where it is; None when
    every output and slice is exact. A zeroed slice shows here when the whole output hides it."""
    measured = [(db, name) for name, db in slice_sqnr(reference, outputs) if db is not None]
    return min(measured) if measured else None
