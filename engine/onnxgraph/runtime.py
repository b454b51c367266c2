"""onnxruntime sessions and batched execution over samples (fixed batch sizes respected)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnxruntime as ort

    from engine.io.datasets import Samples
    from engine.io.formats import TensorSpec

EVAL_BATCH = 64


def make_session(path: str | Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU session with a fixed thread count and sequential execution."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def eval_threads() -> int:
    """Threads for bulk evaluation (not for latency, which uses the job's fixed count)."""
    return max(1, min(4, os.cpu_count() or 1))


def fixed_batch(inputs: Sequence[TensorSpec]) -> int | None:
    """The batch size the model was exported with, or None when the batch dim is dynamic."""
    firsts = {spec.shape[0] for spec in inputs if spec.shape}
    sizes = [d for d in firsts if isinstance(d, int) and d > 0]
    return max(sizes) if sizes else None


Feed = dict[str, np.ndarray]


def feeds(samples: Samples, batch: int, *, pad: bool) -> Iterator[tuple[Feed, int]]:
    """(feed, number of real rows) per batch; with pad, short batches repeat their last row."""
    n = len(samples)
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        feed = {k: v[start:stop] for k, v in samples.inputs.items()}
        rows = stop - start
        if pad and rows < batch:
            feed = {
                k: np.concatenate([v, np.repeat(v[-1:], batch - rows, axis=0)])
                for k, v in feed.items()
            }
        yield feed, rows


def run_all(
    session: ort.InferenceSession, samples: Samples, fixed: int | None, batch: int = EVAL_BATCH
) -> list[np.ndarray]:
    """Every output over all samples, concatenated along the batch axis."""
    size = fixed or batch
    per_output: list[list[np.ndarray]] = []
    for feed, rows in feeds(samples, size, pad=fixed is not None):
        fed = len(next(iter(feed.values())))
        outs = session.run(None, feed)
        if not per_output:
            per_output = [[] for _ in outs]
        for i, out in enumerate(outs):
            arr = np.asarray(out)
            if arr.ndim and arr.shape[0] == fed:
                per_output[i].append(arr[:rows])
            else:
                # An output without a batch axis: keep it as one row per batch.
                per_output[i].append(arr.reshape(1, -1))
    return [np.concatenate(parts) for parts in per_output]


def intermediates(
    model_path: Path, tensors: Sequence[str], samples: Samples, fixed: int | None, scratch: Path
) -> Iterator[dict[str, np.ndarray]]:
    """The named intermediate tensors of the model, per batch of the samples (one sample per
    batch unless the model has a fixed batch; padded rows dropped). The model is copied to
    `scratch` with those tensors added as outputs; the copy is removed afterwards."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path))
    known = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in known:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
    onnx.save(model, str(scratch))
    try:
        session = make_session(scratch)
        names = [o.name for o in session.get_outputs()]
        wanted = set(tensors)
        size = fixed or 1
        for feed, rows in feeds(samples, size, pad=fixed is not None):
            values = session.run(None, feed)
            yield {
                name: (arr[:rows] if arr.ndim and arr.shape[0] == size else arr)
                for name, value in zip(names, values, strict=True)
                if name in wanted
                for arr in [np.asarray(value)]
            }
    finally:
        scratch.unlink(missing_ok=True)


def first_feed(samples: Samples, fixed: int | None) -> dict[str, np.ndarray]:
    """One runnable feed: one sample, or a full fixed-size batch."""
    return next(feeds(samples.take(fixed or 1), fixed or 1, pad=True))[0]


def session_outputs_finite(outputs: Sequence[Any]) -> bool:
    """True when every floating output value is finite."""
    return all(
        np.isfinite(o).all() for o in outputs if isinstance(o, np.ndarray) and o.dtype.kind == "f"
    )
