"""compress(model, pipeline, dataset) -> result: run ops in order, measure everything, export."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import (
    Backend,
    DistillConfig,
    OpConfig,
    PruneConfig,
    parse_op,
    validate_request,
)
from engine.context import StepContext
from engine.errors import EngineError
from engine.evaluation import EVAL_SAMPLES
from engine.io.datasets import Samples, load_dataset, match_inputs, synthetic
from engine.io.formats import (
    ModelFormat,
    TensorSpec,
    check_onnx_runs,
    detect_format,
    load_onnx,
    onnx_io,
)
from engine.onnxgraph import metrics as m
from engine.onnxgraph.convert import pt2_to_onnx, to_onnx
from engine.onnxgraph.runtime import (
    Feed,
    eval_threads,
    feeds,
    first_feed,
    fixed_batch,
    make_session,
    run_all,
    session_outputs_finite,
)
from engine.ops.registry import Handler, handler_for

LATENCY_SAMPLES = 16
DEFAULT_HOLDOUT = 0.3  # of the dataset, held out for measuring when a step trains
Progress = Callable[[dict[str, Any]], None]


@dataclass
class _Evaluation:
    """The fixed inputs every model of the job is measured on, and the original's outputs."""

    task: str
    samples: Samples
    latency_feeds: list[Feed]
    batch: int | None
    threads: int
    reference: list[np.ndarray] | None = None

    def measure(self, path: Path) -> tuple[dict[str, Any], list[np.ndarray]]:
        outputs = run_all(make_session(path, eval_threads()), self.samples, self.batch)
        values = m.static_metrics(path, self.batch)
        values.update(m.latency(path, self.latency_feeds, self.threads))
        peak = m.peak_memory(path, self.latency_feeds[0], self.threads)
        if peak is not None:
            values["peak_memory_bytes"] = peak
        values.update(m.quality(outputs, self.reference, self.samples.labels, self.task))
        return values, outputs


def _validate(
    configs: list[OpConfig],
    fmt: ModelFormat,
    export: Sequence[str],
    task: str,
    has_dataset: bool,
) -> tuple[list[Backend], list[Handler]]:
    """Refuse what cannot be done before any compute is spent; where each step runs."""
    plan = validate_request(configs, fmt, export=export, task=task, has_dataset=has_dataset)
    return plan, [handler_for(c, b) for c, b in zip(configs, plan, strict=True)]


def _reshapes_channels(config: OpConfig) -> bool:
    if isinstance(config, PruneConfig):
        return config.granularity == "channels"
    return isinstance(config, DistillConfig) and config.student == "width"


def _samples(
    dataset_path: str | Path | None,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    task: str,
    seed: int,
) -> Samples:
    if dataset_path is None:
        return synthetic(inputs, seed=seed)
    arrays = load_dataset(dataset_path)
    return match_inputs(arrays, inputs, use_labels=task == "classification", outputs=outputs)


def _latency_feeds(samples: Samples, batch: int | None) -> list[Feed]:
    size = batch or 1
    subset = samples.take(max(size, min(LATENCY_SAMPLES, len(samples))))
    return [f for f, _ in feeds(subset, size, pad=True)]


def verify_artifact(path: Path, feed: Feed) -> list[str]:
    """Re-open a produced model in a fresh session and run it once; warnings if it is not finite."""
    try:
        outputs = make_session(path).run(None, feed)
    except Exception as exc:
        text = " ".join(str(exc).split())[:400]
        raise EngineError(
            "artifact_check_failed",
            f"The produced model {path.name} does not run in onnxruntime ({type(exc).__name__}: "
            f"{text}), so it was not delivered. Try another mode or dtype.",
        ) from exc
    if not session_outputs_finite(outputs):
        return [f"{path.name} produced non-finite outputs (inf/NaN) on a sample input."]
    return []


def _ratios(original: dict[str, Any], final: dict[str, Any]) -> dict[str, Any]:
    drop = None
    if "accuracy_top1" in original and "accuracy_top1" in final:
        drop = round(original["accuracy_top1"] - final["accuracy_top1"], 6)
    return {
        "compression_ratio": round(original["size_bytes"] / final["size_bytes"], 4),
        "speedup": round(original["latency_ms_p50"] / final["latency_ms_p50"], 4),
        "accuracy_drop": drop,
    }


def _fidelity_warnings(values: dict[str, Any]) -> list[str]:
    out = []
    if values.get("agreement_top1", 1.0) < 0.98:
        out.append(
            f"Top-1 agreement with the original is {values['agreement_top1']:.3f} (< 0.98): "
            "the result changes predictions noticeably."
        )
    if values.get("cosine_similarity", 1.0) < 0.99:
        out.append(
            f"Output cosine similarity to the original is {values['cosine_similarity']:.4f}."
        )
    return out


def compress(
    model_path: str | Path,
    pipeline: Sequence[dict[str, Any] | OpConfig],
    *,
    dataset_path: str | Path | None = None,
    evaluation_task: str = "classification",
    export: Sequence[str] = ("onnx",),
    workdir: str | Path,
    progress: Progress | None = None,
    seed: int = 0,
    latency_threads: int = 1,
    resume: dict[str, Any] | None = None,
    holdout: float | None = None,
    models: dict[str, str | Path] | None = None,
) -> dict[str, Any]:
    """Run the pipeline on the model and measure the original, every step and the final file.

    `resume` ({start_index, model_path, original_metrics}) continues a retried job after its
    last stored checkpoint: steps before start_index are skipped and the original is not
    re-measured (its outputs are recomputed as the fidelity reference).

    `holdout` is the fraction of the dataset kept out of training, calibration and scoring and
    used for every measurement; by default 0.3 when a step trains, else 0 (all samples).
    `models` maps the ids of other uploaded models a step names (a distillation student) to
    their files.
    """
    emit: Progress = progress or (lambda event: None)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    export = list(export) if export else ["onnx"]
    try:
        configs = [c if isinstance(c, OpConfig) else parse_op(c) for c in pipeline]
    except ValueError as exc:
        raise EngineError("invalid_pipeline", str(exc), field="pipeline") from exc
    fmt = detect_format(model_path)
    plan, handlers = _validate(configs, fmt, export, evaluation_task, dataset_path is not None)
    if fmt == "pt2" and "torch" in plan:
        from engine.torchgraph.lift import preflight

        preflight(Path(model_path), any(_reshapes_channels(c) for c in configs))

    def report(fraction: float, message: str) -> None:
        emit(
            {
                "type": "progress",
                "progress": round(min(max(fraction, 0.0), 1.0), 4),
                "message": message,
            }
        )

    report(0.01, f"converting the {fmt} model to ONNX" if fmt != "onnx" else "checking the model")
    original = to_onnx(model_path, fmt, workdir / "original.onnx")
    check_onnx_runs(original)
    inputs, outputs = onnx_io(load_onnx(original))
    batch = fixed_batch(inputs)
    data = _samples(dataset_path, inputs, outputs, evaluation_task, seed)
    trains = any(c.trains() for c in configs)
    if holdout is None:
        holdout = DEFAULT_HOLDOUT if trains and data.source == "dataset" else 0.0
    eval_data = data
    if holdout > 0 and data.source == "dataset":
        data, eval_data = data.split(holdout, seed)
        if len(data) < 2 or len(eval_data) < 1:
            raise EngineError(
                "dataset_too_small",
                f"The dataset has {len(data) + len(eval_data)} samples: too few to hold out "
                f"{holdout:.0%} for evaluation and train on the rest. Upload more samples or "
                "set evaluation.holdout to 0.",
                field="evaluation.holdout",
            )
    evaluation = _Evaluation(
        evaluation_task,
        eval_data.subset(EVAL_SAMPLES, seed),
        _latency_feeds(eval_data, batch),
        batch,
        latency_threads,
    )
    warnings = _job_warnings(data, evaluation_task, batch)
    if trains and holdout == 0 and data.source == "dataset":
        warnings.append(
            "The pipeline trains on the job's dataset and evaluation.holdout is 0, so the "
            "metrics are measured on the training samples and may be optimistic."
        )

    report(0.1, "measuring the original model")
    for index, config in enumerate(configs):
        why = config.needs_labels()
        if why and data.labels is None:
            raise EngineError(
                "dataset_needs_labels",
                f"pipeline[{index}] ({config.op}) needs a dataset with a `labels` array: {why}.",
                field=f"pipeline[{index}]",
            )
    # The torch model of the pipeline (a .pt2) while steps run on torch.
    current_pt2: Path | None = Path(model_path) if fmt == "pt2" else None
    if resume:
        start = int(resume["start_index"])
        original_metrics = dict(resume["original_metrics"])
        evaluation.reference = run_all(
            make_session(original, eval_threads()), evaluation.samples, batch
        )
        saved = Path(resume["model_path"])
        if saved.suffix == ".pt2":
            current_pt2 = workdir / f"resume_step{start - 1}.pt2"
            shutil.copyfile(saved, current_pt2)
            current = pt2_to_onnx(current_pt2, workdir / f"resume_step{start - 1}.onnx")
        else:
            current_pt2 = None
            current = workdir / f"resume_step{start - 1}.onnx"
            shutil.copyfile(saved, current)
            load_onnx(current)
    else:
        start, current = 0, original
        original_metrics, evaluation.reference = evaluation.measure(original)
        emit({"type": "original_measured", "metrics": original_metrics})
    if evaluation_task == "classification" and not m.is_classifier_output(evaluation.reference):
        warnings.append(
            "The model's first output is not shaped [batch, classes], so accuracy and top-1 "
            "agreement were not measured; fidelity metrics compare all outputs."
        )
    probe = first_feed(evaluation.samples, batch)

    steps: list[dict[str, Any]] = []
    final_metrics, final_artifact = original_metrics, None
    n = len(configs)
    for index in range(start, n):
        config, handler = configs[index], handlers[index]
        lo, hi = 0.2 + 0.75 * index / n, 0.2 + 0.75 * (index + 1) / n
        emit({"type": "step_started", "index": index, "op": config.op})
        report(lo, f"step {index + 1}/{n}: {config.op}")
        scratch = workdir / f"step{index}.tmp"
        scratch.mkdir(exist_ok=True)
        backend = plan[index]
        suffix = "pt2" if backend == "torch" else "onnx"
        ctx = StepContext(
            index=index,
            workdir=scratch,
            output=workdir / f"step{index}_{config.op}.{suffix}",
            inputs=inputs,
            samples=data,
            batch=batch,
            seed=seed,
            report=_scaled(report, lo, lo + (hi - lo) * 0.6),
            source_model=Path(model_path),
            source_format=fmt,
            models={k: Path(v) for k, v in (models or {}).items()},
        )
        if backend == "torch":
            if current_pt2 is None:  # plan_pipeline guarantees one; a resume may not
                raise EngineError(
                    "invalid_pipeline",
                    f"pipeline[{index}] ({config.op}) needs the torch model, which an earlier "
                    "step did not keep.",
                    field=f"pipeline[{index}]",
                )
            out = Path(handler(config, current_pt2, ctx))
        else:
            out = Path(handler(config, current, ctx))
        shutil.rmtree(scratch, ignore_errors=True)
        if out.suffix == ".pt2":
            current_pt2 = out
            measured = pt2_to_onnx(out, workdir / f"step{index}_{config.op}.onnx")
            checkpoint = m.artifact_info(out, "pt2")
        else:
            current_pt2 = None
            measured = out
            checkpoint = m.artifact_info(out)
        step_warnings = ctx.warnings + verify_artifact(measured, probe)
        report(lo + (hi - lo) * 0.7, f"step {index + 1}/{n}: measuring")
        values, _ = evaluation.measure(measured)
        values.update(ctx.metrics)
        step_warnings += _fidelity_warnings(values)
        artifact = m.artifact_info(measured)
        extras = [m.artifact_info(path, fmt_) for path, fmt_ in ctx.extras]
        steps.append(
            {
                "index": index,
                "op": config.op,
                "backend": backend,
                "config": config.to_dict(),
                "metrics": values,
                "artifact": artifact,
                "extras": extras,
                "details": ctx.details,
                "warnings": step_warnings,
            }
        )
        emit(
            {
                "type": "step_finished",
                "index": index,
                "metrics": values,
                "warnings": step_warnings,
                "details": ctx.details,
                # The last step's file is the final artifact; only earlier ones are checkpoints
                # (a torch step's checkpoint is its .pt2, so a retry resumes on torch).
                "artifact": checkpoint if index < n - 1 else None,
            }
        )
        current, final_metrics, final_artifact = measured, values, artifact

    report(0.96, "checking the final artifact")
    if final_artifact is None:
        final_artifact = m.artifact_info(current)
        if current != original:
            final_metrics, _ = evaluation.measure(current)
    if final_artifact["sha256"] != m.sha256_file(current):
        raise EngineError("artifact_check_failed", f"{current.name} changed after it was measured.")
    verify_artifact(current, probe)
    artifacts = [{**final_artifact, "role": "final"}]
    if steps:
        artifacts += [{**extra, "role": "final"} for extra in steps[-1]["extras"]]
    if "pt2" in export:
        assert current_pt2 is not None  # _validate allowed pt2 only for torch-kept pipelines
        pt2 = workdir / "final.pt2"
        shutil.copyfile(current_pt2, pt2)
        artifacts.append({**m.artifact_info(pt2, "pt2"), "role": "final"})
    ratios = _ratios(original_metrics, final_metrics)
    side_by_side: dict[str, float] | None = None
    if current != original:
        # speedup from the two models measured side by side, not minutes apart
        report(0.98, "measuring the speedup side by side")
        before_ms, after_ms = m.latency_side_by_side(
            [original, current], evaluation.latency_feeds, latency_threads
        )
        ratios["speedup"] = round(before_ms / after_ms, 4)
        side_by_side = {"original_ms_p50": before_ms, "final_ms_p50": after_ms}
    if steps and ratios["speedup"] < m.SLOWER:
        warnings.append(
            f"The result ran slower than the original here (speedup {ratios['speedup']:.2f}× at "
            f"batch {batch or 1}, {latency_threads} thread(s)). Integer kernels pay off on CPUs "
            "with VNNI/dot-product instructions and on larger layers."
        )
    report(1.0, "done")
    return {
        "original": original_metrics,
        "steps": steps,
        "final": final_metrics,
        "ratios": ratios,
        "artifacts": artifacts,
        "warnings": warnings,
        "accuracy_measured": "accuracy_top1" in final_metrics,
        "latency_side_by_side": side_by_side,
        "calibration_source": data.source,
        "evaluation": {
            "holdout": holdout,
            "eval_samples": len(evaluation.samples),
            "train_samples": len(data) if holdout > 0 else None,
        },
    }


def _scaled(
    report: Callable[[float, str], None], lo: float, hi: float
) -> Callable[[float, str], None]:
    """A step's own 0..1 progress mapped onto its share of the job's."""

    def step_report(fraction: float, message: str) -> None:
        report(lo + (hi - lo) * fraction, message)

    return step_report


def _job_warnings(data: Samples, task: str, batch: int | None) -> list[str]:
    out = []
    if data.source == "synthetic":
        out.append(
            "No dataset was given: calibration used synthetic random-normal inputs and accuracy "
            "was not measured; the fidelity metrics compare outputs on those synthetic inputs "
            "only. Attach a dataset (with labels) for calibration and accuracy."
        )
    elif task == "classification" and data.labels is None:
        out.append(
            "The dataset has no `labels` array: accuracy was not measured, only fidelity to the "
            "original on the dataset's inputs."
        )
    if batch is not None and batch > 1:
        out.append(
            f"The model was exported with a fixed batch size of {batch}: it is evaluated in "
            f"batches of {batch} and latency is per batch of {batch}, not per sample. Export "
            "with a dynamic batch dim (torch.export.Dim) for batch-1 latency."
        )
    return out
