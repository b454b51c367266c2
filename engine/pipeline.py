"""compress(model, pipeline, dataset) -> result: prepare the job, run each step, finish.

Each step's output is measured on the same held-out samples as the original; the result holds the
metrics of the original, every step and the final file (each with its `measured_on`), the quality
verdict of every step and of the final file against the floor (engine.quality), their ratios,
artifacts and warnings.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import evaluation, measured_on, quality
from engine.config import (
    Backend,
    DistillConfig,
    OpConfig,
    PruneConfig,
    parse_op,
    resolve_holdout,
    trains_on_torch,
    validate_request,
)
from engine.context import StepContext
from engine.errors import EngineError
from engine.evaluation import Evaluation, verify_artifact
from engine.events import EventKind, step_span
from engine.inspect import check_onnx_runs
from engine.io.datasets import Samples, load_dataset, match_inputs, synthetic
from engine.io.formats import (
    ModelFormat,
    TensorSpec,
    detect_format,
    load_onnx,
    onnx_io,
)
from engine.onnxgraph import metrics as m
from engine.onnxgraph.convert import pt2_to_onnx, to_onnx
from engine.onnxgraph.runtime import Feed, first_feed, fixed_batch
from engine.ops.registry import Handler, handler_for
from engine.spec import CompressSpec, Resume
from engine.torchgraph.device import DeviceSetting

Progress = Callable[[dict[str, Any]], None]
Report = Callable[[float, str], None]


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
    train_threads: int = 1,
    resume: Resume | dict[str, Any] | None = None,
    holdout: float | None = None,
    models: dict[str, str | Path] | None = None,
    time_limit_s: float | None = None,
    memory_limit_mb: int | None = None,
    device: DeviceSetting = "cpu",
    dataset_id: str | None = None,
    floor: dict[str, float | None] | None = None,
    allow_below_floor: bool = False,
    search_history: Sequence[dict[str, Any]] = (),
    train_samples: int | None = None,
) -> dict[str, Any]:
    """Run the pipeline on the model and measure the original, every step and the final file.

    The arguments are the fields of `CompressSpec` (see there); `run(spec)` is the same call.
    """
    spec = CompressSpec(
        model_path=str(model_path),
        pipeline=[c.to_dict() if isinstance(c, OpConfig) else c for c in pipeline],
        workdir=str(workdir),
        dataset_path=str(dataset_path) if dataset_path is not None else None,
        dataset_id=dataset_id,
        evaluation_task=evaluation_task,
        floor=floor or {},
        allow_below_floor=allow_below_floor,
        holdout=holdout,
        export=list(export or ()),
        seed=seed,
        latency_threads=latency_threads,
        train_threads=train_threads,
        device=device,
        models={k: str(v) for k, v in (models or {}).items()},
        resume=Resume.model_validate(resume) if isinstance(resume, dict) else resume,
        search_history=list(search_history),
        train_samples=train_samples,
        time_limit_s=time_limit_s,
        memory_limit_mb=memory_limit_mb,
    )
    return run(spec, progress)


def run(spec: CompressSpec, progress: Progress | None = None) -> dict[str, Any]:
    """Run the pipeline the spec describes; `progress` receives every event (see EventKind).

    With `spec.resume` a retried job continues after its last stored checkpoint: steps before
    start_index are skipped and the original is not re-measured (its outputs are recomputed as
    the fidelity reference).
    """
    job = _prepare(spec, progress or (lambda event: None))
    state = _start(job)
    for index in range(state.start, len(job.configs)):
        _run_step(job, state, index)
    return _finish(job, state)


@dataclass
class _Job:
    """What every step shares: the parsed pipeline, the plan, the data, the measuring set."""

    spec: CompressSpec
    emit: Progress
    workdir: Path
    export: list[str]
    configs: list[OpConfig]
    plan: list[Backend]
    handlers: list[Handler]
    fmt: ModelFormat
    original: Path  # the upload as ONNX
    inputs: list[TensorSpec]
    batch: int | None
    data: Samples  # what steps train, calibrate and score on
    holdout: float
    evaluation: Evaluation  # what every model is measured on
    floor: quality.Floor  # the request's evaluation.floor, checked
    warnings: list[str]
    report: Report  # (fraction of the job, message) -> a progress event
    device: str  # where the training steps train: "cpu" or "cuda"
    # pre-flight estimates of the torch training steps, by index (steps[].details.estimate)
    estimates: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass
class _State:
    """Where the run stands: the current model, and what the steps so far produced."""

    start: int
    current: Path  # the current model as ONNX (what is measured)
    current_pt2: Path | None  # the torch model while steps run on torch
    original_metrics: dict[str, Any]
    probe: Feed  # one input every produced model must run on
    steps: list[dict[str, Any]] = field(default_factory=list)
    final_metrics: dict[str, Any] = field(default_factory=dict)
    final_artifact: dict[str, Any] | None = None


def _prepare(spec: CompressSpec, emit: Progress) -> _Job:
    """Refuse what cannot be done, convert the upload to ONNX, load and split the data."""
    started = time.monotonic()
    workdir = Path(spec.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    export = spec.export or ["onnx"]
    try:
        configs = [parse_op(c) for c in spec.pipeline]
    except ValueError as exc:
        raise EngineError("invalid_pipeline", str(exc), field="pipeline") from exc
    try:
        floor = quality.check_floor(spec.floor)
    except ValueError as exc:
        raise EngineError("invalid_floor", str(exc), field="evaluation.floor") from exc
    model_path = Path(spec.model_path)
    fmt = detect_format(model_path)
    task = spec.evaluation_task
    plan, handlers = _validate(configs, fmt, export, task, spec.dataset_path is not None)
    if fmt == "pt2" and "torch" in plan:
        from engine.torchgraph.lift import preflight

        preflight(model_path, any(_reshapes_channels(c) for c in configs))
    device = "cpu"
    if trains_on_torch(configs, plan):
        from engine.torchgraph.device import resolve_device

        device = resolve_device(spec.device)

    report = _reporter(emit)
    report(0.01, f"converting the {fmt} model to ONNX" if fmt != "onnx" else "checking the model")
    converting = time.monotonic()
    original = to_onnx(model_path, fmt, workdir / "original.onnx")
    convert_s = time.monotonic() - converting
    check_onnx_runs(original)
    inputs, outputs = onnx_io(load_onnx(original))
    batch = fixed_batch(inputs)
    data = _samples(spec.dataset_path, inputs, outputs, task, spec.seed)
    trains = any(c.trains() for c in configs)
    holdout = resolve_holdout(spec.holdout, configs, has_dataset=data.source == "dataset")
    data, eval_data = _hold_out(data, holdout, spec.seed)
    if spec.train_samples is not None:
        data = data.subset(spec.train_samples, spec.seed)
    ev = Evaluation.from_samples(eval_data, task, batch, spec.latency_threads, spec.seed)
    ev.measured_on = measured_on.describe(
        dataset_id=spec.dataset_id,
        dataset_sha256=m.sha256_file(spec.dataset_path) if spec.dataset_path else None,
        source=data.source,
        samples=len(ev.samples),
        holdout=holdout,
        threads=spec.latency_threads,
        batch=batch,
    )
    job = _Job(
        spec=spec,
        emit=emit,
        workdir=workdir,
        export=export,
        configs=configs,
        plan=plan,
        handlers=handlers,
        fmt=fmt,
        original=original,
        inputs=inputs,
        batch=batch,
        data=data,
        holdout=holdout,
        evaluation=ev,
        floor=floor,
        warnings=evaluation.data_warnings(data, task, batch, trains=trains, holdout=holdout),
        report=report,
        device=device,
    )
    for index, config in enumerate(configs):
        why = config.needs_labels()
        if why and data.labels is None:
            raise EngineError(
                "dataset_needs_labels",
                f"pipeline[{index}] ({config.op}) needs a dataset with a `labels` array: {why}.",
                field=f"pipeline[{index}]",
            )
    if fmt == "pt2" and "torch" in plan:
        job.estimates = _estimate(job, convert_s, time.monotonic() - started)
    job.report(0.1, "measuring the original model")
    return job


def _estimate(job: _Job, convert_s: float, elapsed_s: float) -> dict[int, dict[str, Any]]:
    """Time the torch training steps on one real batch; refuse a job that cannot fit its
    limits (engine.torchgraph.estimate)."""
    from engine.torchgraph import estimate

    spec = job.spec
    job.report(0.08, "estimating the training time on one batch")
    try:
        return estimate.estimate(
            Path(spec.model_path),
            job.configs,
            start=spec.resume.start_index if spec.resume is not None else 0,
            data=job.data,
            eval_samples=len(job.evaluation.samples),
            inputs=job.inputs,
            fixed_batch=job.batch,
            task=job.evaluation.task,
            models={k: Path(v) for k, v in spec.models.items()},
            convert_s=convert_s,
            elapsed_s=elapsed_s,
            limits=estimate.Limits(spec.time_limit_s, spec.memory_limit_mb),
            threads=spec.train_threads,
        )
    except EngineError:
        raise
    except Exception as exc:  # a model that cannot train fails in its step, with that step's error
        job.warnings.append(
            f"The pre-flight estimate could not time a training batch ({exc}); the job runs "
            "without one."
        )
        return {}


def _hold_out(data: Samples, holdout: float, seed: int) -> tuple[Samples, Samples]:
    """Split off the evaluation samples; (data, data) when nothing is held out."""
    if holdout <= 0 or data.source != "dataset":
        return data, data
    train, held = data.split(holdout, seed)
    if len(train) < 2 or len(held) < 1:
        raise EngineError(
            "dataset_too_small",
            f"The dataset has {len(train) + len(held)} samples: too few to hold out "
            f"{holdout:.0%} for evaluation and train on the rest. Upload more samples or "
            "set evaluation.holdout to 0.",
            field="evaluation.holdout",
        )
    return train, held


def _start(job: _Job) -> _State:
    """Measure the original (or, when resuming, load the checkpoint and recompute the reference)."""
    ev = job.evaluation
    model_path = Path(job.spec.model_path)
    current_pt2: Path | None = model_path if job.fmt == "pt2" else None
    resume = job.spec.resume
    if resume is not None:
        start = resume.start_index
        original_metrics = dict(resume.original_metrics)
        ev.reference = ev.outputs(job.original)
        current, current_pt2 = _load_checkpoint(Path(resume.model_path), job.workdir, start - 1)
    else:
        start, current = 0, job.original
        original_metrics, ev.reference = ev.measure(job.original)
        job.emit({"type": EventKind.ORIGINAL_MEASURED, "metrics": original_metrics})
    job.warnings += evaluation.output_warnings(ev.task, ev.reference)
    return _State(
        start=start,
        current=current,
        current_pt2=current_pt2,
        original_metrics=original_metrics,
        probe=first_feed(ev.samples, job.batch),
        final_metrics=original_metrics,
    )


def _load_checkpoint(saved: Path, workdir: Path, index: int) -> tuple[Path, Path | None]:
    """A stored step output as (ONNX to measure, .pt2 to continue on torch or None)."""
    if saved.suffix == ".pt2":
        pt2 = workdir / f"resume_step{index}.pt2"
        shutil.copyfile(saved, pt2)
        return pt2_to_onnx(pt2, workdir / f"resume_step{index}.onnx"), pt2
    onnx = workdir / f"resume_step{index}.onnx"
    shutil.copyfile(saved, onnx)
    load_onnx(onnx)
    return onnx, None


def _run_step(job: _Job, state: _State, index: int) -> None:
    """Run one op on the current model, check and measure its output, report it."""
    config, handler, backend = job.configs[index], job.handlers[index], job.plan[index]
    n = len(job.configs)
    lo, hi = step_span(index, n)
    job.emit({"type": EventKind.STEP_STARTED, "index": index, "op": config.op})
    job.report(lo, f"step {index + 1}/{n}: {config.op}")
    scratch = job.workdir / f"step{index}.tmp"
    scratch.mkdir(exist_ok=True)
    suffix = "pt2" if backend == "torch" else "onnx"
    ctx = StepContext(
        index=index,
        workdir=scratch,
        output=job.workdir / f"step{index}_{config.op}.{suffix}",
        inputs=job.inputs,
        samples=job.data,
        batch=job.batch,
        seed=job.spec.seed,
        report=_scaled(job.report, lo, lo + (hi - lo) * 0.6),
        source_model=Path(job.spec.model_path),
        source_format=job.fmt,
        models={k: Path(v) for k, v in job.spec.models.items()},
        task=job.evaluation.task,
        eval_samples=job.evaluation.samples,
        eval_reference=job.evaluation.reference,
        held_out=job.holdout > 0 and job.data.source == "dataset",
        device=job.device,
        train_threads=job.spec.train_threads,
        emit=job.emit,
        dataset_path=Path(job.spec.dataset_path) if job.spec.dataset_path else None,
        holdout=job.holdout,
        floor=dict(job.floor),
        history=list(job.spec.search_history),
        original_metrics=state.original_metrics,
        build=lambda pipeline, workdir, train_samples=None: _build(
            job, pipeline, workdir, train_samples
        ),
        time_limit_s=job.spec.time_limit_s,
    )
    if index in job.estimates:
        ctx.details["estimate"] = job.estimates[index]
    if backend == "torch":
        if state.current_pt2 is None:  # plan_pipeline guarantees one; a resume may not
            raise EngineError(
                "invalid_pipeline",
                f"pipeline[{index}] ({config.op}) needs the torch model, which an earlier "
                "step did not keep.",
                field=f"pipeline[{index}]",
            )
        out = Path(handler(config, state.current_pt2, ctx))
    else:
        out = Path(handler(config, state.current, ctx))
    shutil.rmtree(scratch, ignore_errors=True)
    if backend == "torch" and config.trains():
        ctx.details.setdefault("device", job.device)
    if out.suffix == ".pt2":
        state.current_pt2 = out
        measured = pt2_to_onnx(out, job.workdir / f"step{index}_{config.op}.onnx")
        checkpoint = m.artifact_info(out, "pt2")
    else:
        state.current_pt2 = None
        measured = out
        checkpoint = m.artifact_info(out)
    job.warnings += ctx.job_warnings
    warnings = ctx.warnings + verify_artifact(measured, state.probe)
    job.report(lo + (hi - lo) * 0.7, f"step {index + 1}/{n}: measuring")
    values, _ = job.evaluation.measure(measured)
    values.update(ctx.metrics)
    warnings += evaluation.fidelity_warnings(values)
    verdict = _verdict(job, state, values)
    if verdict["below_floor"] and index < n - 1:
        warnings.append(quality.step_warning(verdict))
    artifact = m.artifact_info(measured)
    state.steps.append(
        {
            "index": index,
            "op": config.op,
            "backend": backend,
            "config": config.to_dict(),
            "metrics": values,
            "quality": verdict,
            "artifact": artifact,
            "extras": [m.artifact_info(path, fmt) for path, fmt in ctx.extras],
            "details": ctx.details,
            "warnings": warnings,
        }
    )
    job.emit(
        {
            "type": EventKind.STEP_FINISHED,
            "index": index,
            "metrics": values,
            "quality": verdict,
            "warnings": warnings,
            "details": ctx.details,
            # The last step's file is the final artifact; only earlier ones are checkpoints
            # (a torch step's checkpoint is its .pt2, so a retry resumes on torch).
            "artifact": checkpoint if index < n - 1 else None,
        }
    )
    state.current, state.final_metrics, state.final_artifact = measured, values, artifact


def _build(
    job: _Job, pipeline: list[dict[str, Any]], workdir: Path, train_samples: int | None = None
) -> dict[str, Any]:
    """Run another pipeline on the job's upload with the job's data, held-out split, floor
    and seed, in `workdir` (the auto search's candidates): the same measurements as a job;
    with `train_samples`, training on at most that many of the job's training samples (a
    probe), still measured on the job's held-out samples."""
    spec = job.spec.model_copy(
        update={
            "pipeline": pipeline,
            "workdir": str(workdir),
            "holdout": job.holdout,
            "resume": None,
            "search_history": [],
            "train_samples": train_samples,
            "export": ["onnx"],
            "allow_below_floor": True,
        }
    )
    return run(spec)


def _finish(job: _Job, state: _State) -> dict[str, Any]:
    """Check the final file once more, collect the artifacts, measure the speedup side by side."""
    job.report(0.96, "checking the final artifact")
    current, final_metrics, final_artifact = (
        state.current,
        state.final_metrics,
        state.final_artifact,
    )
    if final_artifact is None:
        final_artifact = m.artifact_info(current)
        if current != job.original:
            final_metrics, _ = job.evaluation.measure(current)
    if final_artifact["sha256"] != m.sha256_file(current):
        raise EngineError("artifact_check_failed", f"{current.name} changed after it was measured.")
    verify_artifact(current, state.probe)
    artifacts = [{**final_artifact, "role": "final"}]
    if state.steps:
        artifacts += [{**extra, "role": "final"} for extra in state.steps[-1]["extras"]]
    if "pt2" in job.export:
        assert state.current_pt2 is not None  # _validate allowed pt2 only for torch-kept pipelines
        pt2 = job.workdir / "final.pt2"
        shutil.copyfile(state.current_pt2, pt2)
        artifacts.append({**m.artifact_info(pt2, "pt2"), "role": "final"})
    ratios = evaluation.ratios(state.original_metrics, final_metrics)
    threads = job.spec.latency_threads
    side_by_side: dict[str, float] | None = None
    if current != job.original:
        # speedup from the two models measured side by side, not minutes apart
        job.report(0.98, "measuring the speedup side by side")
        before_ms, after_ms = m.latency_side_by_side(
            [job.original, current], job.evaluation.latency_feeds, threads
        )
        ratios["speedup"] = round(before_ms / after_ms, 4)
        side_by_side = {"original_ms_p50": before_ms, "final_ms_p50": after_ms}
    warnings = list(job.warnings)
    if state.steps:
        warnings += evaluation.speed_warnings(ratios["speedup"], job.batch, threads)
    verdict = _verdict(job, state, final_metrics)
    if verdict["verdict"] == "degraded":
        warnings.append(quality.degraded_warning(verdict))
    job.report(1.0, "done")
    return {
        "original": state.original_metrics,
        "steps": state.steps,
        "final": final_metrics,
        "quality": verdict,
        "ratios": ratios,
        "compression_basis": evaluation.compression_basis(final_metrics)[0],
        "artifacts": artifacts,
        "warnings": warnings,
        "accuracy_measured": "accuracy_top1" in final_metrics,
        "latency_side_by_side": side_by_side,
        "calibration_source": job.data.source,
        "evaluation": {
            "holdout": job.holdout,
            "eval_samples": len(job.evaluation.samples),
            "train_samples": len(job.data) if job.holdout > 0 else None,
        },
    }


def _verdict(job: _Job, state: _State, values: dict[str, Any]) -> dict[str, Any]:
    """The quality of a step's or the final metrics against the job's floor (engine.quality)."""
    return quality.verdict(
        values,
        state.original_metrics,
        job.evaluation.task,
        job.floor,
        job.spec.allow_below_floor,
    )


def _reporter(emit: Progress) -> Report:
    """Progress events from (fraction of the job, message). The fraction never goes back: a
    phase that runs late (a ranking a missed target asks for after the builds) reports its
    message at the progress already reached."""
    reached = 0.0

    def report(fraction: float, message: str) -> None:
        nonlocal reached
        reached = max(reached, min(max(fraction, 0.0), 1.0))
        emit({"type": EventKind.PROGRESS, "progress": round(reached, 4), "message": message})

    return report


def _scaled(report: Report, lo: float, hi: float) -> Report:
    """A step's own 0..1 progress mapped onto its share of the job's."""

    def step_report(fraction: float, message: str) -> None:
        report(lo + (hi - lo) * fraction, message)

    return step_report
