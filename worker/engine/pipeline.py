"""compress(model, pipeline, data) -> result: run ops in order, measure everything, export."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine import metrics as m
from worker.engine.config import OpConfig, QuantizeConfig, parse_pipeline
from worker.engine.datasets import Samples, load_dataset, match_inputs, synthetic
from worker.engine.errors import EngineError
from worker.engine.formats import inspect_onnx, onnx_session, to_onnx

EVAL_SAMPLES = 2000
SLOWER_THAN_ORIGINAL = 0.9  # below this measured speedup the job warns (above it is noise)
SUPPORTED_EXPORTS = ("onnx",)
Progress = Callable[[dict[str, Any]], None]


@dataclass
class Context:
    """What a handler may use: calibration data, a scratch dir, the input spec."""

    workdir: Path
    calibration: Samples
    inputs: list[dict[str, Any]]
    seed: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def static_batch(self) -> int | None:
        """The fixed batch size, if the model was exported with one."""
        first = self.inputs[0]["shape"][0] if self.inputs and self.inputs[0]["shape"] else None
        return first if isinstance(first, int) and first > 0 else None


Handler = Callable[[OpConfig, Path, Path, Context], list[str]]
HANDLERS: dict[type[OpConfig], Handler] = {}


def register(config_type: type[OpConfig]) -> Callable[[Handler], Handler]:
    """Map a config class to the function that applies it (src ONNX → dst ONNX)."""

    def wrap(fn: Handler) -> Handler:
        HANDLERS[config_type] = fn
        return fn

    return wrap


@register(QuantizeConfig)
def _quantize(config: OpConfig, src: Path, dst: Path, ctx: Context) -> list[str]:
    from worker.engine.quantize import quantize_onnx

    assert isinstance(config, QuantizeConfig)
    return quantize_onnx(src, dst, config, ctx.calibration, ctx.workdir, ctx.static_batch)


def _artifact(path: Path, fmt: str = "onnx") -> dict[str, Any]:
    return {
        "path": str(path),
        "format": fmt,
        "size_bytes": path.stat().st_size,
        "sha256": m.sha256_file(path),
    }


def _check_runs(path: Path, samples: Samples) -> None:
    """Re-open the artifact in a fresh session and run it once, or fail the job."""
    try:
        session = onnx_session(path)
        first = session.get_inputs()[0].shape[0]
        n = first if isinstance(first, int) and first > 0 else 1
        session.run(None, {k: v[:n] for k, v in samples.inputs.items()})
    except Exception as exc:
        raise EngineError(
            "artifact_check_failed",
            f"The produced model does not run in onnxruntime ({type(exc).__name__}: "
            f"{str(exc)[:300]}); it was not delivered. Try another mode or dtype.",
        ) from exc


def _measure(
    path: Path,
    samples: Samples,
    reference: np.ndarray | None,
    task: str,
    threads: int,
) -> tuple[dict[str, Any], np.ndarray]:
    outputs = m.run_model(path, samples)
    values = m.file_metrics(path)
    values.update(m.latency(path, samples.inputs, threads))
    values.update(m.quality(outputs, reference, samples.labels, task))
    return values, outputs


def _ratios(original: dict[str, Any], final: dict[str, Any]) -> dict[str, Any]:
    drop = None
    if "accuracy_top1" in original and "accuracy_top1" in final:
        drop = round(original["accuracy_top1"] - final["accuracy_top1"], 6)
    return {
        "compression_ratio": round(original["size_bytes"] / final["size_bytes"], 4),
        "speedup": round(original["latency_ms_p50"] / final["latency_ms_p50"], 4),
        "accuracy_drop": drop,
    }


def _samples(dataset_path: str | Path | None, specs: list[dict[str, Any]], seed: int) -> Samples:
    if dataset_path is None:
        return synthetic(specs, seed=seed)
    return match_inputs(load_dataset(dataset_path), specs)


def compress(
    model_path: str | Path,
    pipeline: list[dict[str, Any]],
    *,
    dataset_path: str | Path | None = None,
    evaluation_task: str = "classification",
    export: list[str] | None = None,
    workdir: str | Path,
    progress: Progress | None = None,
    seed: int = 0,
    latency_threads: int = 1,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the pipeline on the model; every number is measured on the file it describes."""
    emit = progress or (lambda _event: None)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    configs = parse_pipeline(pipeline)
    export = export or ["onnx"]
    unsupported = [f for f in export if f not in SUPPORTED_EXPORTS]
    if unsupported:
        raise EngineError(
            "export_unsupported",
            f"Export to {', '.join(unsupported)} is not available for this pipeline; "
            f"supported: {', '.join(SUPPORTED_EXPORTS)}.",
            field="export",
        )
    for config in configs:
        if type(config) not in HANDLERS:
            raise EngineError("unknown_op", f"No handler for op {config.op!r}.")

    emit({"type": "progress", "progress": 0.02, "message": "converting the model to ONNX"})
    original = workdir / "original.onnx"
    to_onnx(model_path, original)
    specs = inspect_onnx(original)["inputs"]
    data = _samples(dataset_path, specs, seed)
    warnings: list[str] = []
    if data.source == "synthetic":
        warnings.append(
            "No dataset: calibration used synthetic random inputs and accuracy was not measured; "
            "fidelity metrics compare outputs on those synthetic inputs only."
        )
    elif data.labels is None and evaluation_task == "classification":
        warnings.append("The dataset has no labels: accuracy was not measured, only fidelity.")
    eval_set = data.take(EVAL_SAMPLES)
    ctx = Context(workdir=workdir, calibration=data, inputs=specs, seed=seed)

    emit({"type": "progress", "progress": 0.05, "message": "measuring the original"})
    reference = m.run_model(original, eval_set)
    if resume:
        original_metrics = resume["original_metrics"]
        start = int(resume["start_index"])
        current = Path(resume["model_path"])
    else:
        original_metrics, _ = _measure(original, eval_set, None, evaluation_task, latency_threads)
        original_metrics.update(
            {k: v for k, v in m.quality(reference, reference, None, evaluation_task).items()}
        )
        emit({"type": "original_measured", "metrics": original_metrics})
        start, current = 0, original

    steps: list[dict[str, Any]] = []
    final_metrics = original_metrics
    n = len(configs)
    for index in range(start, n):
        config = configs[index]
        emit({"type": "step_started", "index": index, "op": config.op})
        emit({"type": "progress", "progress": 0.1 + 0.85 * index / n, "message": f"{config.op}"})
        out = workdir / f"step{index}.onnx"
        step_dir = workdir / f"step{index}"
        step_dir.mkdir(exist_ok=True)
        ctx.workdir = step_dir
        notes = HANDLERS[type(config)](config, current, out, ctx)
        _check_runs(out, eval_set)
        values, _ = _measure(out, eval_set, reference, evaluation_task, latency_threads)
        step_warnings = notes + _fidelity_warnings(values)
        artifact = _artifact(out)
        step = {
            "index": index,
            "op": config.op,
            "config": config.to_dict(),
            "metrics": values,
            "artifact": artifact,
            "warnings": step_warnings,
        }
        steps.append(step)
        final_metrics = values
        emit(
            {
                "type": "step_finished",
                "index": index,
                "metrics": values,
                "warnings": step_warnings,
                "artifact": artifact if index < n - 1 else None,
            }
        )
        shutil.rmtree(step_dir, ignore_errors=True)
        current = out
        warnings += [w for w in step_warnings if w not in warnings]

    final_path = workdir / "final.onnx"
    shutil.copyfile(current, final_path)
    ratios = _ratios(original_metrics, final_metrics)
    if ratios["speedup"] < SLOWER_THAN_ORIGINAL:
        warnings.append(
            f"The result is slower than the original (measured speedup {ratios['speedup']:.2f}). "
            "On CPUs without VNNI, int8 kernels and QDQ overhead on small or depthwise layers "
            "can cost more than they save; try mode 'static' or dtype 'fp16'."
        )
    emit({"type": "progress", "progress": 0.99, "message": "done"})
    return {
        "original": original_metrics,
        "steps": steps,
        "final": final_metrics,
        "ratios": ratios,
        "artifacts": [{**_artifact(final_path), "role": "final"}],
        "warnings": warnings,
        "accuracy_measured": data.labels is not None and evaluation_task == "classification",
        "calibration_source": data.source,
    }


def _fidelity_warnings(values: dict[str, Any]) -> list[str]:
    out = []
    if values.get("agreement_top1", 1.0) < 0.98:
        out.append(
            f"Top-1 agreement with the original fell to {values['agreement_top1']:.3f} (< 0.98)."
        )
    if values.get("cosine_similarity", 1.0) < 0.99:
        out.append(f"Output cosine similarity fell to {values['cosine_similarity']:.4f} (< 0.99).")
    return out
